"""A new continual strategy in one file: a linear probe on the frozen base (no LoRA at all).

A strategy is a class on :class:`~moe_lora.continual.strategies.base.Strategy` (here its
shared-head subclass), its options a dataclass, and one ``register_strategy`` line makes both
known: ``strategies.run=[probe]`` runs it and ``strategies.probe.*`` configures it.

    python examples/custom_strategy.py            # Split-Digits, about 10 s on 2 CPU cores
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass

from moe_lora.continual.console import configure_console
from moe_lora.continual.module import TrainPlan
from moe_lora.continual.prepared import Examples
from moe_lora.continual.registry import register_strategy
from moe_lora.continual.runner import run_continual
from moe_lora.continual.settings import check, load_config
from moe_lora.continual.strategies.shared import SharedHeadStrategy


@dataclass
class ProbeOptions:
    """``strategies.probe``: the loss covers the task's classes (``task``) or all seen (``seen``)."""

    classes: str = "task"

    def __post_init__(self) -> None:
        check(self.classes in ("task", "seen"), "strategies.probe.classes", "must be task or seen")


@register_strategy("probe", options=ProbeOptions)
class Probe(SharedHeadStrategy):
    """Only the shared head trains; the base model stays exactly as it was."""

    options: ProbeOptions
    shared_expert = False  # no LoRA expert: the routing is the bare base model
    eval_routing = "base"

    def plan(self, task: int, train: Examples) -> TrainPlan:
        ids = self.ctx.tasks[task].task.class_ids if self.options.classes == "task" \
            else self.ctx.seen_classes(task)
        return TrainPlan(routing="base", train_classes=tuple(ids), tag=f"probe/task{task + 1}")


def main(argv: list[str]) -> dict:
    """Run ``naive`` and ``probe`` on Split-Digits (``key=value`` overrides in ``argv``)."""
    configure_console()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("configs/split_digits.yaml",
                          [f"output.dir={out}", "strategies.run=[naive,probe]",
                           "output.plots=false", *argv])
        return run_continual(cfg, progress=False)


if __name__ == "__main__":
    main(sys.argv[1:])
