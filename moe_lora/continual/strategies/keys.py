"""Retrieval keys of the experts: which training inputs index each expert, and the vote over them.

LoRARetriever (Zhao et al., 2024, arXiv 2402.09997) finds the experts of an input by the
similarity of its sentence embedding to embeddings of each expert's training inputs. Here the keys
of task ``t``'s expert are ``keys_per_task`` of its training inputs **drawn across its classes**
(round-robin over the classes, seeded, in a random order within each class), so a data file
grouped by class indexes every class of the task, and the file's row order cannot change them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_lora.continual.prepared import Examples
from moe_lora.continual.settings import check, check_finite
from moe_lora.memory.index import ExpertIndex, IndexConfig

__all__ = ["KeyIndex", "RetrievalOptions", "stratified_keys"]


@dataclass
class RetrievalOptions:
    """``strategies.experts.retrieval``: the expert index (see :class:`KeyIndex`).

    Attributes:
        mode: ``exemplar`` (kNN vote over the keys) or ``centroid`` (one mean key per expert).
        keys_per_task: training inputs indexed per task, drawn across its classes.
        n_neighbors: kNN size of the exemplar vote.
        temperature: vote temperature (exemplar) or softmax temperature over cosines (centroid).
        prior_weight: ``experts-confidence`` adds ``prior_weight * log(vote share)`` to each
            expert's confidence (0: confidence alone).
    """

    mode: str = "exemplar"
    keys_per_task: int = 200
    n_neighbors: int = 10
    temperature: float = 0.05
    prior_weight: float = 1.0

    def __post_init__(self) -> None:
        s = "strategies.experts.retrieval"
        check_finite(self, s)
        check(self.mode in ("centroid", "exemplar"), f"{s}.mode", "must be 'centroid' or 'exemplar'")
        check(self.keys_per_task >= 1, f"{s}.keys_per_task", "must be >= 1")
        check(self.n_neighbors >= 1, f"{s}.n_neighbors", "must be >= 1")
        check(self.temperature > 0, f"{s}.temperature", "must be > 0")
        check(self.prior_weight >= 0, f"{s}.prior_weight", "must be >= 0")


def stratified_keys(examples: Examples, n: int, seed: int) -> list[str]:
    """``n`` keys of ``examples`` drawn round-robin across their classes (seeded).

    Each class's examples are shuffled with ``seed``; then the first of every class, the second
    of every class, ... until ``n`` (or all) are taken. Invariant to the examples' order up to
    ties in the keys themselves.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[str]] = {}
    for key, label in zip(examples.keys, examples.labels.tolist(), strict=True):
        by_class.setdefault(int(label), []).append(key)
    queues = []
    for label in sorted(by_class):
        keys = sorted(by_class[label])  # canonical order first: row order cannot matter
        queues.append([keys[i] for i in rng.permutation(len(keys))])
    out: list[str] = []
    for rank in range(max(len(q) for q in queues)):
        out += [q[rank] for q in queues if rank < len(q)]
    return out[:n]


class KeyIndex:
    """A FAISS :class:`ExpertIndex` of frozen base embeddings, one expert per task.

    Args:
        options: :class:`RetrievalOptions`.
        embeddings: key -> L2-normalised embedding ``[D]`` (the run's table; filled as requests
            come when serving; unused by ``moe-lora route``, which embeds its texts itself).
        dim: the embedding size ``D``.
    """

    def __init__(self, options: RetrievalOptions, embeddings: dict[str, np.ndarray], dim: int):
        self.options, self.embeddings = options, embeddings
        self.index = ExpertIndex(IndexConfig(dim=dim, mode=options.mode,  # type: ignore[arg-type]
                                             n_neighbors=options.n_neighbors,
                                             temperature=options.temperature))

    def embed(self, keys: list[str]) -> np.ndarray:
        """``[N, D]`` embeddings of ``keys``."""
        return np.stack([self.embeddings[k] for k in keys])

    def add_task(self, task: int, train: Examples, seed: int) -> None:
        """Index task ``task``'s expert (index id ``task``) by stratified training keys."""
        keys = stratified_keys(train, self.options.keys_per_task, seed + task)
        self.index.add_expert(task, self.embed(keys))

    def weights(self, queries: np.ndarray, n_tasks: int) -> torch.Tensor:
        """``[N, n_tasks]`` weight of each indexed task per query, rows summing to 1.

        Exemplar mode: the kNN vote shares; centroid mode: ``softmax(cosine / temperature)``.
        """
        ids, scores = self.index.search(queries, max(len(self.index.expert_ids), 1))
        if self.options.mode == "centroid":
            top = np.where(ids >= 0, scores, -np.inf).max(1, keepdims=True)
            scores = np.exp((scores - top) / self.options.temperature)
        scores = np.where(ids >= 0, np.nan_to_num(scores, neginf=0.0), 0.0)
        out = np.zeros((len(queries), n_tasks), dtype=np.float32)
        rows = np.repeat(np.arange(len(queries)), ids.shape[1])
        valid = ids.reshape(-1) >= 0
        np.add.at(out, (rows[valid], ids.reshape(-1)[valid]), scores.reshape(-1)[valid])
        return torch.from_numpy(out / np.clip(out.sum(1, keepdims=True), 1e-12, None))

    def save(self, folder: Path) -> None:
        """Write the FAISS index to ``folder/index``."""
        self.index.save(folder / "index")

    def load(self, folder: Path) -> None:
        """Read the index from ``folder/index``.

        Raises:
            FileNotFoundError: the checkpoint has no ``index/`` folder.
        """
        if not (folder / "index").is_dir():
            raise FileNotFoundError(f"{folder}: the checkpoint has no index/ folder")
        self.index = ExpertIndex.load(folder / "index")
