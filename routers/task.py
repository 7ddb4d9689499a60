"""Task-id routing: the known task of each sample picks its experts (task-incremental learning).

The mapping task -> experts is read from the bank at every call (``ExpertInfo.task``), so an
expert added for a new task is routed to at once. A task served by several experts gets their
uniform average; :meth:`TaskRouter.average` gives the uniform average of chosen experts to every
sample (e.g. when the task is unknown at test time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moe_lora.core.routing import RouterInput, RouterOutput, Routing, register_router

from .base import TaskRouterConfig, WeightLog, bank_device, batch_size, dense_weights

if TYPE_CHECKING:
    from moe_lora.core.bank import ExpertBank

__all__ = ["TaskRouter", "UnknownTaskError"]


class UnknownTaskError(LookupError):
    """A sample's task id has no expert in the bank."""


@register_router("task")
class TaskRouter(WeightLog):
    """Route each sample to the experts trained for its task (``ExpertInfo.task``).

    Args:
        config: the :class:`TaskRouterConfig`.
        bank: the expert bank; read at every call, so it may grow.

    ``route`` requires ``RouterInput.task_ids`` [B] (unless ``config.fallback == "uniform"``)
    and returns ``indices`` [B, k] / ``weights`` [B, k] (``k`` the most experts of one task;
    padding index ``-1``, weight 0); ``last_weights`` is the same decision dense, [B, E].
    """

    config_class = TaskRouterConfig

    def __init__(self, config: TaskRouterConfig, bank: ExpertBank):
        self.config = config
        self.bank = bank
        self.last_weights: Tensor | None = None

    def experts_of(self) -> dict[object, list[int]]:
        """Task -> bank indices of its experts, from the bank's current metadata."""
        out: dict[object, list[int]] = {}
        for i, info in enumerate(self.bank.experts):
            if info.task is not None:
                out.setdefault(info.task, []).append(i)
        return out

    def _chosen(self) -> list[int]:
        names = self.config.experts if self.config.experts is not None else self.bank.names
        return [self.bank.index(n) for n in names]

    def route(self, batch: RouterInput) -> RouterOutput:
        """Experts of each sample's task, uniformly weighted.

        Raises:
            UnknownTaskError: a task id has no expert and ``fallback == "error"``, or task ids
                are missing (the message lists the known tasks).
        """
        if batch.task_ids is None:
            if self.config.fallback == "error":
                raise UnknownTaskError("TaskRouter needs RouterInput.task_ids")
            return self.average(batch_size(batch))
        table = self.experts_of()
        rows = []
        for t in batch.task_ids.tolist():
            ids = table.get(t)
            if ids is None:
                if self.config.fallback == "error":
                    raise UnknownTaskError(
                        f"no expert for task {t!r}; the bank knows tasks {sorted(table, key=str)}"
                    )
                ids = self._chosen()
            rows.append(ids)
        return self._output(rows)

    def average(self, batch_size: int) -> RouterOutput:
        """The uniform average of ``config.experts`` (default: all) for ``batch_size`` samples."""
        return self._output([self._chosen()] * batch_size)

    def routing(self, batch: RouterInput) -> Routing:
        """The :class:`Routing` to apply for ``batch``."""
        return Routing.from_output(self.route(batch)).for_layout(self.bank.ctx.layout)

    def _output(self, rows: list[list[int]]) -> RouterOutput:
        k = max(len(r) for r in rows)
        indices = torch.full((len(rows), k), -1, dtype=torch.long)
        weights = torch.zeros(len(rows), k)
        for b, ids in enumerate(rows):
            indices[b, : len(ids)] = torch.tensor(ids)
            weights[b, : len(ids)] = 1.0 / len(ids)
        self.last_weights = dense_weights(indices, weights, len(self.bank))
        device = bank_device(self.bank)
        return RouterOutput(weights=weights.to(device), indices=indices.to(device))
