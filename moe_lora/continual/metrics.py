"""Continual-learning metrics: the accuracy matrix and the numbers the field derives from it.

``R[i][j]`` is the accuracy on task ``j``'s test set after training on task ``i`` (``T`` tasks).
The :class:`AccuracyMatrix` and :class:`RouterAccuracy` metrics keep correct/total counts as
torchmetrics states summed across processes, so DDP ranks that each evaluate a shard agree exactly.
The scalar metrics are pure functions of ``R``:

- average accuracy ``A = 1/T sum_j R[T-1][j]``;
- forgetting ``F = 1/(T-1) sum_{j<T-1} max_{j<=l<T-1} R[l][j] - R[T-1][j]`` (Chaudhry et al. 2018,
  "Riemannian Walk", arXiv 1801.10112);
- backward transfer ``BWT = 1/(T-1) sum_{j<T-1} R[T-1][j] - R[j][j]`` and forward transfer
  ``FWT = 1/(T-1) sum_{j>0} R[j-1][j] - b_j`` (Lopez-Paz & Ranzato 2017, GEM, arXiv 1706.08840;
  the same definitions as Avalanche's ``bwt``/``forward_transfer`` metrics).

Entries never evaluated are ``nan``. The functions use the leading ``k x k`` block, where ``k`` is
the number of rows holding any value, so they also work on a run stopped after ``k`` tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "AccuracyMatrix",
    "RouterAccuracy",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
]

MatrixLike = Tensor | Sequence[Sequence[float]]


def _as_labels(preds: Tensor) -> Tensor:
    """``[N]`` class ids, or ``[N, C]`` scores reduced by argmax."""
    return preds.argmax(-1) if preds.dim() == 2 else preds


class AccuracyMatrix(Metric):
    """The accuracy matrix ``R [T, T]`` of a continual run, synced across processes.

    Args:
        n_tasks: ``T``.

    ``update(train_task, eval_task, preds, target)`` adds a batch evaluated after training task
    ``train_task`` on task ``eval_task``'s test set: ``preds`` ``[N]`` class ids or ``[N, C]`` scores,
    ``target`` ``[N]``. ``compute()`` returns ``R`` ``[T, T]`` float64, ``nan`` where not evaluated.

    Raises:
        ValueError: ``n_tasks < 1``, a task index is out of range, or shapes differ.
    """

    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, n_tasks: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if n_tasks < 1:
            raise ValueError(f"AccuracyMatrix.n_tasks must be >= 1, got {n_tasks}")
        self.n_tasks = n_tasks
        zeros = torch.zeros(n_tasks, n_tasks, dtype=torch.long)
        self.add_state("correct", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("total", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, train_task: int, eval_task: int, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        for name, t in (("train_task", train_task), ("eval_task", eval_task)):
            if not 0 <= t < self.n_tasks:
                raise ValueError(f"AccuracyMatrix.update: {name}={t} not in [0, {self.n_tasks})")
        labels = _as_labels(preds)
        if labels.shape != target.shape:
            raise ValueError(
                f"AccuracyMatrix.update: preds {tuple(preds.shape)} do not match target "
                f"{tuple(target.shape)}"
            )
        self.correct[train_task, eval_task] += (labels == target).sum()
        self.total[train_task, eval_task] += target.numel()

    def compute(self) -> Tensor:
        r = self.correct.double() / self.total.double()
        return torch.where(self.total > 0, r, torch.full_like(r, float("nan")))


class RouterAccuracy(Metric):
    """Share of samples routed to their own task's expert, synced across processes.

    ``update(routed, true_task)``: ``routed`` ``[N]`` the task of the chosen expert, or ``[N, E]``
    routing weights (argmax; expert ``e`` serves task ``e``); ``true_task`` ``[N]``.
    ``compute()`` returns a scalar float64 tensor, ``nan`` before any update.
    """

    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, routed: Tensor, true_task: Tensor) -> None:  # type: ignore[override]
        chosen = _as_labels(routed)
        if chosen.shape != true_task.shape:
            raise ValueError(
                f"RouterAccuracy.update: routed {tuple(routed.shape)} does not match true_task "
                f"{tuple(true_task.shape)}"
            )
        self.correct += (chosen == true_task).sum()
        self.total += true_task.numel()

    def compute(self) -> Tensor:
        if self.total == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.correct.double() / self.total.double()


def _completed(r: MatrixLike) -> Tensor:
    """The leading ``k x k`` block of ``R``, ``k`` = number of rows with any finite value."""
    m = torch.as_tensor(r, dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"accuracy matrix must be square [T, T], got {tuple(m.shape)}")
    filled = torch.nonzero(torch.isfinite(m).any(1)).flatten()
    if len(filled) == 0:
        raise ValueError("accuracy matrix has no evaluated entry")
    k = int(filled[-1]) + 1
    return m[:k, :k]


def average_accuracy(r: MatrixLike) -> float:
    """Mean accuracy over the seen tasks after the last task: ``mean_j R[T-1][j]`` (nan ignored).

    Raises:
        ValueError: ``r`` is not square or holds no value.
    """
    m = _completed(r)
    return float(torch.nanmean(m[-1]))


def forgetting(r: MatrixLike) -> float:
    """Average forgetting (Chaudhry et al. 2018, arXiv 1801.10112, Eq. 9-10).

    ``F = 1/(T-1) sum_{j<T-1} (max_{j<=l<T-1} R[l][j]) - R[T-1][j]``: how far each earlier task
    fell from its best accuracy since it was learned. ``0.0`` when ``T == 1``.
    """
    m = _completed(r)
    t = m.shape[0]
    if t == 1:
        return 0.0
    drops = [_nanmax(m[j : t - 1, j]) - m[t - 1, j] for j in range(t - 1)]
    return float(torch.nanmean(torch.stack(drops)))


def _nanmax(x: Tensor) -> Tensor:
    """Max over the finite entries of ``x``; ``nan`` when there is none."""
    finite = x[torch.isfinite(x)]
    return finite.max() if finite.numel() else torch.tensor(float("nan"), dtype=x.dtype)


def backward_transfer(r: MatrixLike) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017, arXiv 1706.08840).

    ``BWT = 1/(T-1) sum_{j<T-1} R[T-1][j] - R[j][j]``; negative means forgetting. ``0.0`` when
    ``T == 1``.
    """
    m = _completed(r)
    t = m.shape[0]
    if t == 1:
        return 0.0
    return float(torch.nanmean(m[t - 1, : t - 1] - torch.diagonal(m)[: t - 1]))


def forward_transfer(r: MatrixLike, baseline: Sequence[float] | Tensor | None) -> float | None:
    """Forward transfer (Lopez-Paz & Ranzato 2017, arXiv 1706.08840).

    ``FWT = 1/(T-1) sum_{j>0} R[j-1][j] - b_j`` with ``b_j`` the accuracy on task ``j`` of the model
    before any training (``baseline``, length ``>= T``). Returns ``None`` without a baseline, for
    ``T == 1``, or when no ``R[j-1][j]`` was evaluated.
    """
    if baseline is None:
        return None
    m = _completed(r)
    t = m.shape[0]
    b = torch.as_tensor(baseline, dtype=torch.float64)
    if b.numel() < t:
        raise ValueError(f"forward_transfer: baseline has {b.numel()} values for {t} tasks")
    gains = torch.stack([m[j - 1, j] - b[j] for j in range(1, t)]) if t > 1 else torch.empty(0)
    if not torch.isfinite(gains).any():
        return None
    return float(torch.nanmean(gains))
