"""What a strategy's run has measured so far, per result: the matrices behind every reported number.

For each result name and each *measure* the record keeps a ``T x T`` matrix, row ``i`` filled
after step ``i``, column ``j`` on task ``j``'s test set (``nan``: not evaluated):

- ``accuracy``: accuracy in the result's own setting (``R``; AA, forgetting, BWT, FWT come from it);
- ``task_aware``: accuracy with the task id given (shared-head strategies);
- ``tp``: task prediction, the share of inputs whose most-weighted task (expert) is their own;
- ``wp``: within-task accuracy, when the right task's expert and classes are used.

Counts are :class:`~moe_lora.continual.metrics.AccuracyMatrix` states summed across processes, so
every DDP rank evaluating a shard ends with the same record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moe_lora.continual.metrics import (
    AccuracyMatrix,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)
from moe_lora.continual.registry import StrategySpec
from moe_lora.continual.strategies.base import Prediction

__all__ = ["MEASURES", "StepMetrics", "StrategyRecord"]

MEASURES = ("accuracy", "task_aware", "tp", "wp")
Matrix = list[list[float]]


def _nan_matrix(n: int) -> Matrix:
    return [[math.nan] * n for _ in range(n)]


class StepMetrics:
    """The counts of one evaluation step (row), one :class:`AccuracyMatrix` per result and measure."""

    def __init__(self, results: list[str], n_tasks: int, task_of_class: Tensor):
        self.n_tasks, self.task_of_class = n_tasks, task_of_class
        self.metrics = {(r, m): AccuracyMatrix(n_tasks) for r in results for m in MEASURES}

    def update(self, result: str, row: int, task: int, pred: Prediction, labels: Tensor,
               tasks: Tensor) -> None:
        """Add result ``result``'s predictions on a shard of task ``task``'s test set."""
        if task <= row:
            self.metrics[result, "accuracy"].update(row, task, pred.classes.cpu(), labels)
            if pred.task_weights is not None:
                chosen = pred.task_weights.argmax(-1).cpu()
            else:
                chosen = self.task_of_class[pred.classes.cpu().clamp_min(0)]
            self.metrics[result, "tp"].update(row, task, chosen, tasks)
            if pred.within is not None:
                self.metrics[result, "wp"].update(row, task, pred.within.cpu(), labels)
        if pred.task_aware is not None:
            self.metrics[result, "task_aware"].update(row, task, pred.task_aware.cpu(), labels)

    def compute(self, row: int) -> dict[tuple[str, str], list[float] | None]:
        """Row ``row`` of every matrix that was updated (synced across processes)."""
        n = self.n_tasks  # torchmetrics squeezes a 1 x 1 result to a scalar: shape it back
        return {key: m.compute().reshape(n, n)[row].tolist() if m.update_called else None
                for key, m in self.metrics.items()}


@dataclass
class StrategyRecord:
    """A strategy's progress and matrices (saved in its checkpoint as JSON).

    Attributes:
        strategy: registry name. results: result names. completed: steps done.
        train_seconds: training time so far. matrices: result -> measure -> ``T x T``.
    """

    strategy: str
    results: list[str]
    n_tasks: int
    completed: int = 0
    train_seconds: float = 0.0
    matrices: dict[str, dict[str, Matrix]] = field(default_factory=dict)

    def set_row(self, row: int, values: dict[tuple[str, str], list[float] | None]) -> None:
        """Store one evaluated row of every (result, measure) that has values."""
        for (result, measure), vals in values.items():
            if vals is not None:
                per = self.matrices.setdefault(result, {})
                per.setdefault(measure, _nan_matrix(self.n_tasks))[row] = vals

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"strategy": self.strategy, "results": self.results, "n_tasks": self.n_tasks,
                "completed": self.completed, "train_seconds": self.train_seconds,
                "matrices": self.matrices}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StrategyRecord:
        """Inverse of :meth:`to_json`."""
        return cls(**d)

    def entries(self, spec: StrategySpec, baseline: list[float] | None,
                last_row: int) -> dict[str, dict[str, Any]]:
        """results.json entries: per result, its setting, summary numbers and matrices."""
        out = {}
        for result in self.results:
            m = self.matrices.get(result, {})
            entry: dict[str, Any] = {"strategy": self.strategy, "setting": spec.setting_of(result),
                                     "train_seconds": round(self.train_seconds, 1)}
            entry |= _summary(m["accuracy"], None, last_row) if "accuracy" in m else {}
            for measure in ("tp", "wp"):
                entry |= _routing(m.get(measure), measure, last_row)
            if "task_aware" in m:
                entry["task_aware"] = _summary(m["task_aware"], baseline, last_row)
            out[result] = entry
        return out


def _rounded(x: float | None) -> float | None:
    return None if x is None or x != x else round(float(x), 4)


def _json_matrix(r: Matrix) -> list[list[float | None]]:
    return [[_rounded(v) for v in row] for row in r]


def _summary(r: Matrix, baseline: list[float] | None, last_row: int) -> dict[str, Any]:
    """AA, forgetting, BWT, FWT of ``R`` (a joint run fills only its last row)."""
    t = torch.tensor(r, dtype=torch.float64)
    filled = int(torch.isfinite(t).any(1).sum())
    if filled <= 1:  # joint: one row, no forgetting to speak of
        row = t[last_row]
        return {"accuracy_matrix": _json_matrix(r), "average_accuracy": _rounded(row.nanmean()),
                "forgetting": None, "bwt": None, "fwt": None}
    return {"accuracy_matrix": _json_matrix(r), "average_accuracy": _rounded(average_accuracy(t)),
            "forgetting": _rounded(forgetting(t)), "bwt": _rounded(backward_transfer(t)),
            "fwt": _rounded(forward_transfer(t, baseline)) if baseline else None}


def _routing(r: Matrix | None, measure: str, last_row: int) -> dict[str, Any]:
    """``tp``/``wp``: the last row's mean over seen tasks, and that row per task."""
    if r is None:
        return {measure: None, f"{measure}_per_task": None}
    t = torch.tensor(r, dtype=torch.float64)
    rows = torch.nonzero(torch.isfinite(t).any(1)).flatten()
    row = t[int(rows[-1])] if len(rows) else t[last_row]
    return {measure: _rounded(row.nanmean()), f"{measure}_per_task": [_rounded(v) for v in row]}
