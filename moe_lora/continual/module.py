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

from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lora.continual.olora import olora_loss
from moe_lora.continual.settings import TrainConfig
from moe_lora.core.bank import ExpertBank
from moe_lora.core.routing import Routing
from moe_lora.models.backbones import Backbone

__all__ = ["MoELoRAModule", "NonFiniteLossError", "OLoRATerms", "TaskHeads", "TrainPlan",
           "causal_lm_loss"]


@dataclass(frozen=True)
class OLoRATerms:
    """O-LoRA terms of one fit: the new expert's index, the earlier ones, and the loss weights."""

    new: int
    previous: tuple[int, ...]
    lambda1: float
    lambda2: float


@dataclass(frozen=True)
class TrainPlan:
    """What one ``fit`` trains: the routing, the classes the loss covers, optional O-LoRA terms.

    Attributes:
        routing: ``single`` (expert ``active``), ``sum`` (every expert, weight 1: O-LoRA),
            ``gated`` (the attached gates) or ``base``.
        active: the expert of ``single`` routing.
        train_classes: global class ids the loss covers (None: all); the "labels trick".
        olora: O-LoRA terms, or None.
        tag: ``<strategy>/task<k>``, named in errors.
        kind: ``classify`` or ``causal-lm``.
    """

    routing: str = "single"
    active: int = 0
    train_classes: tuple[int, ...] | None = None
    olora: OLoRATerms | None = None
    tag: str = ""
    kind: str = "classify"

    def __post_init__(self) -> None:
        if self.routing not in ("single", "sum", "gated", "base"):
            raise ValueError(f"TrainPlan.routing must be single/sum/gated/base, got {self.routing!r}")
        if self.kind not in ("classify", "causal-lm"):
            raise ValueError(f"TrainPlan.kind must be 'classify' or 'causal-lm', got {self.kind!r}")


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became nan/inf; the message names the fit, the step and likely causes."""


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
    """Frozen base, :class:`ExpertBank`, task heads and what one ``fit`` trains.

    Configured entirely by its constructor; build one per fit (it wraps the shared bank and heads,
    so building is free).

    Args:
        bank: the expert bank wrapping the base model.
        train: the run's :class:`~moe_lora.continual.settings.TrainConfig` (lr, LoRA+, weight decay,
            aux_coef, on_nonfinite), passed as the object itself.
        plan: :class:`TrainPlan` of this fit.
        backbone: the feature extractor (``classify``); None for ``causal-lm``.
        heads: :class:`TaskHeads` (``classify``).

    Raises:
        ValueError: ``classify`` without backbone or heads.
    """

    def __init__(
        self,
        bank: ExpertBank,
        train: TrainConfig,
        plan: TrainPlan,
        backbone: Backbone | None = None,
        heads: TaskHeads | None = None,
    ):
        super().__init__()
        if plan.kind == "classify" and (backbone is None or heads is None):
            raise ValueError("classify needs a backbone and task heads")
        self.bank, self.train_cfg, self.plan = bank, train, plan
        self.backbone, self.heads = backbone, heads
        self.save_hyperparameters({"plan": asdict(plan), "train": asdict(train)})
        classes = None
        if plan.train_classes is not None and heads is not None:
            classes = torch.zeros(heads.n_classes, dtype=torch.bool)
            classes[list(plan.train_classes)] = True
        self.register_buffer("train_classes", classes, persistent=False)
        self.skipped_batches = 0

    # ------------------------------------------------------------------ modes
    def on_train_start(self) -> None:
        """The LoRA layers (expert dropout, gate jitter and losses) train for the fit. Lightning
        keeps each submodule's mode, and the bank's layers follow the frozen base, which stays in
        eval mode (its own dropout off)."""
        self._lora_mode(True)

    def on_train_end(self) -> None:
        """Back to eval mode: what runs between fits (evaluation, routing) is deterministic."""
        self._lora_mode(False)

    def _lora_mode(self, training: bool) -> None:
        for layer in self.bank.layers.values():
            layer.train(training)
            layer.base.train(False)  # the frozen base module keeps eval mode

    # ------------------------------------------------------------------ forward
    def routing(self, batch_size: int, mode: str | None = None) -> Routing:
        """The plan's routing (or ``mode``) as a :class:`Routing` for a batch of ``batch_size``."""
        mode = mode or self.plan.routing
        if mode == "single":
            return Routing.single(self.plan.active)
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
        if self.plan.kind == "causal-lm":
            return causal_lm_loss(self.bank, batch, routing)
        return F.cross_entropy(self._masked_logits(batch, routing), batch["labels"])

    def _masked_logits(self, batch: dict[str, Tensor], routing: Routing) -> Tensor:
        logits = self.logits(batch, routing)
        if self.train_classes is not None:
            logits = logits.masked_fill(~self.train_classes, float("-inf"))
        return logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        task = self._task_loss(batch)
        aux = self.bank.pop_aux_loss().to(task.device)
        loss = task + self.train_cfg.aux_coef * aux
        log = {"train/task_loss": task, "train/aux_loss": aux}
        if self.plan.olora is not None:
            o = self.plan.olora
            reg = olora_loss(self.bank, o.new, list(o.previous), o.lambda1, o.lambda2)
            loss = loss + reg
            log["train/olora_loss"] = reg
        if not torch.isfinite(loss):
            return self._non_finite("loss", batch_idx)
        log["train/loss"] = loss
        n = self._batch_size(batch)
        self.log_dict(log, prog_bar=False, batch_size=n)
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=n)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.abs().max() for g in grads]).max()):
            if self._non_finite("gradient", self.global_step) is None:
                optimizer.zero_grad(set_to_none=True)

    def _non_finite(self, what: str, step: int) -> None:
        """Stop with :class:`NonFiniteLossError` (``on_nonfinite: stop``) or skip the batch."""
        if self.train_cfg.on_nonfinite == "skip_batch":
            self.skipped_batches += 1
            return None
        raise NonFiniteLossError(
            f"{self.plan.tag}: non-finite {what} at step {step} (epoch {self.current_epoch}); "
            f"likely causes: a learning rate too high (train.lr={self.train_cfg.lr}, LoRA+ ratio "
            f"{self.train_cfg.lora_plus_ratio}), nan/inf in the input data, or an unstable "
            f"auxiliary loss (train.aux_coef={self.train_cfg.aux_coef}); set "
            "train.on_nonfinite=skip_batch to skip such batches"
        )

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        n = self._batch_size(batch)
        routing = self.routing(n)
        if self.plan.kind == "causal-lm":
            loss = causal_lm_loss(self.bank, batch, routing)
            self.bank.pop_aux_loss()
            self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
            return
        logits = self._masked_logits(batch, routing)
        self.bank.pop_aux_loss()
        self.log("val/loss", F.cross_entropy(logits, batch["labels"]), prog_bar=True,
                 batch_size=n, sync_dist=True)
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log("val/acc", acc, prog_bar=True, batch_size=n, sync_dist=True)

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over trainable parameters; ``lora_B`` at ``lora_plus_ratio * lr`` (LoRA+).

        On CUDA the fused implementation (one kernel per step for all parameters, instead of a
        dozen per parameter tensor: LoRA steps are launch-bound at small shapes)."""
        b_params, rest = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (b_params if name.endswith("lora_B") else rest).append(p)
        t = self.train_cfg
        groups: list[dict[str, Any]] = [{"params": rest, "lr": t.lr}]
        if b_params:
            groups.append({"params": b_params, "lr": t.lr * t.lora_plus_ratio})
        params = rest + b_params
        fused = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay,
                                 fused=True if fused else None)


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
