"""The strategy base class and what every strategy is handed: the :class:`RunContext`.

The runner drives each strategy through a fixed lifecycle (Avalanche's strategy template, typed
and without string hooks)::

    strategy.setup()                              # fresh state (or load_state_dict on resume)
    for task in range(strategy.n_steps):
        strategy.before_task(task)                # grow the bank, freeze, build heads
        strategy.train_task(task)                 # usually one ctx.fit(...)
        strategy.after_task(task)                 # memory, indexes, gates, statistics
        for j in strategy.eval_tasks(task):       # the runner fills R[row][j], TP and WP
            strategy.evaluate(task, j, test_j)    # -> {result name: Prediction}
        checkpoint(strategy.state_dict(), strategy.save_artifacts)

A strategy overrides only what it changes. Its typed options arrive as the object loaded from
``strategies.<name>``; its checkpoint state is what :meth:`Strategy.state_dict` returns.
See ``docs/architecture.md`` ("How to add a strategy") for a complete example.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moe_lora.continual.module import MoELoRAModule, TaskHeads, TrainPlan
from moe_lora.continual.prepared import Examples, PreparedTask
from moe_lora.continual.settings import RunConfig, check
from moe_lora.core.bank import ExpertBank
from moe_lora.core.config import ExpertConfig
from moe_lora.data import TaskStream
from moe_lora.models.backbones import Backbone

__all__ = ["FEATURE_KINDS", "Fit", "Prediction", "RunContext", "Strategy", "check_features"]

FEATURE_KINDS = ("sentence", "layers")
"""What :meth:`RunContext.frozen_features` reads: the base embedding, or the multi-layer frozen
features."""


def check_features(value: str, where: str) -> None:
    """Raise a :class:`~moe_lora.continual.settings.ConfigError` naming ``where`` unless ``value``
    is one of :data:`FEATURE_KINDS`."""
    check(value in FEATURE_KINDS, where, f"must be one of {', '.join(FEATURE_KINDS)}")

Fit = Callable[[MoELoRAModule, Examples, Examples, str, int], None]
"""``fit(module, train, val, tag, seed)``: one Lightning fit (the runner's trainer settings)."""


@dataclass
class Prediction:
    """A strategy's answer on one task's test examples (N of them).

    Attributes:
        classes: ``[N]`` predicted global class ids in the result's own setting.
        task_aware: ``[N]`` predictions with the task id given (shared-head strategies also
            report this setting), or None.
        task_weights: ``[N, T_seen]`` the weight each seen task (its expert) gets; task
            prediction (TP) is its argmax. None: TP is read from the predicted class's task.
        within: ``[N]`` predictions when the right task's expert and classes are used (WP), or
            None when the strategy has no such notion.
    """

    classes: Tensor
    task_aware: Tensor | None = None
    task_weights: Tensor | None = None
    within: Tensor | None = None


@dataclass
class RunContext:
    """What the runner shares with every strategy: data, model, bank and the trainer.

    Attributes:
        cfg: the whole run config (strategies read their own options, not this).
        stream: the task stream.
        backbone: frozen feature extractor (its lower blocks cached in ``tasks``).
        bank: the expert bank on the backbone's model; emptied before each strategy.
        tasks: every task's cached train/val/test examples (empty when serving a finished run).
        embeddings: retrieval key -> L2-normalised frozen base embedding ``[D]``.
        fit: one Lightning fit with the run's trainer settings.
        device: where the model lives.
        features: retrieval key -> multi-layer frozen features ``[feature_layers * D]``
            (:func:`~moe_lora.continual.prepared.frozen_tables`; empty: use ``embeddings``).
        feature_layers: how many layers ``features`` pools.
    """

    cfg: RunConfig
    stream: TaskStream
    backbone: Backbone
    bank: ExpertBank
    tasks: list[PreparedTask]
    embeddings: dict[str, np.ndarray]
    fit: Fit
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    features: dict[str, np.ndarray] = field(default_factory=dict)
    feature_layers: int = 1

    @property
    def n_tasks(self) -> int:
        """Tasks in the stream."""
        return len(self.stream)

    @property
    def n_classes(self) -> int:
        """Classes over the whole stream (global ids ``0..n_classes-1``)."""
        return self.stream.n_classes

    def expert_config(self) -> ExpertConfig:
        """Every expert's LoRA hyper-parameters (``model.rank/alpha/dropout``)."""
        m = self.cfg.model
        return ExpertConfig(rank=m.rank, alpha=m.alpha, dropout=m.dropout)

    def seen_classes(self, task: int) -> list[int]:
        """Global class ids of tasks ``0..task``."""
        return self.stream.seen_class_ids(task)

    def frozen_features(self, ex: Examples, kind: str = "sentence") -> Tensor:
        """Float64 frozen features of ``ex``: ``kind="sentence"`` the base embeddings ``[N, D]``
        (:attr:`embeddings`), ``"layers"`` the multi-layer features ``[N, feature_layers * D]``
        (:attr:`features`).

        Raises:
            ValueError: ``kind`` is not one of :data:`FEATURE_KINDS`.
        """
        if kind not in FEATURE_KINDS:
            raise ValueError(f"frozen features {kind!r}: expected one of {FEATURE_KINDS}")
        table = self.features if kind == "layers" and self.feature_layers > 1 else self.embeddings
        return torch.from_numpy(np.stack([table[k] for k in ex.keys])).double()

    def feature_dim(self, kind: str = "sentence") -> int:
        """Width of :meth:`frozen_features` of that ``kind``."""
        return self.backbone.dim * (self.feature_layers if kind == "layers" else 1)

    def new_heads(self) -> TaskHeads:
        """Empty task heads over the stream's classes, on the model's device."""
        return TaskHeads(self.backbone.dim, self.n_classes).to(self.device)

    def module(self, heads: TaskHeads, plan: TrainPlan) -> MoELoRAModule:
        """The Lightning module of one fit."""
        return MoELoRAModule(self.bank, self.cfg.train, plan, self.backbone, heads)

    def seed(self, task: int, salt: int = 0) -> int:
        """The data-order seed of ``task`` (``salt`` tells apart several loops in one task)."""
        return self.cfg.train.seed * 1000 + 100 * salt + task

    def reset_bank(self) -> None:
        """Remove every expert and gate (a strategy starts from the bare base)."""
        self.bank.detach_gates()
        for name in self.bank.names:
            self.bank.remove_expert(name)


class Strategy(ABC):
    """A continual-learning strategy (see the module docstring for the lifecycle).

    Args:
        ctx: the run's shared :class:`RunContext`.
        options: the strategy's options (its registered dataclass), or None.
        results: the result names the run asked of it (a subset of its registered ones).

    Attributes:
        heads: the task heads this strategy trains (saved in its checkpoint).
        fwt_baseline: task-aware accuracy of the untrained model per task, for FWT (or None).
    """

    def __init__(self, ctx: RunContext, options: Any, results: list[str]):
        self.ctx, self.options, self.results = ctx, options, list(results)
        self.heads = ctx.new_heads()
        self.fwt_baseline: list[float] | None = None

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def feature_kinds(cls, options: Any, results: list[str]) -> set[str]:
        """The :data:`FEATURE_KINDS` this strategy will read through
        :meth:`RunContext.frozen_features` for ``results``. The runner builds the multi-layer
        feature table only when some strategy reads ``layers``. The default finds every
        ``features`` field in ``options``, nested dataclasses included; a strategy whose results
        use only some of its options narrows it."""
        found: set[str] = set()

        def scan(obj: Any) -> None:
            if is_dataclass(obj) and not isinstance(obj, type):
                for f in fields(obj):
                    value = getattr(obj, f.name)
                    if f.name == "features" and isinstance(value, str):
                        found.add(value)
                    else:
                        scan(value)

        scan(options)
        return found

    @classmethod
    def steps(cls, n_tasks: int) -> int:
        """Training steps of this strategy on a stream of ``n_tasks`` (``joint`` has one)."""
        return n_tasks

    @property
    def n_steps(self) -> int:
        """Training steps of this run (:meth:`steps` of the stream's task count)."""
        return self.steps(self.ctx.n_tasks)

    def row(self, step: int) -> int:
        """The accuracy-matrix row that step ``step`` fills (``joint``: the last)."""
        return step

    def setup(self) -> None:  # noqa: B027 (optional hook)
        """Fresh state before the first task (not called when resuming)."""

    def before_task(self, task: int) -> None:  # noqa: B027 (optional hook)
        """Prepare task ``task``: grow the bank, freeze, add heads."""

    @abstractmethod
    def train_task(self, task: int) -> None:
        """Train on task ``task``."""

    def after_task(self, task: int) -> None:  # noqa: B027 (optional hook)
        """Update memory, indexes, gates or statistics after task ``task``."""

    def eval_tasks(self, step: int) -> range:
        """Tasks evaluated after step ``step`` (seen tasks by default)."""
        return range(self.row(step) + 1)

    @abstractmethod
    def evaluate(self, step: int, task: int, test: Examples) -> dict[str, Prediction]:
        """Predictions on ``test`` (task ``task``'s test examples) after step ``step``, per result
        name in :attr:`results`."""

    # ---------------------------------------------------------------- checkpoints
    def details(self) -> dict[str, dict[str, Any]]:
        """Per result name, JSON facts worth reporting next to its numbers in results.json
        (``details``: e.g. the knobs a router chose on validation); none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: tensors (saved to safetensors) and JSON values; heads included."""
        return {"heads": self.heads.state(), "fwt_baseline": self.fwt_baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the bank is restored by the runner)."""
        self.heads.load_state(state["heads"])
        self.heads.to(self.ctx.device)
        self.fwt_baseline = state["fwt_baseline"]

    def save_artifacts(self, folder: Path) -> None:  # noqa: B027 (optional hook)
        """Write artefacts with their own file formats (replay buffer, FAISS index) to ``folder``."""

    def load_artifacts(self, folder: Path) -> None:  # noqa: B027 (optional hook)
        """Read what :meth:`save_artifacts` wrote.

        Raises:
            FileNotFoundError: an artefact this strategy needs is missing (names it).
        """
