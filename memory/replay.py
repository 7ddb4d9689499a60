"""A fixed-budget replay buffer for continual learning: reservoir sampling, optionally balanced.

Unbalanced, the buffer is Vitter's reservoir (algorithm R, ACM TOMS 1985): after ``n`` examples
have been offered, each is held with probability ``capacity / n``. Balanced per class, per task or
per (task, class) group, it follows class-balancing reservoir sampling (CBRS, Chrysakis & Moens,
ICML 2020): once the buffer is full, an example of a group that has never been the largest evicts
a random example of the largest group; an example of a group that is (or was) the largest replaces
a random example of its own group with probability ``held / seen`` of that group. The budget thus
splits evenly among the groups seen, and a group with fewer examples than its share keeps them all.

Each example is a label, a task id, optionally a text, and any named tensor fields (token ids,
features); a field's per-example tensors share dtype and trailing shape but may differ in length
(dim 0). Randomness comes from the buffer's own ``numpy.random.Generator``, whose state is saved:
``save`` then ``load`` continues exactly as the original would.

On disk: an artefact folder of :mod:`moe_lora.core.commit` (versions, a ``CURRENT`` pointer, a
writers' lock, SHA-256 of every file) whose versions hold ``replay.json`` (config, counters, RNG
state, labels, tasks, texts, field schema) and ``replay.safetensors`` (``field.<name>``: the
examples concatenated on dim 0, ``length.<name>``: each example's length).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from moe_lora.core.commit import read_version, write_version
from moe_lora.core.io import CorruptFileError, atomic_save_tensors, load_tensors, read_json

__all__ = ["MixedBatchSampler", "ReplayBuffer", "ReplayConfig", "ReplayDataset", "mixed_loader"]

_FORMAT, _VERSION = "moe_lora.replay_buffer", 2
_TENSORS, _MANIFEST = "replay.safetensors", "replay.json"
Group = tuple[int, ...]


@dataclass
class ReplayConfig:
    """Configuration of a :class:`ReplayBuffer`.

    Attributes:
        capacity: most examples held.
        balance: ``"none"`` (plain reservoir), ``"class"``, ``"task"`` or ``"task_class"`` (the
            budget is split evenly among the groups seen).
        seed: seed of the buffer's random generator.
    """

    capacity: int
    balance: Literal["none", "class", "task", "task_class"] = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"ReplayConfig.capacity must be >= 1, got {self.capacity}")
        if self.balance not in ("none", "class", "task", "task_class"):
            raise ValueError(
                "ReplayConfig.balance must be one of ('none', 'class', 'task', 'task_class'), "
                f"got {self.balance!r}"
            )


@dataclass
class _Example:
    label: int
    task: int
    text: str | None
    fields: dict[str, Tensor] = field(default_factory=dict)


class ReplayBuffer:
    """Fixed-budget store of past examples (see the module docstring).

    Args:
        config: the :class:`ReplayConfig`.
    """

    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)
        self._slots: list[_Example] = []
        self._members: dict[Group, list[int]] = {}  # group -> its slots, ascending
        self._seen: dict[Group, int] = {}
        self._full: set[Group] = set()  # groups that are or have been the largest
        self._schema: dict[str, tuple[str, tuple[int, ...]]] | None = None  # field -> dtype, shape
        self._has_text: bool | None = None

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def n_seen(self) -> int:
        """Examples offered so far."""
        return sum(self._seen.values())

    def group_counts(self) -> dict[Group, int]:
        """Examples held per group (``()`` for ``balance="none"``, else ``(label,)``, ``(task,)``
        or ``(task, label)``)."""
        return {g: len(s) for g, s in sorted(self._members.items()) if s}

    def _group(self, label: int, task: int) -> Group:
        return {"none": (), "class": (label,), "task": (task,), "task_class": (task, label)}[
            self.config.balance
        ]

    # ----------------------------------------------------------------- adding
    def add(
        self,
        labels: Tensor | Sequence[int],
        tasks: int | Tensor | Sequence[int],
        texts: Sequence[str] | None = None,
        **fields: Tensor | Sequence[Tensor],
    ) -> None:
        """Offer N examples, in order, to the buffer.

        Args:
            labels: ``[N]`` integer labels.
            tasks: one task id for all, or ``[N]``.
            texts: N strings, if the examples carry text (then every call must give texts).
            **fields: named tensors ``[N, ...]``, or N tensors each ``[L_i, ...]`` (ragged).

        Raises:
            ValueError: lengths differ, or texts / fields / dtypes / trailing shapes differ from
                the first call's.
        """
        label_list = _ints(labels)
        n = len(label_list)
        task_list = [int(tasks)] * n if isinstance(tasks, int | np.integer) else _ints(tasks)
        per_field = {name: _split(name, value, n) for name, value in fields.items()}
        self._check_schema(n, task_list, texts, per_field)
        for i in range(n):
            text = None if texts is None else str(texts[i])
            parts = {k: v[i] for k, v in per_field.items()}
            self._offer(_Example(label_list[i], task_list[i], text, parts))

    def _check_schema(
        self,
        n: int,
        tasks: list[int],
        texts: Sequence[str] | None,
        fields: dict[str, list[Tensor]],
    ) -> None:
        if len(tasks) != n or (texts is not None and len(texts) != n):
            raise ValueError(f"labels, tasks and texts must all have length {n}")
        schema = {k: (str(v[0].dtype), tuple(v[0].shape[1:])) for k, v in fields.items() if v}
        for name, parts in fields.items():
            if any((str(t.dtype), tuple(t.shape[1:])) != schema[name] for t in parts):
                raise ValueError(f"field {name!r}: examples differ in dtype or trailing shape")
        if self._schema is None and n:
            self._schema, self._has_text = schema, texts is not None
        if n and (schema != self._schema or (texts is not None) != self._has_text):
            raise ValueError(
                f"examples must keep the fields of the first call: {self._schema} "
                f"(texts: {self._has_text}); got {schema} (texts: {texts is not None})"
            )

    def _offer(self, example: _Example) -> None:
        group = self._group(example.label, example.task)
        self._seen[group] = self._seen.get(group, 0) + 1
        if len(self._slots) < self.config.capacity:
            self._place(len(self._slots), example, group)
        elif group not in self._full:
            self._place(self._random_member(self._largest()), example, group)
        else:
            held = len(self._members.get(group, []))
            if self._rng.integers(self._seen[group]) < held:
                self._place(self._random_member(group), example, group)
        self._mark_full()

    def _largest(self) -> Group:
        top = max(len(s) for s in self._members.values())
        tied = sorted(g for g, s in self._members.items() if len(s) == top)
        return tied[int(self._rng.integers(len(tied)))]

    def _random_member(self, group: Group) -> int:
        members = self._members[group]
        return members[int(self._rng.integers(len(members)))]

    def _place(self, slot: int, example: _Example, group: Group) -> None:
        if slot == len(self._slots):
            self._slots.append(example)
        else:
            old = self._slots[slot]
            self._members[self._group(old.label, old.task)].remove(slot)
            self._slots[slot] = example
        bisect.insort(self._members.setdefault(group, []), slot)

    def _mark_full(self) -> None:
        top = max(len(s) for s in self._members.values())
        self._full.update(g for g, s in self._members.items() if len(s) == top)

    # ----------------------------------------------------------------- reading
    def as_dataset(self) -> ReplayDataset:
        """A snapshot of the held examples as a map-style dataset (slot order)."""
        return ReplayDataset(list(self._slots))

    # ----------------------------------------------------------------- persistence
    def save(self, folder: str | Path) -> None:
        """Commit ``replay.json`` and ``replay.safetensors`` as one new version of the artefact
        folder ``folder`` (:func:`moe_lora.core.commit.write_version`).

        Raises:
            moe_lora.core.commit.LockTimeoutError: another process kept the folder locked.
        """
        tensors: dict[str, Tensor] = {}
        for name in self._schema or {}:
            parts = [ex.fields[name] for ex in self._slots]
            tensors[f"field.{name}"] = torch.cat(parts)
            tensors[f"length.{name}"] = torch.tensor([len(p) for p in parts], dtype=torch.int64)
        manifest = json.dumps(self._manifest(), indent=2) + "\n"

        def write(tmp: Path) -> None:
            atomic_save_tensors(tmp / _TENSORS, tensors)
            (tmp / _MANIFEST).write_text(manifest)

        write_version(folder, write)

    def _manifest(self) -> dict[str, Any]:
        schema = self._schema
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "config": asdict(self.config),
            "rng_state": self._rng.bit_generator.state,
            "seen": [[list(g), n] for g, n in sorted(self._seen.items())],
            "full": [list(g) for g in sorted(self._full)],
            "schema": None if schema is None else {k: [d, list(t)] for k, (d, t) in schema.items()},
            "has_text": self._has_text,
            "labels": [ex.label for ex in self._slots],
            "tasks": [ex.task for ex in self._slots],
            "texts": [ex.text for ex in self._slots] if self._has_text else None,
        }

    @classmethod
    def load(cls, folder: str | Path) -> ReplayBuffer:
        """Restore a buffer written by :meth:`save`, RNG state and counters included.

        Raises:
            FileNotFoundError: nothing is committed in ``folder``.
            CorruptFileError: a file is unreadable, fails its checksum, or the two disagree.
        """
        with read_version(folder) as version:
            meta = read_json(version / _MANIFEST)
            try:
                buf = cls._from_manifest(meta)
            except (KeyError, TypeError, ValueError) as err:
                raise CorruptFileError(
                    f"{version / _MANIFEST}: not a replay buffer ({err!r})"
                ) from err
            tensors = load_tensors(version / _TENSORS)
            buf._restore_slots(meta, tensors, version / _TENSORS)
        return buf

    @classmethod
    def _from_manifest(cls, meta: dict[str, Any]) -> ReplayBuffer:
        if (meta["format"], meta["version"]) != (_FORMAT, _VERSION):
            raise ValueError(f"format {meta['format']!r} version {meta['version']}")
        buf = cls(ReplayConfig(**meta["config"]))
        buf._rng.bit_generator.state = meta["rng_state"]
        buf._seen = {tuple(g): int(n) for g, n in meta["seen"]}
        buf._full = {tuple(g) for g in meta["full"]}
        schema = meta["schema"]
        buf._schema = None if schema is None else {k: (d, tuple(s)) for k, (d, s) in schema.items()}
        buf._has_text = meta["has_text"]
        return buf

    def _restore_slots(self, meta: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> None:
        labels, tasks = meta["labels"], meta["tasks"]
        texts = meta["texts"] if self._has_text else [None] * len(labels)
        parts: dict[str, list[Tensor]] = {}
        for name, (dtype, _) in (self._schema or {}).items():
            flat, lengths = tensors.get(f"field.{name}"), tensors.get(f"length.{name}")
            if flat is None or lengths is None or len(lengths) != len(labels):
                raise CorruptFileError(f"{path}: field {name!r} is missing or has a wrong count")
            if str(flat.dtype) != dtype or int(lengths.sum()) != len(flat):
                raise CorruptFileError(f"{path}: field {name!r} disagrees with {_MANIFEST}")
            parts[name] = list(torch.split(flat, lengths.tolist()))
        if not len(labels) == len(tasks) == len(texts) <= self.config.capacity:
            raise CorruptFileError(f"{path.parent / _MANIFEST}: labels/tasks/texts counts differ")
        for i in range(len(labels)):
            ex = _Example(
                int(labels[i]), int(tasks[i]), texts[i], {k: v[i] for k, v in parts.items()}
            )
            self._place(i, ex, self._group(ex.label, ex.task))


class ReplayDataset(Dataset):
    """Held examples as a dataset: item ``i`` is a dict with ``"label"`` and ``"task"`` (int64
    scalars), ``"text"`` (if the examples carry text) and each tensor field."""

    def __init__(self, examples: list[_Example]) -> None:
        self._examples = examples

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self._examples[i]
        item: dict[str, Any] = {"label": torch.tensor(ex.label), "task": torch.tensor(ex.task)}
        if ex.text is not None:
            item["text"] = ex.text
        return item | ex.fields


def _ints(values: Tensor | Sequence[int]) -> list[int]:
    return [int(x) for x in torch.as_tensor(values).reshape(-1).tolist()]


def _split(name: str, value: Tensor | Sequence[Tensor], n: int) -> list[Tensor]:
    """Per-example tensors (each at least 1-D) of a field given as ``[N, ...]`` or N tensors."""
    parts = list(value.unbind(0)) if isinstance(value, Tensor) else list(value)
    if len(parts) != n:
        raise ValueError(f"field {name!r} has {len(parts)} examples, labels have {n}")
    if any(p.dim() == 0 for p in parts):
        raise ValueError(f"field {name!r}: per-example tensors must be at least 1-D")
    return [p.detach().cpu().clone() for p in parts]


class MixedBatchSampler(Sampler[list[int]]):
    """Batches over ``ConcatDataset([task, replay])`` with a fixed share of replay examples.

    Each batch holds ``n_replay = min(round(ratio * batch_size), batch_size - 1)`` replay indices
    (offset by ``n_task``; 0 if the replay set is empty) and ``batch_size - n_replay`` task
    indices. One pass covers every task example once, shuffled; replay examples are drawn from
    successive random permutations. Deterministic under ``seed``; each pass draws afresh.

    Raises:
        ValueError: ``ratio`` outside ``[0, 1)``, ``batch_size < 1`` or ``n_task < 1``.
    """

    def __init__(
        self,
        n_task: int,
        n_replay: int,
        batch_size: int,
        ratio: float,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if not 0.0 <= ratio < 1.0 or batch_size < 1 or n_task < 1:
            raise ValueError(
                f"need 0 <= ratio < 1, batch_size >= 1, n_task >= 1; got ratio={ratio}, "
                f"batch_size={batch_size}, n_task={n_task}"
            )
        self.n_task, self.n_replay_items = n_task, n_replay
        self.n_replay = min(round(ratio * batch_size), batch_size - 1) if n_replay else 0
        self.n_new = batch_size - self.n_replay
        self.drop_last = drop_last
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        full, rest = divmod(self.n_task, self.n_new)
        return full + int(rest > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        task_order = torch.randperm(self.n_task, generator=self._gen).tolist()
        replay: list[int] = []
        for b in range(len(self)):
            batch = task_order[b * self.n_new : (b + 1) * self.n_new]
            while len(replay) < self.n_replay:
                replay += torch.randperm(self.n_replay_items, generator=self._gen).tolist()
            picked, replay = replay[: self.n_replay], replay[self.n_replay :]
            yield batch + [self.n_task + i for i in picked]


def mixed_loader(
    task_dataset: Dataset,
    replay: ReplayBuffer | Dataset,
    ratio: float,
    batch_size: int,
    seed: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A loader over a new task's examples with a ``ratio`` share of replay in every batch.

    Items of ``task_dataset`` must have the same form as the replay items (for a
    :class:`ReplayBuffer`: dicts of ``"label"``, ``"task"``, ``"text"`` and tensor fields) so that
    ``collate_fn`` (default: torch's) can batch them together. See :class:`MixedBatchSampler`.
    """
    replay_set = replay.as_dataset() if isinstance(replay, ReplayBuffer) else replay
    n_task, n_replay = len(task_dataset), len(replay_set)  # type: ignore[arg-type]
    sampler = MixedBatchSampler(n_task, n_replay, batch_size, ratio, seed, drop_last)
    concat = ConcatDataset([task_dataset, replay_set])
    return DataLoader(concat, batch_sampler=sampler, collate_fn=collate_fn)
