"""The Lightning module of a continual run: frozen base + expert bank + routing + task heads.

Two kinds of training:

* ``classify`` (encoders, MLPs): a :class:`~moe_lora.backbones.Backbone` pools features ``[B, D]``;
  :class:`TaskHeads` turns them into logits over the stream's global classes; cross-entropy is taken
  over the classes present in the current training data (``train_classes``), so a task's head rows
  are only pushed by examples that can carry them (the "labels trick").
* ``causal-lm`` (SmolLM2 and other decoders): the batch carries ``input_ids``, ``attention_mask`` and
  ``labels`` with ``-100`` on prompt tokens; the loss is next-token cross-entropy on target tokens
  only.

Loss = task loss + ``aux_coef`` * router aux loss (MoLE balance) + O-LoRA terms
(:mod:`moe_lora.continual.olora`). The optimiser covers trainable parameters only; with LoRA+
(arXiv 2402.12354) every ``lora_B`` gets ``lora_plus_ratio`` times the learning rate of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lora.continual.olora import olora_loss
from moe_lora.core.bank import ExpertBank
from moe_lora.core.routing import Routing
from moe_lora.models.backbones import Backbone

__all__ = ["ModuleConfig", "MoELoRAModule", "TaskHeads"]


@dataclass
class ModuleConfig:
    """Optimisation knobs of :class:`MoELoRAModule` (see :class:`moe_lora.settings.TrainConfig`).

    Attributes:
        kind: ``classify`` or ``causal-lm``.
        lr: learning rate of LoRA ``A`` factors, heads and gates.
        lora_plus_ratio: ``lr`` multiplier of ``lora_B`` factors (1: plain LoRA).
        weight_decay: AdamW weight decay.
        aux_coef: weight of the routers' auxiliary loss.
        olora_lambda1, olora_lambda2: O-LoRA weights; O-LoRA is active when ``olora_new`` is set.
    """

    kind: str = "classify"
    lr: float = 2e-3
    lora_plus_ratio: float = 1.0
    weight_decay: float = 0.0
    aux_coef: float = 0.01
    olora_lambda1: float = 0.5
    olora_lambda2: float = 0.0


class TaskHeads(nn.Module):
    """Linear heads over global class ids, one parameter block per task.

    ``forward(features [B, D]) -> logits [B, n_classes]`` with ``-inf`` for classes whose task has
    no head yet. Blocks are separate parameters, so a finished task's head can be frozen (expert
    strategies) or keep training (shared-head strategies).
    """

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.dim, self.n_classes = dim, n_classes
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.class_ids: list[list[int]] = []

    def add(self, class_ids: list[int], generator: torch.Generator | None = None) -> int:
        """Add a head for ``class_ids`` (global ids); returns its index."""
        w = torch.randn(len(class_ids), self.dim, generator=generator) * self.dim**-0.5
        self.weights.append(nn.Parameter(w))
        self.biases.append(nn.Parameter(torch.zeros(len(class_ids))))
        self.class_ids.append(list(class_ids))
        return len(self.class_ids) - 1

    def __len__(self) -> int:
        return len(self.class_ids)

    def set_trainable(self, index: int, flag: bool) -> None:
        """Freeze (False) or unfreeze head ``index``."""
        self.weights[index].requires_grad_(flag)
        self.biases[index].requires_grad_(flag)

    def forward(self, features: Tensor) -> Tensor:
        out = features.new_full((features.shape[0], self.n_classes), float("-inf"))
        if not self.class_ids:
            return out
        w = torch.cat(list(self.weights))
        b = torch.cat(list(self.biases))
        ids = torch.tensor([c for ids in self.class_ids for c in ids], device=features.device)
        return out.index_copy(1, ids, features @ w.t() + b)

    def state(self) -> dict[str, Tensor]:
        """Tensors to save: ``w{i}``, ``b{i}``, ``classes{i}`` per head."""
        out: dict[str, Tensor] = {}
        for i, ids in enumerate(self.class_ids):
            out[f"w{i}"], out[f"b{i}"] = self.weights[i].detach(), self.biases[i].detach()
            out[f"classes{i}"] = torch.tensor(ids, dtype=torch.long)
        return out

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        """Replace every head by those in ``tensors`` (as from :meth:`state`); all frozen."""
        self.weights, self.biases, self.class_ids = nn.ParameterList(), nn.ParameterList(), []
        i = 0
        while f"w{i}" in tensors:
            self.weights.append(nn.Parameter(tensors[f"w{i}"].clone(), requires_grad=False))
            self.biases.append(nn.Parameter(tensors[f"b{i}"].clone(), requires_grad=False))
            self.class_ids.append(tensors[f"classes{i}"].tolist())
            i += 1


class MoELoRAModule(L.LightningModule):
    """Frozen base, :class:`ExpertBank`, task heads and the routing used while training.

    Args:
        bank: the expert bank wrapping the base model.
        cfg: :class:`ModuleConfig`.
        backbone: the feature extractor (``classify``); None for ``causal-lm``.
        heads: :class:`TaskHeads` (``classify``).

    What the runner sets before each ``fit``:
        ``train_routing``: ``"single"`` (expert ``active``), ``"sum"`` (every expert, weight 1:
        O-LoRA) or ``"gated"`` (the attached MoLE gates); ``active``; ``train_classes`` (bool
        ``[n_classes]``); ``olora_new`` / ``olora_previous`` (expert indices) to add O-LoRA terms.
    """

    def __init__(
        self,
        bank: ExpertBank,
        cfg: ModuleConfig,
        backbone: Backbone | None = None,
        heads: TaskHeads | None = None,
    ):
        super().__init__()
        if cfg.kind not in ("classify", "causal-lm"):
            raise ValueError(f"ModuleConfig.kind must be 'classify' or 'causal-lm', got {cfg.kind!r}")
        if cfg.kind == "classify" and (backbone is None or heads is None):
            raise ValueError("classify needs a backbone and task heads")
        self.bank, self.cfg, self.backbone, self.heads = bank, cfg, backbone, heads
        self.train_routing = "single"
        self.active = 0
        self.train_classes: Tensor | None = None
        self.olora_new: int | None = None
        self.olora_previous: list[int] = []

    # ------------------------------------------------------------------ forward
    def routing(self, batch_size: int, mode: str | None = None) -> Routing:
        """The training routing (or ``mode``) as a :class:`Routing` for a batch of ``batch_size``."""
        mode = mode or self.train_routing
        if mode == "single":
            return Routing.single(self.active)
        if mode == "sum":
            return Routing.dense(torch.ones(batch_size, len(self.bank), device=self.device))
        if mode == "gated":
            return Routing.gated()
        if mode == "base":
            return Routing.base()
        raise ValueError(f"unknown training routing {mode!r}")

    def features(self, batch: dict[str, Tensor], routing: Routing) -> Tensor:
        """Pooled features ``[B, D]`` of a collated batch under ``routing``."""
        assert self.backbone is not None
        with self.bank.use(routing):
            return self.backbone(batch)

    def logits(self, batch: dict[str, Tensor], routing: Routing) -> Tensor:
        """Logits ``[B, n_classes]`` (``-inf`` for classes without a head)."""
        assert self.heads is not None
        return self.heads(self.features(batch, routing))

    def _batch_size(self, batch: dict[str, Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def _task_loss(self, batch: dict[str, Tensor]) -> Tensor:
        routing = self.routing(self._batch_size(batch))
        if self.cfg.kind == "causal-lm":
            return causal_lm_loss(self.bank, batch, routing)
        logits = self.logits(batch, routing)
        if self.train_classes is not None:
            logits = logits.masked_fill(~self.train_classes.to(logits.device), float("-inf"))
        return F.cross_entropy(logits, batch["labels"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        task = self._task_loss(batch)
        aux = self.bank.pop_aux_loss().to(task.device)
        loss = task + self.cfg.aux_coef * aux
        log = {"train/task_loss": task, "train/aux_loss": aux}
        if self.olora_new is not None:
            reg = olora_loss(self.bank, self.olora_new, self.olora_previous,
                             self.cfg.olora_lambda1, self.cfg.olora_lambda2)
            loss = loss + reg
            log["train/olora_loss"] = reg
        log["train/loss"] = loss
        self.log_dict(log, prog_bar=False, batch_size=self._batch_size(batch))
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=self._batch_size(batch))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self._task_loss(batch)
        self.bank.pop_aux_loss()
        n = self._batch_size(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        if self.cfg.kind == "classify":
            logits = self.logits(batch, self.routing(n))
            if self.train_classes is not None:
                logits = logits.masked_fill(~self.train_classes, float("-inf"))
            self.bank.pop_aux_loss()
            acc = (logits.argmax(-1) == batch["labels"]).float().mean()
            self.log("val/acc", acc, prog_bar=True, batch_size=n, sync_dist=True)

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over trainable parameters; ``lora_B`` at ``lora_plus_ratio * lr`` (LoRA+)."""
        b_params, rest = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (b_params if name.endswith("lora_B") else rest).append(p)
        groups: list[dict[str, Any]] = [{"params": rest, "lr": self.cfg.lr}]
        if b_params:
            groups.append({"params": b_params, "lr": self.cfg.lr * self.cfg.lora_plus_ratio})
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


def causal_lm_loss(bank: ExpertBank, batch: dict[str, Tensor], routing: Routing) -> Tensor:
    """Next-token cross-entropy on target tokens only (``labels == -100`` elsewhere).

    ``batch``: ``input_ids`` / ``attention_mask`` / ``labels``, all ``[B, T]``.
    """
    with bank.use(routing):
        logits = bank.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
    )
