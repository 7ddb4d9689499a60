"""Class-incremental baselines on frozen features (no LoRA, no replay, order-invariant):
``ncm`` (nearest class mean, SimpleCIL, arXiv 2303.07338) and ``ranpac`` (random projection +
ridge, RanPAC, McDonnell et al., NeurIPS 2023, arXiv 2307.02251).

Both read frozen features of every input (``features: sentence``, the default and the published
baselines: the run's embedding table, for MiniLM its sentence-transformers embedding;
``features: layers``: the multi-layer features of ``model.feature_layers``) and update class
statistics task by task; ``ranpac`` chooses its
ridge ``lambda`` on the validation split of the tasks seen so far after every task. They predict
over every class seen so far; they are the numbers the experts must beat without a task id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moe_lora.continual.prepared import Examples
from moe_lora.continual.registry import register_strategy
from moe_lora.continual.settings import check
from moe_lora.continual.strategies.base import Prediction, Strategy, check_features
from moe_lora.routers.statistics import NCMHead, RanPACHead

__all__ = ["NCM", "NCMOptions", "RanPAC", "RanPACOptions"]


@dataclass
class NCMOptions:
    """``strategies.ncm``: which frozen ``features`` the class means are taken in."""

    features: str = "sentence"

    def __post_init__(self) -> None:
        check_features(self.features, "strategies.ncm.features")


class _FrozenHead(Strategy):
    """A strategy whose whole model is a statistics head on frozen features."""

    head: Any

    def features(self, ex: Examples) -> torch.Tensor:
        """The configured frozen features of ``ex``."""
        return self.ctx.frozen_features(ex, self.options.features)

    @property
    def dim(self) -> int:
        """Width of :meth:`features`."""
        return self.ctx.feature_dim(self.options.features)

    def train_task(self, task: int) -> None:
        train = self.ctx.tasks[task].train
        self.head.update(self.features(train), train.labels)

    def evaluate(self, step: int, task: int, test: Examples) -> dict[str, Prediction]:
        cols = self.head.logits(self.features(test)).argmax(1)
        return {self.results[0]: Prediction(classes=torch.tensor(self.head.classes)[cols])}


@register_strategy("ncm", options=NCMOptions)
class NCM(_FrozenHead):
    """Cosine nearest class mean over every seen class."""

    options: NCMOptions

    def setup(self) -> None:
        self.head = NCMHead(self.dim)

    def state_dict(self) -> dict[str, Any]:
        h = self.head
        return super().state_dict() | {"ncm": {"sums": h.sums, "counts": h.counts,
                                               "classes": h.classes}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.setup()
        self.head.sums, self.head.counts = state["ncm"]["sums"], state["ncm"]["counts"]
        self.head.classes = list(state["ncm"]["classes"])


@dataclass
class RanPACOptions:
    """``strategies.ranpac``: ``n_proj`` random ReLU features, ridge ``lambdas`` to choose from,
    the frozen ``features`` it reads (``sentence`` or ``layers``)."""

    n_proj: int = 5000
    lambdas: list[float] = field(default_factory=lambda: [10.0, 100.0, 1000.0, 10000.0])
    features: str = "sentence"

    def __post_init__(self) -> None:
        check_features(self.features, "strategies.ranpac.features")
        check(self.n_proj >= 1, "strategies.ranpac.n_proj", "must be >= 1")
        check(bool(self.lambdas) and all(v > 0 for v in self.lambdas), "strategies.ranpac.lambdas",
              "must be values > 0")


@register_strategy("ranpac", options=RanPACOptions)
class RanPAC(_FrozenHead):
    """Random projection + ReLU, accumulated Gram matrix and class sums, closed-form ridge."""

    options: RanPACOptions

    def setup(self) -> None:
        self.head = RanPACHead(self.dim, self.options.n_proj,
                               seed=self.ctx.cfg.train.seed)

    def after_task(self, task: int) -> None:
        val = Examples.concat([pt.val for pt in self.ctx.tasks[: task + 1]])
        if len(val):
            self.head.select_lambda(self.features(val), val.labels, self.options.lambdas)
        else:
            self.head.fit(self.options.lambdas[0])

    def state_dict(self) -> dict[str, Any]:
        h = self.head
        return super().state_dict() | {"ranpac": {
            "gram": h.gram, "sums": h.targets.sums, "counts": h.targets.counts,
            "classes": h.classes, "lam": h.lam}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.setup()
        r = state["ranpac"]
        self.head.gram, self.head.targets.sums = r["gram"], r["sums"]
        self.head.targets.counts, self.head.targets.classes = r["counts"], list(r["classes"])
        if r["lam"] is not None:
            self.head.fit(r["lam"])
