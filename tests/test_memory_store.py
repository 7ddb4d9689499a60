"""AdapterStore: LRU order, bounds, pinning, and experts from disk equal the originals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moe_lora import ExpertBank, ExpertConfig, Routing
from moe_lora.memory.store import AdapterStore


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


@pytest.fixture
def source(tmp_path):
    """A bank of 6 trained-looking experts saved into a store; returns (bank, store root)."""
    bank = ExpertBank(_base(), targets="all-linear")
    store = AdapterStore(tmp_path / "store", bank)
    for i in range(6):
        bank.add_expert(f"e{i}", ExpertConfig(rank=2 + i % 2, init="random"), trainable=False)
        store.put(bank, f"e{i}")
    return bank, tmp_path / "store"


def _serving_bank() -> ExpertBank:
    return ExpertBank(_base(), targets="all-linear")


def test_lru_eviction_order_and_counters(source):
    _, root = source
    store = AdapterStore(root, _serving_bank(), max_experts=3)
    assert store.ids == list(range(6))
    store.ensure(["e0", "e1", "e2"])
    store.ensure(["e0"])  # e0 becomes most recent
    store.ensure(["e3"])  # evicts e1 (least recent)
    assert store.resident == ["e2", "e0", "e3"]
    store.ensure(["e4", "e5"])  # evicts e2, e0
    assert store.resident == ["e3", "e4", "e5"]
    assert (store.stats.hits, store.stats.misses, store.stats.evictions) == (1, 6, 3)
    assert store.bank.names == ["e3", "e4", "e5"]


def test_pinning_and_byte_bound(source):
    _, root = source
    bank = _serving_bank()
    one = 2 * (6 + 8) * 4 + 2 * (8 + 4) * 4  # rank-2 expert: A and B in both layers, fp32
    store = AdapterStore(root, bank, max_bytes=3 * one + 10)
    store.pin("e0")
    for name in ["e2", "e4", "e1"]:  # e1 is rank 3: bigger
        store.ensure([name])
        assert store.resident_bytes <= store.max_bytes
    assert "e0" in store.resident
    with pytest.raises(RuntimeError, match="over the bounds"):
        AdapterStore(root, _serving_bank(), max_experts=1).ensure(["e0", "e1"])
    with pytest.raises(KeyError, match="not in the store"):
        store.ensure(["nope"])


def test_experts_from_disk_equal_the_originals(source):
    original, root = source
    bank = _serving_bank()
    store = AdapterStore(root, bank, max_experts=2)
    x = torch.randn(4, 5, 6)
    ids = torch.tensor([[5, 1], [1, -1], [0, 5], [3, 3]])
    w = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8], [0.5, 0.5]])
    expected = []
    for b in range(4):
        names = [f"e{i}" for i in ids[b].tolist() if i >= 0]
        ws = [w[b, j].item() for j, i in enumerate(ids[b].tolist()) if i >= 0]
        dense = torch.zeros(1, len(original))
        for n, wt in zip(names, ws, strict=True):
            dense[0, original.index(n)] += wt
        with original.use(Routing.dense(dense)):
            expected.append(original(x[b : b + 1])[0])
    for b in range(4):  # one sample at a time: at most 2 resident
        with bank.use(store.routing(ids[b : b + 1], w[b : b + 1])):
            torch.testing.assert_close(bank(x[b : b + 1])[0], expected[b], atol=1e-6, rtol=0)
    big = AdapterStore(root, _serving_bank(), max_experts=4)
    with big.bank.use(big.routing(ids, w)):  # the whole heterogeneous batch at once
        torch.testing.assert_close(big.bank(x), torch.stack(expected), atol=1e-6, rtol=0)


def test_catalogue_survives_reopen(source):
    _, root = source
    reopened = AdapterStore(root, copy.deepcopy(_serving_bank()))
    assert [reopened.name_of(i) for i in reopened.ids] == [f"e{i}" for i in range(6)]
    with pytest.raises(ValueError, match="already holds"):
        reopened.put(source[0], "e1")


def test_two_handles_interleaved_keep_every_expert_and_distinct_ids(tmp_path):
    bank = ExpertBank(_base(), targets="all-linear")
    first, second = AdapterStore(tmp_path, bank), AdapterStore(tmp_path, bank)
    for i in range(10):
        bank.add_expert(f"e{i}", ExpertConfig(rank=2, init="random"), trainable=False)
        (first if i % 2 else second).put(bank, f"e{i}")
    assert first.ids == second.ids == list(range(10))
    assert sorted(first.name_of(i) for i in range(10)) == [f"e{i}" for i in range(10)]
    serving = AdapterStore(tmp_path, _serving_bank())
    assert serving.ensure(["e3", "e4"]) == [0, 1]


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "", "x" * 129, "é", "a b"])
def test_unsafe_expert_names_are_refused(tmp_path, name):
    bank = ExpertBank(_base(), targets="all-linear")
    with pytest.raises(ValueError, match="invalid expert name"):
        bank.add_expert(name)
    store = AdapterStore(tmp_path / "store", bank)
    with pytest.raises(ValueError, match="invalid expert name"):
        store.put(bank, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_names_that_were_store_files_are_ordinary_experts(tmp_path):
    bank = ExpertBank(_base(), targets="all-linear")
    store = AdapterStore(tmp_path, bank)
    for name in ["store.json", "manifest.json", "CURRENT", ".lock", "catalogue"]:
        bank.add_expert(name, ExpertConfig(rank=2, init="random"), trainable=False)
        store.put(bank, name)
    again = AdapterStore(tmp_path, _serving_bank())
    assert [again.name_of(i) for i in again.ids] == [
        "store.json", "manifest.json", "CURRENT", ".lock", "catalogue"]
    again.ensure(["store.json", ".lock"])
    for name in ["store.json", ".lock"]:
        for key, t in bank.expert_state(name).items():
            assert torch.equal(again.bank.expert_state(name)[key], t)
