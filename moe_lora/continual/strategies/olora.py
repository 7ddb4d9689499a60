"""``olora``: O-LoRA (Wang et al., EMNLP 2023 Findings, arXiv 2310.14152).

A new expert per task; the earlier ones are frozen; the loss adds ``lambda1 * sum |A_new A_old^T|``
(orthogonal subspaces, :func:`moe_lora.continual.olora.olora_loss`) and ``lambda2 * |A_new|^2``.
At inference every expert acts with weight 1 (their sum), through the shared head.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_lora.continual.module import OLoRATerms, TrainPlan
from moe_lora.continual.prepared import Examples
from moe_lora.continual.registry import register_strategy
from moe_lora.continual.settings import check_finite
from moe_lora.continual.strategies.shared import SharedHeadStrategy

__all__ = ["OLoRA", "OLoRAOptions"]


@dataclass
class OLoRAOptions:
    """``strategies.olora``: orthogonality weight ``lambda1``, L2 weight ``lambda2``."""

    lambda1: float = 0.5
    lambda2: float = 0.0

    def __post_init__(self) -> None:
        check_finite(self, "strategies.olora")


@register_strategy("olora", options=OLoRAOptions)
class OLoRA(SharedHeadStrategy):
    """An orthogonal expert per task, all summed, one shared head."""

    options: OLoRAOptions
    shared_expert = False
    eval_routing = "sum"

    def before_task(self, task: int) -> None:
        super().before_task(task)
        self.ctx.bank.freeze()
        self.expert = self.ctx.bank.add_expert(f"task{task + 1}", self.ctx.expert_config(),
                                               task=task)

    def plan(self, task: int, train: Examples) -> TrainPlan:
        o = self.options
        terms = OLoRATerms(self.expert, tuple(range(self.expert)), o.lambda1, o.lambda2)
        classes = tuple(sorted(set(train.labels.tolist())))
        return TrainPlan(routing="sum", active=self.expert, train_classes=classes, olora=terms,
                         tag=f"olora/task{task + 1}")
