"""Split-Digits: scikit-learn's 8x8 handwritten digits as a seconds-fast continual benchmark.

1,797 images of 10 digits (``sklearn.datasets.load_digits``, shipped with scikit-learn), flattened to
64 float32 features in ``[0, 1]``; by default 5 tasks of 2 digits each (0/1, 2/3, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits

from moe_lora.data.stream import Split, Task, TaskStream

__all__ = ["DigitsStreamConfig", "build_digits_stream"]

_N_DIGITS = 10


@dataclass
class DigitsStreamConfig:
    """Split-Digits stream.

    Attributes:
        n_tasks: number of tasks.
        classes_per_task: digits per task; ``n_tasks * classes_per_task <= 10``.
        val_fraction, test_fraction: share of each digit's images in val and test (stratified).
        shuffle_classes: draw the digit order with ``seed`` instead of 0, 1, ..., 9.
        seed: fixes the split (and the digit order when ``shuffle_classes``).

    Raises:
        ValueError: a field is out of range (the message names it).
    """

    n_tasks: int = 5
    classes_per_task: int = 2
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    shuffle_classes: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_tasks", "classes_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"DigitsStreamConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.n_tasks * self.classes_per_task > _N_DIGITS:
            raise ValueError(
                f"DigitsStreamConfig.n_tasks * classes_per_task must be <= {_N_DIGITS}, got "
                f"{self.n_tasks} * {self.classes_per_task}"
            )
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(
                    f"DigitsStreamConfig.{name} must be in [0, 1), got {getattr(self, name)}"
                )
        if self.test_fraction == 0.0 or self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "DigitsStreamConfig.test_fraction must be > 0 and val_fraction + test_fraction < 1"
            )


def build_digits_stream(cfg: DigitsStreamConfig) -> TaskStream:
    """Build Split-Digits: inputs ``[N, 64]`` float32 in ``[0, 1]``, labels = global class ids.

    A class's global id is its position in the digit order (the digit itself unless
    ``shuffle_classes``); class names are the digits as strings.
    """
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = (
        torch.randperm(_N_DIGITS, generator=gen) if cfg.shuffle_classes else torch.arange(_N_DIGITS)
    )
    digits = order[: cfg.n_tasks * cfg.classes_per_task].tolist()
    parts: dict[int, tuple[list[int], list[int], list[int]]] = {}
    for gid, digit in enumerate(digits):
        idx = torch.nonzero(y == digit).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)].tolist()
        n_test, n_val = round(len(idx) * cfg.test_fraction), round(len(idx) * cfg.val_fraction)
        parts[gid] = (idx[n_test + n_val :], idx[n_test : n_test + n_val], idx[:n_test])
    tasks = []
    for t in range(cfg.n_tasks):
        ids = list(range(t * cfg.classes_per_task, (t + 1) * cfg.classes_per_task))
        splits = []
        for k in range(3):
            rows = torch.tensor([i for g in ids for i in parts[g][k]], dtype=torch.long)
            local = torch.tensor([g for g in ids for _ in parts[g][k]], dtype=torch.long)
            perm = torch.randperm(len(rows), generator=gen)
            splits.append(Split(x[rows[perm]], local[perm]))
        names = [str(digits[g]) for g in ids]
        tasks.append(Task(t, "digits " + "/".join(names), names, *splits, class_ids=ids))
    return TaskStream(tasks, [str(d) for d in digits], "split-digits")
