"""``experts``: one LoRA expert and one head per task, frozen after its task; trained once,
evaluated with every requested inference router (``experts-taskid``, ``experts-retrieval``, ...).

Training is the same whichever results the run asks for; what the inferences need is kept only
when one asks for it: the replay buffer (``mole``) and the FAISS key index (``retrieval``,
``confidence``). See :mod:`.inference` for each inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_lora.continual.module import TrainPlan
from moe_lora.continual.prepared import Examples
from moe_lora.continual.registry import register_strategy
from moe_lora.continual.settings import check
from moe_lora.continual.strategies.base import Prediction, RunContext, Strategy
from moe_lora.continual.strategies.bayes import FactoredBayes, StatsOptions
from moe_lora.continual.strategies.inference import (
    Confidence,
    Inference,
    MoLEGating,
    MoLEOptions,
    Retrieval,
    Shared,
    TaskId,
)
from moe_lora.continual.strategies.keys import KeyIndex, RetrievalOptions
from moe_lora.continual.strategies.replay import ReplayMemory

__all__ = ["INFERENCES", "Experts", "ExpertsOptions"]

INFERENCES: dict[str, type[Inference]] = {
    "taskid": TaskId, "retrieval": Retrieval, "confidence": Confidence, "mole": MoLEGating,
    "stats": FactoredBayes,
}
"""Evaluation name -> inference class (the registry's ``evaluations`` of ``experts``)."""


@dataclass
class ExpertsOptions:
    """``strategies.experts``.

    Attributes:
        replay_size: exemplars kept for inferences that learn from them (``mole``, ``stats``).
        retrieval: the key index (:class:`RetrievalOptions`).
        mole: MoLE gate training (:class:`MoLEOptions`).
        stats: the factored Bayes router (:class:`StatsOptions`).
    """

    replay_size: int = 500
    retrieval: RetrievalOptions = field(default_factory=RetrievalOptions)
    mole: MoLEOptions = field(default_factory=MoLEOptions)
    stats: StatsOptions = field(default_factory=StatsOptions)

    def __post_init__(self) -> None:
        check(self.replay_size >= 1, "strategies.experts.replay_size", "must be >= 1")


@register_strategy("experts", options=ExpertsOptions, evaluations={
    "taskid": "task-aware", "retrieval": "task-agnostic", "confidence": "task-agnostic",
    "mole": "task-agnostic", "stats": "task-agnostic"})
class Experts(Strategy):
    """An expert and a head per task; earlier experts and heads frozen."""

    options: ExpertsOptions

    @classmethod
    def feature_kinds(cls, options: ExpertsOptions, results: list[str]) -> set[str]:
        """Only the statistics router reads frozen features (``stats.features``)."""
        return {options.stats.features} if "experts-stats" in results else set()

    def __init__(self, ctx: RunContext, options: ExpertsOptions, results: list[str]):
        super().__init__(ctx, options, results)
        names = {r: r.removeprefix("experts-") for r in results}
        needs = set().union(*(INFERENCES[n].needs for n in names.values()))
        self.shared = Shared(
            ctx, self.heads,
            ReplayMemory(ctx, options.replay_size) if "replay" in needs else None,
            KeyIndex(options.retrieval, ctx.embeddings, ctx.backbone.dim) if "keys" in needs else None,
            options)
        self.inferences = {r: INFERENCES[n](self.shared) for r, n in names.items()}

    def before_task(self, task: int) -> None:
        bank = self.ctx.bank
        bank.detach_gates()
        bank.freeze()
        for h in range(len(self.heads)):
            self.heads.set_trainable(h, False)
        self.expert = bank.add_expert(f"task{task + 1}", self.ctx.expert_config(), task=task)
        self.heads.add(self.ctx.tasks[task].task.class_ids)

    def train_task(self, task: int) -> None:
        pt = self.ctx.tasks[task]
        plan = TrainPlan(routing="single", active=self.expert,
                         train_classes=tuple(pt.task.class_ids), tag=f"experts/task{task + 1}")
        self.ctx.fit(self.ctx.module(self.heads, plan), pt.train, pt.val, plan.tag,
                     self.ctx.seed(task))

    def after_task(self, task: int) -> None:
        s = self.shared
        if s.memory is not None:
            s.previous_replay = s.memory.examples() if len(s.memory) else None
            s.memory.add_task(task)
        if s.keys is not None:
            s.keys.add_task(task, self.ctx.tasks[task].train, self.ctx.cfg.train.seed)
        for inference in self.inferences.values():
            inference.after_task(task)

    def evaluate(self, step: int, task: int, test: Examples) -> dict[str, Prediction]:
        within = None
        out = {}
        for name, inference in self.inferences.items():
            out[name] = inference.predict(step, test)
            if isinstance(inference, TaskId):
                within = out[name].classes
        if within is None:
            within = TaskId(self.shared).predict(step, test).classes
        for p in out.values():
            p.within = within
        return out

    def details(self) -> dict[str, dict[str, Any]]:
        return {r: d for r, inf in self.inferences.items() if (d := inf.details())}

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["inferences"] = {r: inf.state_dict() for r, inf in self.inferences.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for r, inference in self.inferences.items():
            inference.load_state_dict(state["inferences"].get(r, {}))

    def save_artifacts(self, folder: Path) -> None:
        if self.shared.memory is not None:
            self.shared.memory.save(folder)
        if self.shared.keys is not None:
            self.shared.keys.save(folder)

    def load_artifacts(self, folder: Path) -> None:
        if self.shared.memory is not None:
            self.shared.memory.load(folder)
        if self.shared.keys is not None:
            self.shared.keys.load(folder)
