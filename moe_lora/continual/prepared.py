"""Cached examples of a task stream: the frozen prefix's outputs, labels, tasks and retrieval keys.

:func:`prepare_stream` runs each split of each task through the backbone's frozen prefix once
(:mod:`moe_lora.models.backbones`) and through the whole frozen base once more to get the base embedding
that retrieval routing indexes (for MiniLM, the mean-pooled sentence embedding; for the MLP, its
features), so no strategy ever recomputes either. The same pass also pools the layers below the
last one into the multi-layer frozen features (``model.feature_layers``) that statistics routers use.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from moe_lora.continual.settings import ConfigError
from moe_lora.core.bank import ExpertBank
from moe_lora.data import Split, Task, TaskStream
from moe_lora.models.backbones import Backbone

__all__ = ["Collate", "Examples", "PreparedTask", "base_embeddings", "feature_layers", "frozen_tables",
           "loader", "prepare_stream"]


@dataclass
class Examples:
    """N cached examples.

    Attributes:
        states: per-example prefix outputs (see :data:`moe_lora.backbones.States`).
        labels: ``[N]`` global class ids.
        tasks: ``[N]`` task ids.
        keys: N retrieval keys: the texts, or ``"<split><task>:<row>"`` for feature inputs.
    """

    states: list[Tensor]
    labels: Tensor
    tasks: Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: Sequence[int]) -> Examples:
        """The examples at positions ``index``."""
        idx = list(index)
        t = torch.tensor(idx, dtype=torch.long)
        return Examples([self.states[i] for i in idx], self.labels[t], self.tasks[t],
                        [self.keys[i] for i in idx])

    @staticmethod
    def concat(parts: Sequence[Examples]) -> Examples:
        """All ``parts`` in order."""
        return Examples(
            [s for p in parts for s in p.states],
            torch.cat([p.labels for p in parts]),
            torch.cat([p.tasks for p in parts]),
            [k for p in parts for k in p.keys],
        )


@dataclass
class PreparedTask:
    """A task of the stream with its cached splits."""

    task: Task
    train: Examples
    val: Examples
    test: Examples


class Collate:
    """DataLoader collate: example positions -> ``{backbone inputs..., labels, tasks}``."""

    def __init__(self, examples: Examples, backbone: Backbone):
        self.examples, self.backbone = examples, backbone

    def __call__(self, ids: list[int]) -> dict[str, Tensor]:
        ex = self.examples
        batch = self.backbone.collate([ex.states[i] for i in ids])
        t = torch.tensor(ids, dtype=torch.long)
        return batch | {"labels": ex.labels[t], "tasks": ex.tasks[t]}


class BucketBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar lengths, each split across the processes of a DDP run.

    Every epoch: a seeded permutation is cut into chunks of ``bucket`` batches, each chunk is
    sorted by length and cut into batches, and the batches are shuffled. Texts of ~20 tokens then
    rarely get padded to the longest gloss of the batch. With ``world`` processes, rank ``r``
    takes rows ``r::world`` of every global batch, so the averaged gradient is the single-process
    gradient of the same global batch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, bucket: int = 16):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.rank, self.world, self.bucket = rank, world, bucket
        self.epoch = 0

    def _batches(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=gen).tolist()
        step = self.batch_size * self.bucket
        batches = []
        for s in range(0, len(perm), step):
            chunk = sorted(perm[s : s + step], key=lambda i: self.lengths[i])
            batches += [chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        order = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in order if len(batches[i]) >= self.world]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        self.epoch += 1
        for b in batches:
            yield b[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self._batches())


def loader(
    examples: Examples, backbone: Backbone, batch_size: int, shuffle: bool = False, seed: int = 0,
    rank: int = 0, world: int = 1,
) -> DataLoader:
    """A DataLoader over ``examples``: in order, or length-bucketed shuffled batches (seeded)."""
    collate = Collate(examples, backbone)
    if not shuffle:
        return DataLoader(list(range(len(examples))), batch_size=batch_size, collate_fn=collate)
    lengths = [int(s.shape[0]) if s.dim() > 1 else 1 for s in examples.states]
    sampler = BucketBatchSampler(lengths, batch_size, seed, rank, world)
    return DataLoader(list(range(len(examples))), batch_sampler=sampler, collate_fn=collate)


def _examples(split: Split, task_id: int, name: str, backbone: Backbone) -> Examples:
    """Cache a split; val and test are put in length order (less padding when evaluating)."""
    inputs = split.inputs
    keys = (list(inputs) if not isinstance(inputs, Tensor)
            else [f"{name}{task_id}:{i}" for i in range(len(split))])
    states = backbone.prefix(inputs)
    tasks = torch.full((len(split),), task_id, dtype=torch.long)
    ex = Examples(states, split.labels, tasks, keys)
    if name == "train":
        return ex
    return ex.select(sorted(range(len(ex)), key=lambda i: (ex.states[i].shape[0], i)))


def feature_layers(requested: int, backbone: Backbone) -> int:
    """How many layers the multi-layer frozen features pool (``model.feature_layers``; 0: auto).

    Raises:
        ConfigError: more layers than the backbone can tap without an extra forward pass.
    """
    available = backbone.tap_layers
    if requested == 0:
        return min(3, available)
    if requested > available:
        raise ConfigError(f"model.feature_layers={requested}: this model can pool at most "
                          f"{available} layers (the cached state and the {available - 1} LoRA "
                          "blocks above it; raise model.lora_layers to tap more)")
    return requested


@torch.no_grad()
def frozen_tables(
    examples: Examples, backbone: Backbone, bank: ExpertBank, layers: int = 1,
    batch_size: int = 256,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two key -> vector tables of every example, from one expert-free pass of the suffix:

    * the L2-normalised base embedding (the last layer's pooled output: the retrieval keys'
      space, for MiniLM its sentence-transformers embedding);
    * the multi-layer frozen features: the pooled outputs of the last ``layers`` layers, each
      L2-normalised, concatenated (``[layers * D]``; with ``layers=1`` the embedding itself).
    """
    emb: dict[str, np.ndarray] = {}
    feat: dict[str, np.ndarray] = {}
    order = sorted(range(len(examples)), key=lambda i: examples.states[i].shape[0])
    with bank.use(None):
        for s in range(0, len(order), batch_size):
            ids = order[s : s + batch_size]  # similar lengths together: little padding
            batch = backbone.collate([examples.states[i] for i in ids])
            pooled = [F.normalize(p, dim=-1) for p in backbone.layer_features(batch, layers)]
            last = pooled[-1].float().cpu().numpy()
            multi = torch.cat(pooled, 1).float().cpu().numpy() if layers > 1 else last
            for row, i in enumerate(ids):
                key = examples.keys[i]
                emb[key] = last[row]
                feat[key] = multi[row]
    return emb, feat


def base_embeddings(
    examples: Examples, backbone: Backbone, bank: ExpertBank, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Key -> L2-normalised base-model embedding (no expert active) of every example."""
    return frozen_tables(examples, backbone, bank, 1, batch_size)[0]


def prepare_stream(
    stream: TaskStream, backbone: Backbone, bank: ExpertBank, progress: bool = False,
    layers: int = 1,
) -> tuple[list[PreparedTask], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Cache every split of every task; returns the tasks and the two :func:`frozen_tables`
    (base embeddings, ``layers``-layer frozen features).

    ``progress`` shows a bar over the tasks' splits (the frozen prefix and the base embeddings).
    """
    tasks = []
    table: dict[str, np.ndarray] = {}
    features: dict[str, np.ndarray] = {}
    bar = tqdm(total=3 * len(stream), desc="caching frozen features", disable=not progress,
               leave=False, unit="split")
    for task in stream:
        splits = []
        for name in ("train", "val", "test"):
            ex = _examples(getattr(task, name), task.task_id, name, backbone)
            emb, feat = frozen_tables(ex, backbone, bank, layers)
            table |= emb
            features |= feat
            splits.append(ex)
            bar.update()
        tasks.append(PreparedTask(task, *splits))
    bar.close()
    return tasks, table, features
