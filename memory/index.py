"""FAISS index from input embeddings to expert ids, for retrieval routing.

Two modes (``IndexConfig.mode``):

- ``centroid``: each expert is one vector, the mean of its key embeddings (normalised when the
  metric is inner product), as in LoRARetriever (arXiv 2402.09997); ``n_centroids > 1`` keeps up to
  that many spherical k-means centroids per expert instead, for broad tasks. An expert's score is
  its best centroid's similarity.
- ``exemplar``: every key embedding is indexed, labelled with its expert. A query's
  ``n_neighbors`` nearest keys vote for their experts with weights ``w_j = exp(s_j / temperature)``,
  normalised over the neighbours; an expert's score is its share of the vote (scores sum to 1).

Every indexed vector has the FAISS id ``(expert_id << 32) | j`` (``j`` its row within the expert) in
an ``IndexIDMap2``, so expert ids stay stable across add / remove / replace and a whole expert is
removed with one id range. Backends (``IndexConfig.kind``): ``flat`` (exact), ``hnsw`` (graph:
removal rebuilds the graph at the next search) and ``ivf`` (inverted lists: trained on all vectors
the first time it holds at least ``nlist`` of them).

On disk (:meth:`ExpertIndex.save`): an artefact folder of :mod:`moe_lora.core.commit` whose
versions hold ``index.faiss`` (``faiss.write_index``), ``keys.safetensors`` (every expert's keys, and
its centroids in centroid mode) and the manifest ``index.json``; see :mod:`._index_files`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import torch

from moe_lora.core.commit import read_version, write_version
from moe_lora.core.io import CorruptFileError, atomic_save_tensors, load_tensors

from ._index_files import (
    FORMAT,
    ID_SHIFT,
    INDEX_FILE,
    KEYS_FILE,
    MANIFEST_FILE,
    VERSION,
    IndexMismatchError,
    check_faiss,
    read_faiss,
    read_keys,
    read_manifest,
)
from ._scoring import best_per_expert, distinct_hits, padded, vote

__all__ = ["ExpertIndex", "IndexConfig", "IndexMismatchError"]

_MAX_EXPERT_ID = 2**31 - 1


@dataclass
class IndexConfig:
    """Configuration of an :class:`ExpertIndex`.

    Attributes:
        dim: embedding dimension d.
        mode: ``"centroid"`` or ``"exemplar"`` (see the module docstring).
        metric: ``"ip"`` (inner product; cosine on normalised inputs) or ``"l2"`` (scores are
            negative squared distances, so higher is always more similar).
        kind: FAISS backend, ``"flat"`` (exact), ``"hnsw"`` or ``"ivf"``.
        n_centroids: centroids per expert in centroid mode (k-means when > 1).
        n_neighbors: keys retrieved per query in exemplar mode before voting.
        temperature: vote temperature in exemplar mode.
        hnsw_m, ef_construction, ef_search: HNSW graph degree and beam widths.
        nlist, nprobe: IVF list count and lists visited per query.
        threads: FAISS OpenMP threads (process-wide); ``None`` leaves the current setting.
        seed: k-means seed.
    """

    dim: int
    mode: Literal["centroid", "exemplar"] = "centroid"
    metric: Literal["ip", "l2"] = "ip"
    kind: Literal["flat", "hnsw", "ivf"] = "flat"
    n_centroids: int = 1
    n_neighbors: int = 32
    temperature: float = 0.1
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    nlist: int = 64
    nprobe: int = 8
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {
            "mode": ("centroid", "exemplar"),
            "metric": ("ip", "l2"),
            "kind": ("flat", "hnsw", "ivf"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"IndexConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in (
            "dim",
            "n_centroids",
            "n_neighbors",
            "hnsw_m",
            "ef_construction",
            "ef_search",
            "nlist",
            "nprobe",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"IndexConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"IndexConfig.temperature must be > 0, got {self.temperature}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"IndexConfig.threads must be >= 1 or None, got {self.threads}")


@dataclass
class _Entry:
    """One expert: its keys ``[N, d]`` and the vectors it has in the index ``[M, d]``."""

    keys: np.ndarray
    vectors: np.ndarray


def _as_matrix(x: np.ndarray | torch.Tensor, dim: int, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{what} must have shape [N, {dim}], got {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or inf")
    return arr


class ExpertIndex:
    """Nearest-expert search over FAISS (see the module docstring for modes and backends).

    Args:
        config: the :class:`IndexConfig`.
    """

    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        if config.threads is not None:
            faiss.omp_set_num_threads(config.threads)
        self._entries: dict[int, _Entry] = {}
        self._faiss = self._new_faiss()
        self._stale = False  # True: the FAISS index must be rebuilt from _entries before use

    # ----------------------------------------------------------------- contents
    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return self.config.dim

    @property
    def expert_ids(self) -> list[int]:
        """Ids of the indexed experts, ascending."""
        return sorted(self._entries)

    @property
    def ntotal(self) -> int:
        """Number of vectors the index holds (experts in centroid mode with one centroid each)."""
        return sum(len(e.vectors) for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, expert_id: object) -> bool:
        return expert_id in self._entries

    def keys(self, expert_id: int) -> np.ndarray:
        """A copy of expert ``expert_id``'s keys ``[N, d]``. Raises KeyError if absent."""
        return self._entry(expert_id).keys.copy()

    def vectors(self, expert_id: int) -> np.ndarray:
        """A copy of the vectors indexed for ``expert_id`` ``[M, d]``: its centroid(s) in centroid
        mode, its keys in exemplar mode. Raises KeyError if absent."""
        return self._entry(expert_id).vectors.copy()

    def _entry(self, expert_id: int) -> _Entry:
        if expert_id not in self._entries:
            raise KeyError(f"expert {expert_id} is not in the index (have {self.expert_ids})")
        return self._entries[expert_id]

    # ----------------------------------------------------------------- updates
    def add_expert(self, expert_id: int, keys: np.ndarray | torch.Tensor) -> None:
        """Index expert ``expert_id`` by its key embeddings ``keys`` ``[N, d]`` (N >= 1).

        Raises:
            ValueError: the id is taken or out of range ``[0, 2**31)``, or ``keys`` has a wrong
                shape, no rows, or non-finite values.
        """
        if not 0 <= int(expert_id) <= _MAX_EXPERT_ID:
            raise ValueError(f"expert id must be in [0, 2**31), got {expert_id}")
        if expert_id in self._entries:
            raise ValueError(f"expert {expert_id} is already indexed; use replace_expert")
        arr = _as_matrix(keys, self.dim, f"keys of expert {expert_id}")
        if len(arr) == 0:
            raise ValueError(f"keys of expert {expert_id} are empty")
        entry = _Entry(arr.copy(), self._vectors_for(arr))
        self._entries[int(expert_id)] = entry
        if self._faiss.is_trained and not self._stale:
            self._faiss.add_with_ids(entry.vectors, self._faiss_ids(int(expert_id), entry))
        else:
            self._stale = True

    def remove_expert(self, expert_id: int) -> None:
        """Remove expert ``expert_id`` and its vectors. Raises KeyError if absent."""
        self._entry(expert_id)
        del self._entries[expert_id]
        if self._stale:
            return
        if self.config.kind != "flat":  # HNSW cannot delete, IVF not under an IDMap: re-add all
            self._stale = True
            return
        lo = int(expert_id) << ID_SHIFT
        self._faiss.remove_ids(faiss.IDSelectorRange(lo, lo + (1 << ID_SHIFT)))

    def replace_expert(self, expert_id: int, keys: np.ndarray | torch.Tensor) -> None:
        """Replace expert ``expert_id``'s keys by ``keys`` ``[N, d]``, keeping its id.

        Raises:
            KeyError: the expert is absent.
            ValueError: as :meth:`add_expert`.
        """
        arr = _as_matrix(keys, self.dim, f"keys of expert {expert_id}")
        self.remove_expert(expert_id)
        self.add_expert(expert_id, arr)

    def _vectors_for(self, keys: np.ndarray) -> np.ndarray:
        cfg = self.config
        if cfg.mode == "exemplar":
            return keys.copy()
        if cfg.n_centroids == 1 or len(keys) <= cfg.n_centroids:
            vecs = keys.mean(axis=0, keepdims=True) if cfg.n_centroids == 1 else keys.copy()
        else:
            km = faiss.Kmeans(
                cfg.dim,
                cfg.n_centroids,
                niter=25,
                nredo=5,
                seed=cfg.seed,
                spherical=cfg.metric == "ip",
                min_points_per_centroid=1,
            )
            km.train(keys)
            vecs = km.centroids
        if cfg.metric == "ip":
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    @staticmethod
    def _faiss_ids(expert_id: int, entry: _Entry) -> np.ndarray:
        return (np.int64(expert_id) << ID_SHIFT) + np.arange(len(entry.vectors), dtype=np.int64)

    # ----------------------------------------------------------------- FAISS backend
    def _new_faiss(self) -> faiss.Index:
        cfg = self.config
        metric = faiss.METRIC_INNER_PRODUCT if cfg.metric == "ip" else faiss.METRIC_L2
        if cfg.kind == "flat":
            base = faiss.IndexFlat(cfg.dim, metric)
        elif cfg.kind == "hnsw":
            base = faiss.IndexHNSWFlat(cfg.dim, cfg.hnsw_m, metric)
            base.hnsw.efConstruction = cfg.ef_construction
        else:
            base = faiss.IndexIVFFlat(faiss.IndexFlat(cfg.dim, metric), cfg.dim, cfg.nlist, metric)
            base.cp.min_points_per_centroid = 1  # small indexes train without a warning
        index = faiss.IndexIDMap2(base)
        self._set_search_params(index)
        return index

    def _set_search_params(self, index: faiss.Index) -> None:
        base = faiss.downcast_index(index.index)
        if self.config.kind == "hnsw":
            base.hnsw.efSearch = self.config.ef_search
        elif self.config.kind == "ivf":
            base.nprobe = self.config.nprobe

    def _sync(self) -> None:
        """Re-add every vector if the FAISS index is stale (untrained IVF, removal under HNSW/IVF).

        An untrained IVF index is first trained on all vectors; a trained one keeps its lists. HNSW
        rebuilds its graph from scratch (O(n log n) insertions).

        Raises:
            ValueError: an untrained IVF index holds fewer than ``nlist`` vectors.
        """
        if not self._stale:
            return
        items = sorted(self._entries.items())
        vecs = np.concatenate([e.vectors for _, e in items]) if items else None
        ids = np.concatenate([self._faiss_ids(i, e) for i, e in items]) if items else None
        if vecs is not None and not self._faiss.is_trained:
            if len(vecs) < self.config.nlist:
                raise ValueError(
                    f"an ivf index needs at least IndexConfig.nlist={self.config.nlist} "
                    f"vectors to train, it holds {len(vecs)}"
                )
            self._faiss.train(vecs)
        if self.config.kind == "hnsw":  # a fresh graph: its level RNG restarts, so rebuilds repeat
            self._faiss = self._new_faiss()
        self._faiss.reset()
        if vecs is not None:
            self._faiss.add_with_ids(vecs, ids)
        self._stale = False

    # ----------------------------------------------------------------- persistence
    def save(self, folder: str | Path) -> None:
        """Commit ``index.faiss``, ``keys.safetensors`` and ``index.json`` as one new version of the
        artefact folder ``folder`` (:func:`moe_lora.core.commit.write_version`).

        Raises:
            ValueError: an IVF index holds too few vectors to train (see :meth:`search`).
            moe_lora.core.commit.LockTimeoutError: another process kept the folder locked.
        """
        self._sync()
        tensors = {f"keys.{i}": torch.from_numpy(e.keys) for i, e in self._entries.items()}
        if self.config.mode == "centroid":
            tensors |= {
                f"centroids.{i}": torch.from_numpy(e.vectors) for i, e in self._entries.items()
            }
        experts = [
            {"id": i, "n_keys": len(e.keys), "n_vectors": len(e.vectors)}
            for i, e in sorted(self._entries.items())
        ]
        manifest = {"format": FORMAT, "version": VERSION, "config": asdict(self.config),
                    "ntotal": self.ntotal, "experts": experts}

        def write(tmp: Path) -> None:
            faiss.write_index(self._faiss, str(tmp / INDEX_FILE))
            atomic_save_tensors(tmp / KEYS_FILE, tensors)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

        write_version(folder, write)

    @classmethod
    def load(cls, folder: str | Path) -> ExpertIndex:
        """Load an index written by :meth:`save`, checking that its three files agree.

        Raises:
            FileNotFoundError: nothing is committed in ``folder``.
            CorruptFileError: a file is unreadable or fails its checksum (names it).
            IndexMismatchError: the manifest, the FAISS index and the keys disagree (metric,
                backend, dimension, vector count, ids or key shapes); names the file and field.
        """
        with read_version(folder) as version:
            manifest = read_manifest(version / MANIFEST_FILE)
            try:
                config = IndexConfig(**manifest["config"])
            except (TypeError, ValueError) as err:
                raise CorruptFileError(f"{version / MANIFEST_FILE}: bad config ({err})") from err
            index = cls(config)
            index._faiss = read_faiss(version / INDEX_FILE)
            check_faiss(index._faiss, manifest, version)
            tensors = load_tensors(version / KEYS_FILE)
            stored = read_keys(tensors, manifest, version / KEYS_FILE)
        index._entries = {i: _Entry(keys, vecs) for i, (keys, vecs) in stored.items()}
        index._set_search_params(index._faiss)
        return index

    # ----------------------------------------------------------------- search
    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best distinct experts for each query.

        Args:
            queries: ``[B, d]`` embeddings (normalise them, as the keys, for cosine similarity).
            k: experts per query.

        Returns:
            ``(expert_ids [B, k] int64, scores [B, k] float32)``, best first (ties: lower id
            first); rows with fewer than ``k`` experts are padded with ``-1`` and ``-inf``.

        Raises:
            ValueError: bad ``queries`` shape or ``k < 1``; an IVF index too small to train.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_matrix(queries, self.dim, "queries")
        self._sync()
        if self._faiss.ntotal == 0:
            return padded(len(q), k)
        cfg = self.config
        if cfg.mode == "exemplar":
            n_hits = max(cfg.n_neighbors, k)
        else:
            n_hits = k * cfg.n_centroids  # an expert has at most n_centroids vectors
        dist, fids = self._faiss.search(q, min(n_hits, self._faiss.ntotal))
        sims = -dist if cfg.metric == "l2" else dist
        experts = np.where(fids >= 0, fids >> ID_SHIFT, -1)
        if cfg.mode == "exemplar":
            return vote(experts, sims, k, cfg.temperature)
        if cfg.n_centroids == 1:  # one vector per expert: the hits are distinct experts
            return distinct_hits(experts, sims, k)
        return best_per_expert(experts, sims, k)
