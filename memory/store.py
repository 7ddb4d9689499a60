"""On-demand expert storage: thousands of experts on disk, a bounded LRU set resident in a bank.

On disk, two kinds of artefact folders of :mod:`moe_lora.core.commit` (each committed atomically,
locked against concurrent writers, every byte checksummed)::

    root/catalogue/        store.json: {"experts": {"<id>": "<name>"}}, stable integer expert ids
                           (the ids used by :class:`~moe_lora.memory.ExpertIndex`) to names
    root/experts/<name>/   one expert in the bank's format (see :mod:`moe_lora.core.storage`)

Names follow :mod:`moe_lora.core.names` (letters, digits, ``-``, ``_``, ``.``), so an expert's
folder always stays inside ``root/experts``. :meth:`AdapterStore.put` is a read-modify-write of
the catalogue under its writer lock: several handles (threads or processes) on one root never lose
an update nor hand out one id twice. Each handle caches the catalogue and reads it again when it
meets an id or a name it does not know.

:meth:`AdapterStore.ensure` makes a set of experts resident in the bank, loading misses from disk
and evicting the least recently used unpinned experts until the count and byte bounds hold.

Serving a batch whose samples each need their own experts::

    ids, scores = index.search(embedder.encode(texts), k=2)      # [B, k] expert ids
    routing = store.routing(ids, weights)                           # loads, evicts, maps to bank
    with bank.use(routing):
        out = bank(**batch)
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moe_lora.core.bank import ExpertBank
from moe_lora.core.commit import LockTimeoutError, locked, read_version, update_version
from moe_lora.core.io import CorruptFileError, read_json
from moe_lora.core.names import check_expert_name, child_path
from moe_lora.core.routing import Routing

__all__ = ["AdapterStore", "StoreStats"]

CATALOGUE, CATALOGUE_FILE, EXPERTS = "catalogue", "store.json", "experts"


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
        timeout: seconds to wait for another handle's catalogue update before giving up.

    Raises:
        ValueError: a bound is not positive.
        CorruptFileError: the catalogue fails its checks, or ``root`` holds a store of an older
            format (a top-level ``store.json``).
    """

    def __init__(
        self,
        root: str | Path,
        bank: ExpertBank,
        max_experts: int | None = None,
        max_bytes: int | None = None,
        timeout: float = 60.0,
    ):
        for field_name, value in (("max_experts", max_experts), ("max_bytes", max_bytes)):
            if value is not None and value <= 0:
                raise ValueError(f"AdapterStore.{field_name} must be positive, got {value}")
        self.root = Path(root)
        if (self.root / CATALOGUE_FILE).exists():
            raise CorruptFileError(
                f"{self.root}: a store of an older moe-lora format (top-level {CATALOGUE_FILE}); "
                "put its experts into a new store"
            )
        (self.root / EXPERTS).mkdir(parents=True, exist_ok=True)
        self.bank = bank
        self.max_experts, self.max_bytes, self.timeout = max_experts, max_bytes, timeout
        self.stats = StoreStats()
        self._names: dict[int, str] = {}
        try:
            with locked(self.root / CATALOGUE, timeout=0):  # no put under way: tidy up
                self._refresh()
                self._remove_orphans()
        except LockTimeoutError:
            self._refresh()
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, LRU first
        self._pinned: set[str] = set()

    # ------------------------------------------------------------------ catalogue
    def _remove_orphans(self) -> None:
        """Remove expert folders the catalogue does not list (left by a put that was killed
        before its catalogue commit). Call with the catalogue's writer lock held."""
        listed = set(self._names.values())
        for folder in (self.root / EXPERTS).iterdir():
            if folder.name not in listed:
                shutil.rmtree(folder) if folder.is_dir() and not folder.is_symlink() \
                    else folder.unlink()

    def _refresh(self) -> None:
        """Read the committed catalogue again (other handles may have added experts)."""
        try:
            with read_version(self.root / CATALOGUE, timeout=self.timeout) as version:
                self._names = _parse_catalogue(version)
        except FileNotFoundError:
            self._names = {}

    def __len__(self) -> int:
        self._refresh()
        return len(self._names)

    @property
    def ids(self) -> list[int]:
        """Expert ids on disk, ascending (read from the catalogue)."""
        self._refresh()
        return sorted(self._names)

    def name_of(self, expert_id: int) -> str:
        """Name of the expert with id ``expert_id``.

        Raises:
            KeyError: unknown id.
        """
        if expert_id not in self._names:
            self._refresh()
        if expert_id not in self._names:
            raise KeyError(f"no expert with id {expert_id} in the store at {self.root}")
        return self._names[expert_id]

    def put(self, bank: ExpertBank, name: str, expert_id: int | None = None) -> int:
        """Save expert ``name`` of ``bank`` into the store; returns its id (next free by default).

        The catalogue is read, checked and written under its writer lock, the expert's folder
        written in between: an error leaves the catalogue as it was.

        Raises:
            ValueError: the id or the name is already in the store, or the name is invalid.
            KeyError: ``bank`` has no expert ``name``.
            moe_lora.core.commit.LockTimeoutError: another handle held the catalogue too long.
        """
        folder = child_path(self.root / EXPERTS, name)
        committed: dict[int, str] = {}

        def update(current: Path | None, tmp: Path) -> None:
            names = {} if current is None else _parse_catalogue(current)
            self._names = names
            self._remove_orphans()
            eid = max(names, default=-1) + 1 if expert_id is None else int(expert_id)
            if eid in names or name in names.values():
                raise ValueError(f"store {self.root} already holds id {eid} or name {name!r}")
            bank.save_expert(name, folder)
            committed.update(names)
            committed[eid] = name
            _write_catalogue(tmp, committed)

        update_version(self.root / CATALOGUE, update, timeout=self.timeout)
        self._names = committed
        return next(i for i, n in committed.items() if n == name)

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
        if not known.issuperset(wanted):
            self._refresh()
            known = set(self._names.values())
        for name in wanted:
            if name not in known:
                raise KeyError(f"expert {name!r} is not in the store at {self.root}")
            if name in self._resident:
                self.stats.hits += 1
                self._resident.move_to_end(name)
            else:
                self.stats.misses += 1
                self.bank.load_expert(child_path(self.root / EXPERTS, name), name)
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


def _parse_catalogue(version: Path) -> dict[int, str]:
    """``{id: name}`` from a committed catalogue version.

    Raises:
        CorruptFileError: not a catalogue, a negative id, an invalid or repeated name.
    """
    file = version / CATALOGUE_FILE
    try:
        names = {int(k): check_expert_name(v) for k, v in read_json(file)["experts"].items()}
        if any(i < 0 for i in names) or len(set(names.values())) != len(names):
            raise ValueError("negative id or repeated name")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CorruptFileError(f"{file}: not a store catalogue ({err})") from err
    return names


def _write_catalogue(tmp: Path, names: dict[int, str]) -> None:
    entries = {str(k): v for k, v in sorted(names.items())}
    (tmp / CATALOGUE_FILE).write_text(json.dumps({"experts": entries}, indent=2) + "\n")
