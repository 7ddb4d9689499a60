"""The experts one inference worker serves: all resident, or on demand through an AdapterStore.

A request names its experts (or a router does); a batch of requests becomes one per-sample
routing over the bank (``Routing.per_sample``), so requests with different experts share one
forward. With a store (``max_resident`` / ``max_resident_bytes``), a batch that needs more experts
than may be resident is cut into chunks that fit, chunks whose experts are all resident run
first, and the files of the missing experts are read from disk in a background thread meanwhile
(``prefetch``): a miss costs its own requests the disk read, not the requests around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from moe_lora.core.bank import ExpertBank
from moe_lora.core.routing import Routing
from moe_lora.core.storage import read_manifest
from moe_lora.serving.folder import ServedFolder

if TYPE_CHECKING:
    from moe_lora.memory.store import AdapterStore

__all__ = ["Choice", "ExpertPool", "ResidencyError"]

Choice = list[tuple[str, float]]  # one request's experts and weights; [] = the base model


class ResidencyError(RuntimeError):
    """The experts of a group of requests cannot be resident together (the store's bounds)."""


def _read_files(folder: Path) -> int:
    """Read every file of an expert folder once (fills the OS page cache); returns bytes read."""
    return sum(len(f.read_bytes()) for f in sorted(folder.iterdir()) if f.is_file())


class ExpertPool:
    """A bank and, for a store folder, the :class:`AdapterStore` that fills it on demand.

    Args:
        bank: the bank (holding every expert, or the resident store experts).
        store: the store, or None when every expert is resident.
    """

    def __init__(self, bank: ExpertBank, store: AdapterStore | None = None):
        self.bank, self.store = bank, store
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-prefetch")

    @classmethod
    def open(cls, folder: ServedFolder, model: nn.Module, max_resident: int | None = None,
             max_resident_bytes: int | None = None) -> ExpertPool:
        """Wrap ``model`` with the folder's experts (a bank: all of them; a store: none yet)."""
        if folder.kind == "bank":
            bank = ExpertBank.load(folder.path, model)
            bank.freeze()
            return cls(bank)
        from moe_lora.memory.store import (
            AdapterStore,  # moe_lora.memory loads sentence-transformers
        )

        first = read_manifest(folder.path / "experts" / folder.names[0])
        bank = ExpertBank(model, targets=list(first["layers"]), base_id=folder.base_id)
        store = AdapterStore(folder.path, bank, max_experts=max_resident,
                             max_bytes=max_resident_bytes)
        return cls(bank, store)

    @property
    def capacity(self) -> int | None:
        """Most experts resident at once (None: no bound)."""
        return None if self.store is None else self.store.max_experts

    def resident(self, names: Sequence[str]) -> bool:
        """Whether every expert of ``names`` is in the bank now."""
        return all(n in self.bank for n in names)

    def chunks(self, choices: Sequence[Choice]) -> list[list[int]]:
        """Row indices cut into groups whose experts fit the store's bound, all-resident first."""
        cap = self.capacity
        if cap is None:
            return [list(range(len(choices)))]
        order = sorted(range(len(choices)), key=lambda i: sorted(n for n, _ in choices[i]))
        out: list[list[int]] = []
        current: list[int] = []
        names: set[str] = set()
        for i in order:
            wanted = names | {n for n, _ in choices[i]}
            if current and len(wanted) > cap:
                out.append(current)
                current, wanted = [], {n for n, _ in choices[i]}
            current.append(i)
            names = wanted
        out.append(current)
        return sorted(out, key=lambda rows: not self.resident(
            [n for i in rows for n, _ in choices[i]]))

    def prefetch(self, names: Sequence[str]) -> Future[int] | None:
        """Start reading the files of the non-resident ``names`` in the background."""
        if self.store is None:
            return None
        missing = sorted({n for n in names if n not in self.bank})
        if not missing:
            return None
        root = self.store.root
        return self._reader.submit(lambda: sum(_read_files(root / "experts" / n) for n in missing))

    def routing(self, choices: Sequence[Choice]) -> Routing:
        """One per-sample routing for ``choices`` (loading and evicting store experts as needed).

        Bank indices are only valid until the next call (evictions renumber the bank).

        Raises:
            ResidencyError: the experts do not fit the store's bounds together.
        """
        names = sorted({n for c in choices for n, _ in c})
        if self.store is not None:
            try:
                index = dict(zip(names, self.store.ensure(names), strict=True))
            except RuntimeError as err:  # more experts or bytes than may be resident
                raise ResidencyError(f"these requests need {len(names)} experts at once: "
                                     f"{err}") from err
        else:
            index = {n: self.bank.index(n) for n in names}
        k = max(1, max(len(c) for c in choices))
        indices = torch.full((len(choices), k), -1, dtype=torch.long)
        weights = torch.zeros(len(choices), k)
        for row, choice in enumerate(choices):
            for j, (name, w) in enumerate(choice):
                indices[row, j], weights[row, j] = index[name], w
        device = next(iter(self.bank.layers.values())).base.weight.device
        return Routing.per_sample(indices.to(device), weights.to(device))

    def stats(self) -> tuple[int, int, int, int]:
        """(hits, misses, evictions, resident store experts); zeros without a store."""
        if self.store is None:
            return 0, 0, 0, 0
        s = self.store.stats
        return s.hits, s.misses, s.evictions, len(self.store.resident)
