"""Strategies with one shared head over every class: ``naive``, ``joint`` (and ``replay``, ``olora``
in their own files build on :class:`SharedHeadStrategy`).

They report two settings: task-agnostic (argmax over every class seen so far, their result) and
task-aware (argmax over the evaluated task's classes, under ``task_aware``), and evaluate the next
task too, for forward transfer.
"""

from __future__ import annotations

from moe_lora.continual.evaluation import class_mask, predict_shared
from moe_lora.continual.module import TrainPlan
from moe_lora.continual.prepared import Examples
from moe_lora.continual.registry import register_strategy
from moe_lora.continual.strategies.base import Prediction, Strategy

__all__ = ["Joint", "Naive", "SharedHeadStrategy"]


class SharedHeadStrategy(Strategy):
    """One head over every class, created up front; one ``shared`` expert unless
    :attr:`shared_expert` is False. Subclasses say what each task trains on."""

    shared_expert = True
    eval_routing = "single"

    def setup(self) -> None:
        for task in self.ctx.tasks:
            self.heads.add(task.task.class_ids)
        if self.shared_expert:
            self.ctx.bank.add_expert("shared", self.ctx.expert_config(), task="all")
        self.fwt_baseline = self._baseline()

    def _baseline(self) -> list[float]:
        """Task-aware accuracy of the untrained model on every task (FWT's ``b_j``)."""
        module = self.ctx.module(self.heads, TrainPlan(routing="base"))
        out = []
        for pt in self.ctx.tasks:
            own = class_mask(self.ctx.n_classes, pt.task.class_ids)
            aware, _ = predict_shared(module, pt.test, own, own, "base")
            out.append(float((aware.cpu() == pt.test.labels).double().mean()))
        return out

    def before_task(self, task: int) -> None:
        for h in range(len(self.heads)):
            self.heads.set_trainable(h, True)
        if self.shared_expert:
            self.ctx.bank.unfreeze("shared")

    def train_data(self, task: int) -> tuple[Examples, Examples]:
        """(train, val) examples of step ``task``."""
        pt = self.ctx.tasks[task]
        return pt.train, pt.val

    def plan(self, task: int, train: Examples) -> TrainPlan:
        """The fit's plan: the shared expert, loss over the classes present in ``train``."""
        classes = tuple(sorted(set(train.labels.tolist())))
        return TrainPlan(routing="single", active=0, train_classes=classes,
                         tag=f"{self.results[0]}/task{task + 1}")

    def train_task(self, task: int) -> None:
        train, val = self.train_data(task)
        module = self.ctx.module(self.heads, self.plan(task, train))
        self.ctx.fit(module, train, val, module.plan.tag, self.ctx.seed(task))

    def eval_tasks(self, step: int) -> range:
        """Seen tasks plus the next one (task-aware, for FWT)."""
        return range(min(self.row(step) + 2, self.ctx.n_tasks))

    def evaluate(self, step: int, task: int, test: Examples) -> dict[str, Prediction]:
        ctx = self.ctx
        module = ctx.module(self.heads, TrainPlan(routing=self.eval_routing))
        own = class_mask(ctx.n_classes, ctx.tasks[task].task.class_ids)
        seen = class_mask(ctx.n_classes, ctx.seen_classes(self.row(step)))
        aware, agnostic = predict_shared(module, test, own, seen, self.eval_routing,
                                         ctx.cfg.train.eval_batch_size)
        return {self.results[0]: Prediction(classes=agnostic, task_aware=aware, within=aware)}


@register_strategy("naive")
class Naive(SharedHeadStrategy):
    """One LoRA expert and one head, trained task after task (the forgetting lower bound)."""


@register_strategy("joint")
class Joint(SharedHeadStrategy):
    """One LoRA expert trained on every task at once (the multi-task upper bound)."""

    @classmethod
    def steps(cls, n_tasks: int) -> int:
        return 1

    def row(self, step: int) -> int:
        return self.ctx.n_tasks - 1

    def eval_tasks(self, step: int) -> range:
        return range(self.ctx.n_tasks)

    def train_data(self, task: int) -> tuple[Examples, Examples]:
        tasks = self.ctx.tasks
        return (Examples.concat([pt.train for pt in tasks]),
                Examples.concat([pt.val for pt in tasks]))
