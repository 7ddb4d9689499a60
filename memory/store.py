"""On-demand expert storage: thousands of experts on disk, a bounded LRU set resident in a bank.

Each expert lives in its own folder under ``root`` in the bank's format (``manifest.json`` +
``experts.safetensors``, see :mod:`moe_lora.core.storage`), with a catalogue ``store.json`` mapping
stable integer expert ids (the ids used by :class:`~moe_lora.memory.ExpertIndex`) to names.
:meth:`AdapterStore.ensure` makes a set of experts resident in the bank, loading misses from disk
and evicting the least recently used unpinned experts until the count and byte bounds hold.

Serving a batch whose samples each need their own experts::

    ids, scores = index.search(embedder.encode(texts), k=2)      # [B, k] expert ids
    routing = store.routing(ids, weights)                           # loads, evicts, maps to bank
    with bank.use(routing):
        out = bank(**batch)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moe_lora.core.bank import ExpertBank
from moe_lora.core.io import atomic_write_json, read_json
from moe_lora.core.routing import Routing

__all__ = ["AdapterStore", "StoreStats"]

CATALOGUE = "store.json"


@dataclass
class StoreStats:
    """Counters of an :class:`AdapterStore` (cumulative)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class AdapterStore:
    """Experts on disk under ``root``, loaded on demand into ``bank`` with an LRU bound.

    Args:
        root: folder of the store (created if missing).
        bank: the bank that holds the resident experts (its other experts are never evicted).
        max_experts: most store experts resident at once (None: unbounded).
        max_bytes: most bytes of store experts' factors resident at once (None: unbounded).

    Raises:
        ValueError: a bound is not positive.
    """

    def __init__(
        self,
        root: str | Path,
        bank: ExpertBank,
        max_experts: int | None = None,
        max_bytes: int | None = None,
    ):
        for field_name, value in (("max_experts", max_experts), ("max_bytes", max_bytes)):
            if value is not None and value <= 0:
                raise ValueError(f"AdapterStore.{field_name} must be positive, got {value}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.bank = bank
        self.max_experts, self.max_bytes = max_experts, max_bytes
        self.stats = StoreStats()
        self._names: dict[int, str] = self._read_catalogue()
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, LRU first
        self._pinned: set[str] = set()

    # ------------------------------------------------------------------ catalogue
    def _read_catalogue(self) -> dict[int, str]:
        file = self.root / CATALOGUE
        if not file.exists():
            return {}
        data = read_json(file)
        return {int(k): v for k, v in data["experts"].items()}

    def _write_catalogue(self) -> None:
        atomic_write_json(
            self.root / CATALOGUE, {"experts": {str(k): v for k, v in sorted(self._names.items())}}
        )

    def __len__(self) -> int:
        return len(self._names)

    @property
    def ids(self) -> list[int]:
        """Expert ids on disk, ascending."""
        return sorted(self._names)

    def name_of(self, expert_id: int) -> str:
        """Name of the expert with id ``expert_id``.

        Raises:
            KeyError: unknown id.
        """
        if expert_id not in self._names:
            raise KeyError(f"no expert with id {expert_id} in the store at {self.root}")
        return self._names[expert_id]

    def put(self, bank: ExpertBank, name: str, expert_id: int | None = None) -> int:
        """Save expert ``name`` of ``bank`` into the store; returns its id (next free by default).

        Raises:
            ValueError: the id or the name is already in the store.
        """
        expert_id = max(self._names, default=-1) + 1 if expert_id is None else int(expert_id)
        if expert_id in self._names or name in self._names.values():
            raise ValueError(f"store already holds id {expert_id} or name {name!r}")
        bank.save_expert(name, self.root / name)
        self._names[expert_id] = name
        self._write_catalogue()
        return expert_id

    # ------------------------------------------------------------------ residency
    @property
    def resident(self) -> list[str]:
        """Names of resident store experts, least recently used first."""
        return list(self._resident)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the resident store experts' factors."""
        return sum(self._resident.values())

    def pin(self, name: str) -> None:
        """Never evict ``name`` (loads it if needed)."""
        self.ensure([name])
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        """Allow ``name`` to be evicted again."""
        self._pinned.discard(name)

    def _expert_bytes(self, name: str) -> int:
        return sum(p.numel() * p.element_size() for p in self.bank.expert_parameters(name).values())

    def ensure(self, names: list[str]) -> list[int]:
        """Make ``names`` resident; returns their bank indices (valid until the next call).

        Raises:
            KeyError: a name is not in the store.
            RuntimeError: the request alone exceeds the bounds.
        """
        wanted = list(dict.fromkeys(names))
        known = set(self._names.values())
        for name in wanted:
            if name not in known:
                raise KeyError(f"expert {name!r} is not in the store at {self.root}")
            if name in self._resident:
                self.stats.hits += 1
                self._resident.move_to_end(name)
            else:
                self.stats.misses += 1
                self.bank.load_expert(self.root / name, name)
                self.bank.freeze(name)
                self._resident[name] = self._expert_bytes(name)
        self._evict(keep=set(wanted))
        return [self.bank.index(n) for n in names]

    def _over(self) -> bool:
        count = self.max_experts is not None and len(self._resident) > self.max_experts
        size = self.max_bytes is not None and self.resident_bytes > self.max_bytes
        return count or size

    def _evict(self, keep: set[str]) -> None:
        for name in list(self._resident):
            if not self._over():
                return
            if name in keep or name in self._pinned:
                continue
            self.bank.remove_expert(name)
            del self._resident[name]
            self.stats.evictions += 1
        if self._over():
            raise RuntimeError(
                f"requested/pinned experts need {len(self._resident)} slots and "
                f"{self.resident_bytes} bytes, over the bounds max_experts={self.max_experts}, "
                f"max_bytes={self.max_bytes}"
            )

    def routing(self, expert_ids: Tensor, weights: Tensor | None = None) -> Routing:
        """Per-sample routing for store ids ``expert_ids`` [B, k] (-1 = none), loading as needed.

        ``weights`` [B, k] default to 1/k over the valid ids of each row.
        """
        if expert_ids.dim() == 1:
            expert_ids = expert_ids[:, None]
        valid = expert_ids >= 0
        names = [self.name_of(int(i)) for i in expert_ids[valid].unique().tolist()]
        index_of = dict(zip(names, self.ensure(names), strict=True))
        lookup = {i: index_of[self.name_of(i)] for i in expert_ids[valid].unique().tolist()}
        bank_idx = expert_ids.clone()
        for store_id, bank_id in lookup.items():
            bank_idx[expert_ids == store_id] = bank_id
        if weights is None:
            weights = valid.float() / valid.sum(-1, keepdim=True).clamp_min(1)
        return Routing.per_sample(bank_idx.masked_fill(~valid, -1), weights.masked_fill(~valid, 0))

    def bank_ids(self) -> torch.Tensor:
        """Bank indices of the resident store experts, in residency (LRU) order."""
        return torch.tensor([self.bank.index(n) for n in self._resident], dtype=torch.long)
