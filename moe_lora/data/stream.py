"""The task stream every continual-learning strategy consumes.

A :class:`TaskStream` is an ordered list of :class:`Task` s. Each task has its own classes and a
fixed train/val/test :class:`Split`. Labels are **global** class ids (``0..n_classes-1``, indices into
``TaskStream.class_names``), so a task-agnostic evaluation can predict over every class seen so far;
``Task.to_local`` / ``Task.to_global`` map them to a task's own ``0..len(classes)-1`` for per-task heads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Split", "Task", "TaskStream"]


@dataclass
class Split:
    """The examples of one split of one task.

    Attributes:
        inputs: ``N`` texts, or a float tensor ``[N, D]`` of features.
        labels: ``[N]`` long tensor of global class ids.

    Raises:
        ValueError: ``labels`` is not a 1-D integer tensor, or its length differs from ``inputs``.
    """

    inputs: list[str] | Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.labels.dim() != 1 or self.labels.dtype != torch.long:
            raise ValueError(
                f"Split.labels must be a 1-D long tensor, got {tuple(self.labels.shape)} "
                f"{self.labels.dtype}"
            )
        if len(self.inputs) != len(self.labels):
            raise ValueError(
                f"Split.inputs has {len(self.inputs)} items but labels has {len(self.labels)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: Sequence[int] | Tensor) -> Split:
        """Return the examples at ``index`` (a list of positions or a ``[K]`` long tensor)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        if isinstance(self.inputs, Tensor):
            return Split(self.inputs[idx], self.labels[idx])
        return Split([self.inputs[i] for i in idx.tolist()], self.labels[idx])

    @staticmethod
    def concat(splits: Sequence[Split]) -> Split:
        """Concatenate splits of the same input kind (texts or feature tensors).

        Raises:
            ValueError: ``splits`` is empty or mixes texts and tensors.
        """
        if not splits:
            raise ValueError("Split.concat needs at least one split")
        labels = torch.cat([s.labels for s in splits])
        if all(isinstance(s.inputs, Tensor) for s in splits):
            return Split(torch.cat([s.inputs for s in splits]), labels)  # type: ignore[misc]
        if any(isinstance(s.inputs, Tensor) for s in splits):
            raise ValueError("Split.concat cannot mix text inputs and tensor inputs")
        return Split([x for s in splits for x in s.inputs], labels)


@dataclass
class Task:
    """One task of a stream.

    Attributes:
        task_id: position in the stream (``0..n_tasks-1``).
        name: a readable name.
        classes: the task's class names, in local-label order.
        train, val, test: the fixed splits; their labels are global class ids.
        class_ids: the global id of each class in ``classes``; filled by :class:`TaskStream`
            from its ``class_names`` when left empty.
    """

    task_id: int
    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    class_ids: list[int] = field(default_factory=list)

    def to_local(self, labels: Tensor) -> Tensor:
        """Map global class ids ``[N]`` to this task's local ids ``[N]`` (``0..len(classes)-1``).

        Raises:
            ValueError: a label is not one of this task's classes.
        """
        ids = torch.as_tensor(self.class_ids, dtype=torch.long, device=labels.device)
        match = labels.unsqueeze(-1) == ids  # [N, C]
        if not bool(match.any(-1).all()):
            bad = sorted(set(labels[~match.any(-1)].tolist()))
            raise ValueError(f"task {self.task_id}: labels {bad} are not among {self.class_ids}")
        return match.long().argmax(-1)

    def to_global(self, local: Tensor) -> Tensor:
        """Map local ids ``[N]`` (``0..len(classes)-1``) back to global class ids ``[N]``."""
        ids = torch.as_tensor(self.class_ids, dtype=torch.long, device=local.device)
        return ids[local]


@dataclass
class TaskStream:
    """An ordered list of tasks over a shared set of classes.

    Attributes:
        tasks: the tasks, ``tasks[t].task_id == t``.
        class_names: every class; a class's global id is its index here.
        benchmark: the stream's name, e.g. ``"split-wordnet"``.

    Raises:
        ValueError: task ids are not ``0..n-1``, a task's class is unknown, ``class_ids`` disagree
            with ``class_names``, or a split holds a label outside its task's classes.
    """

    tasks: list[Task]
    class_names: list[str]
    benchmark: str

    def __post_init__(self) -> None:
        index = {name: i for i, name in enumerate(self.class_names)}
        if len(index) != len(self.class_names):
            raise ValueError(f"{self.benchmark}: class_names has duplicates")
        for t, task in enumerate(self.tasks):
            if task.task_id != t:
                raise ValueError(f"{self.benchmark}: tasks[{t}] has task_id {task.task_id}")
            unknown = [c for c in task.classes if c not in index]
            if unknown:
                raise ValueError(f"{self.benchmark}: task {t} has unknown classes {unknown}")
            expected = [index[c] for c in task.classes]
            if not task.class_ids:
                task.class_ids = expected
            elif task.class_ids != expected:
                raise ValueError(f"{self.benchmark}: task {t} class_ids disagree with class_names")
            for split_name in ("train", "val", "test"):
                labels = getattr(task, split_name).labels
                if not torch.isin(labels, torch.tensor(expected, dtype=torch.long)).all():
                    raise ValueError(
                        f"{self.benchmark}: task {t} {split_name} has labels outside its classes"
                    )

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, t: int) -> Task:
        return self.tasks[t]

    @property
    def n_classes(self) -> int:
        """Number of classes over all tasks."""
        return len(self.class_names)

    def seen_class_ids(self, upto_task: int) -> list[int]:
        """Global ids of the classes of tasks ``0..upto_task``, sorted (task-agnostic evaluation)."""
        return sorted({c for task in self.tasks[: upto_task + 1] for c in task.class_ids})

    def joint_task(self) -> Task:
        """All tasks merged into one (the multi-task upper bound); labels stay global ids."""
        return Task(
            task_id=0,
            name="joint",
            classes=list(self.class_names),
            train=Split.concat([t.train for t in self.tasks]),
            val=Split.concat([t.val for t in self.tasks]),
            test=Split.concat([t.test for t in self.tasks]),
            class_ids=list(range(self.n_classes)),
        )
