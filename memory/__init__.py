"""Retrieval memory for expert routing and continual learning (installed as ``moe_lora.memory``).

- :class:`Embedder`: cached sentence embeddings (embedded MiniLM by default).
- :class:`ExpertIndex`: FAISS search from input embeddings to expert ids (centroid / exemplar).
- :class:`ReplayBuffer`: fixed-budget reservoir of past examples, optionally balanced, with
  :func:`mixed_loader` to mix it into a new task's batches.
- :class:`AdapterStore`: experts on disk, loaded on demand into a bank with an LRU bound.

See ``docs/memory.md``.
"""

from .embedder import RETRIEVAL_PREFIX, Embedder, EmbedderConfig, default_model_path
from .index import ExpertIndex, IndexConfig, IndexMismatchError
from .replay import MixedBatchSampler, ReplayBuffer, ReplayConfig, ReplayDataset, mixed_loader
from .store import AdapterStore, StoreStats

__all__ = [
    "AdapterStore",
    "StoreStats",
    "RETRIEVAL_PREFIX",
    "Embedder",
    "EmbedderConfig",
    "ExpertIndex",
    "IndexConfig",
    "IndexMismatchError",
    "MixedBatchSampler",
    "ReplayBuffer",
    "ReplayConfig",
    "ReplayDataset",
    "default_model_path",
    "mixed_loader",
]
