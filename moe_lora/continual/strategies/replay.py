"""``replay``: the naive strategy plus a class-balanced replay buffer mixed into every task.

:class:`ReplayMemory` (the buffer over the run's cached training examples) is shared with the
strategies that train on exemplars after a task (``experts-mole``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_lora.continual.prepared import Examples
from moe_lora.continual.registry import register_strategy
from moe_lora.continual.settings import check
from moe_lora.continual.strategies.base import RunContext
from moe_lora.continual.strategies.shared import SharedHeadStrategy
from moe_lora.memory.replay import ReplayBuffer, ReplayConfig

__all__ = ["Replay", "ReplayMemory", "ReplayOptions"]


@dataclass
class ReplayOptions:
    """``strategies.replay``: ``size`` exemplars in all, class-balanced (CBRS reservoir)."""

    size: int = 500

    def __post_init__(self) -> None:
        check(self.size >= 1, "strategies.replay.size", "must be >= 1")


class ReplayMemory:
    """A class-balanced :class:`ReplayBuffer` of positions into the run's training examples.

    Args:
        ctx: the run context (its tasks' training examples are what the buffer points into).
        size: buffer capacity.
    """

    def __init__(self, ctx: RunContext, size: int):
        self.ctx = ctx
        self.buffer = ReplayBuffer(ReplayConfig(capacity=size, balance="class",
                                                seed=ctx.cfg.train.seed))
        sizes = [len(pt.train) for pt in ctx.tasks]
        self.offsets = [sum(sizes[:t]) for t in range(len(sizes) + 1)]
        self._pool: Examples | None = None

    @property
    def pool(self) -> Examples:
        """Every task's training examples in task order (what buffer positions point into)."""
        if self._pool is None:
            self._pool = Examples.concat([pt.train for pt in self.ctx.tasks])
        return self._pool

    def __len__(self) -> int:
        return len(self.buffer)

    def add_task(self, task: int) -> None:
        """Offer every training example of ``task`` to the buffer."""
        pt = self.ctx.tasks[task]
        pos = torch.arange(self.offsets[task], self.offsets[task + 1])[:, None]
        self.buffer.add(pt.train.labels, task, pos=pos)

    def examples(self) -> Examples:
        """The held exemplars (buffer slot order)."""
        ds = self.buffer.as_dataset()
        return self.pool.select([int(ds[i]["pos"][0]) for i in range(len(ds))])

    def save(self, folder: Path) -> None:
        """Write the buffer to ``folder/replay``."""
        self.buffer.save(folder / "replay")

    def load(self, folder: Path) -> None:
        """Read the buffer from ``folder/replay``.

        Raises:
            FileNotFoundError: the checkpoint has no ``replay/`` folder.
        """
        if not (folder / "replay").is_dir():
            raise FileNotFoundError(f"{folder}: the checkpoint has no replay/ buffer")
        self.buffer = ReplayBuffer.load(folder / "replay")


@register_strategy("replay", options=ReplayOptions)
class Replay(SharedHeadStrategy):
    """Naive sequential training with the buffer's exemplars added to each task's data."""

    options: ReplayOptions

    def setup(self) -> None:
        super().setup()
        self.memory = ReplayMemory(self.ctx, self.options.size)

    def train_data(self, task: int) -> tuple[Examples, Examples]:
        train, val = super().train_data(task)
        if len(self.memory):
            train = Examples.concat([train, self.memory.examples()])
        return train, val

    def after_task(self, task: int) -> None:
        self.memory.add_task(task)

    def save_artifacts(self, folder: Path) -> None:
        self.memory.save(folder)

    def load_artifacts(self, folder: Path) -> None:
        self.memory = ReplayMemory(self.ctx, self.options.size)
        self.memory.load(folder)
