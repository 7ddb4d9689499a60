"""Inference routers of the ``experts`` strategy: one trained bank, several ways to use it.

The ``experts`` strategy trains one expert and one head per task, once. Each :class:`Inference`
here is one way to answer without retraining, and one result of the run (``experts-<name>``):

==========  ============  ===========================================================
name        setting       how an input's expert is chosen
==========  ============  ===========================================================
taskid      task-aware    the task id (:class:`moe_lora.routers.TaskRouter`'s rule)
retrieval   task-agnostic the kNN vote of the FAISS key index (LoRARetriever)
confidence  task-agnostic the expert whose own head is most confident, times the vote
mole        task-agnostic MoLE gates (arXiv 2404.13628) trained on the replay buffer
==========  ============  ===========================================================

An inference may keep state between tasks (:meth:`Inference.after_task`), saved in the
strategy's checkpoint (:meth:`Inference.state_dict`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lora.continual.evaluation import expert_logits, predict_gated, predict_routed
from moe_lora.continual.module import MoELoRAModule, TaskHeads, TrainPlan
from moe_lora.continual.prepared import Examples, loader
from moe_lora.continual.settings import check, check_finite
from moe_lora.continual.strategies.base import Prediction, RunContext
from moe_lora.continual.strategies.keys import KeyIndex
from moe_lora.continual.strategies.replay import ReplayMemory
from moe_lora.core.routing import RouterInput, Routing
from moe_lora.routers import MoLEConfig, MoLEGate, MoLERouter

__all__ = ["Confidence", "Inference", "LOGIT_CACHE_ROWS", "MoLEGating", "MoLEOptions", "Retrieval",
           "Shared", "TaskId"]

LOGIT_CACHE_ROWS = 2_000_000
"""Most (expert, input) logit rows :meth:`Shared.expert_logits` keeps."""


@dataclass
class MoLEOptions:
    """``strategies.experts.mole``: gate training on the replay buffer after each task."""

    epochs: int = 10
    lr: float = 1e-2

    def __post_init__(self) -> None:
        check_finite(self, "strategies.experts.mole")
        check(self.epochs >= 1, "strategies.experts.mole.epochs", "must be >= 1")
        check(self.lr > 0, "strategies.experts.mole.lr", "must be > 0")


@dataclass
class Shared:
    """What the inferences of one ``experts`` run share.

    Attributes:
        ctx: the run context. heads: one head per task (frozen after its task).
        memory: the replay buffer (when an inference needs one). keys: the retrieval index
            (when an inference needs one). options: the strategy's options.
    """

    ctx: RunContext
    heads: TaskHeads
    memory: ReplayMemory | None
    keys: KeyIndex | None
    options: Any
    previous_replay: Examples | None = None
    _logits: dict[tuple[int, str], Tensor] = field(default_factory=dict)

    def expert_logits(self, step: int, ex: Examples) -> Tensor:
        """``[N, K]``: experts ``0..step`` on ``ex``, each through its own head and classes
        (:func:`~moe_lora.continual.evaluation.expert_logits`), blocks in expert order.

        A frozen expert's logits on an input never change, so rows are memoised per (expert,
        input key): each expert runs once on each input over the whole run (inferences and
        steps share them). Call only once the experts up to ``step`` are trained.
        """
        if len(self._logits) > LOGIT_CACHE_ROWS:  # a long-running server: stay bounded
            self._logits.clear()
        blocks = []
        for e, ids in enumerate(self.heads.class_ids[: step + 1]):
            missing = list(dict.fromkeys(k for k in ex.keys if (e, k) not in self._logits))
            if missing:
                where = {k: i for i, k in enumerate(ex.keys)}
                rows = expert_logits(self.module(), ex.select([where[k] for k in missing]), e,
                                     ids, self.ctx.cfg.train.eval_batch_size)
                self._logits.update({(e, k): r for k, r in zip(missing, rows, strict=True)})
            blocks.append(torch.stack([self._logits[e, k] for k in ex.keys]))
        return torch.cat(blocks, 1)

    def module(self) -> MoELoRAModule:
        """The bank + heads as a module (single-expert routing by default)."""
        return self.ctx.module(self.heads, TrainPlan(routing="single"))

    def expert_classes(self) -> Tensor:
        """Bool ``[E, n_classes]``: the classes of each expert's task."""
        out = torch.zeros(len(self.heads), self.ctx.n_classes, dtype=torch.bool)
        for e, ids in enumerate(self.heads.class_ids):
            out[e, ids] = True
        return out.to(self.ctx.device)


class Inference(ABC):
    """One way to use the trained experts at test time (see the module docstring).

    Attributes:
        needs: the shared pieces it uses: ``"replay"`` and/or ``"keys"``.
    """

    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, shared: Shared):
        self.shared = shared

    def after_task(self, task: int) -> None:  # noqa: B027 (optional hook)
        """Update after task ``task`` (the strategy has already updated memory and keys)."""

    @abstractmethod
    def predict(self, step: int, test: Examples) -> Prediction:
        """Predictions on ``test`` after step ``step`` (``task_weights`` over seen tasks)."""

    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON values to checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore :meth:`state_dict`'s output."""

    def details(self) -> dict[str, Any]:
        """JSON facts for results.json (see :meth:`Strategy.details`); none by default."""
        return {}


def _one_hot(routed: Tensor, n: int) -> Tensor:
    return F.one_hot(routed.long().cpu(), n).float()


class TaskId(Inference):
    """The task id picks the expert (the task-aware upper bound of routing)."""

    def predict(self, step: int, test: Examples) -> Prediction:
        s = self.shared
        preds, routed = predict_routed(
            s.module(), test, lambda b, k: Routing.per_sample(b["tasks"]), s.expert_classes(),
            s.ctx.cfg.train.eval_batch_size)
        return Prediction(classes=preds, task_weights=_one_hot(routed, step + 1))


class Retrieval(Inference):
    """LoRARetriever: each input goes to the expert its kNN vote over the key index picks."""

    needs = frozenset({"keys"})

    def predict(self, step: int, test: Examples) -> Prediction:
        s = self.shared
        assert s.keys is not None
        weights = s.keys.weights(s.keys.embed(test.keys), step + 1)
        chosen = weights.argmax(1).to(s.ctx.device)
        start = [0]

        def route(batch: dict[str, Tensor], keys: list[str]) -> Routing:
            n = len(keys)
            routing = Routing.per_sample(chosen[start[0] : start[0] + n])
            start[0] += n
            return routing

        preds, _ = predict_routed(s.module(), test, route, s.expert_classes(),
                                  s.ctx.cfg.train.eval_batch_size)
        return Prediction(classes=preds, task_weights=weights)


class Confidence(Inference):
    """Every seen expert runs; the most confident head (times the vote prior) decides:
    ``argmax_e log max_c p_e(c|x) + prior_weight * log vote_e(x)``."""

    needs = frozenset({"keys"})

    def predict(self, step: int, test: Examples) -> Prediction:
        s = self.shared
        assert s.keys is not None
        z = s.expert_logits(step, test)
        ids = s.heads.class_ids[: step + 1]
        blocks = z.split([len(c) for c in ids], dim=1)
        best = torch.stack([b.log_softmax(1).max(1).values for b in blocks], 1)  # [N, E]
        own = [torch.tensor(c)[b.argmax(1)] for b, c in zip(blocks, ids, strict=True)]
        weight = s.options.retrieval.prior_weight
        if weight:
            prior = s.keys.weights(s.keys.embed(test.keys), step + 1)
            best = best + weight * prior.clamp_min(1e-4).log()
        routed = best.argmax(1)
        preds = torch.stack(own, 1).gather(1, routed[:, None]).squeeze(1)
        return Prediction(classes=preds, task_weights=_one_hot(routed, step + 1))


class MoLEGating(Inference):
    """MoLE gates in every LoRA layer, retrained on the replay buffer after each task."""

    needs = frozenset({"replay"})

    def __init__(self, shared: Shared):
        super().__init__(shared)
        self.router: MoLERouter | None = None

    def after_task(self, task: int) -> None:
        s = self.shared
        assert s.memory is not None
        self.router = MoLERouter(MoLEConfig(), s.ctx.bank).attach()  # sized for every expert
        self._train(task, s.memory.examples())
        for p in self.router.parameters():
            p.requires_grad_(False)

    def _train(self, task: int, data: Examples) -> None:
        s, opts = self.shared, self.shared.options.mole
        assert self.router is not None
        module, cfg = s.module(), s.ctx.cfg.train
        opt = torch.optim.Adam(self.router.parameters(), lr=opts.lr)
        seen = torch.zeros(s.ctx.n_classes, dtype=torch.bool, device=s.ctx.device)
        seen[s.ctx.seen_classes(task)] = True
        for epoch in range(opts.epochs):
            for batch in loader(data, s.ctx.backbone, cfg.batch_size, True,
                                seed=s.ctx.seed(task, salt=1 + epoch)):
                batch = {k: v.to(s.ctx.device) for k, v in batch.items()}
                routing = self.router.routing(RouterInput(attention_mask=batch.get("attention_mask")))
                logits = module.logits(batch, routing).masked_fill(~seen, float("-inf"))
                loss = F.cross_entropy(logits, batch["labels"])
                loss = loss + cfg.aux_coef * s.ctx.bank.pop_aux_loss()
                opt.zero_grad()
                loss.backward()
                opt.step()

    def predict(self, step: int, test: Examples) -> Prediction:
        s = self.shared
        assert self.router is not None, "MoLE gates are trained after the first task"
        seen = torch.zeros(s.ctx.n_classes, dtype=torch.bool)
        seen[s.ctx.seen_classes(step)] = True
        preds, weights = predict_gated(s.module(), test, self.router, seen,
                                       s.ctx.cfg.train.eval_batch_size)
        return Prediction(classes=preds, task_weights=weights.cpu())

    def state_dict(self) -> dict[str, Any]:
        if self.router is None:
            return {}
        return {f"{path}:{k}": v.detach().clone() for path, gate in self.router.gates.items()
                if isinstance(gate, MoLEGate) for k, v in gate.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.router = MoLERouter(MoLEConfig(), self.shared.ctx.bank).attach()
        for path, gate in self.router.gates.items():
            if f"{path}:weight" in state:
                gate.load_state_dict({k: state[f"{path}:{k}"] for k in gate.state_dict()})
        for p in self.router.parameters():
            p.requires_grad_(False)
