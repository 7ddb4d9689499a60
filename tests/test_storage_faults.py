"""Fault injection over every artefact kind: SIGKILL mid-save, concurrent writers, readers during
writes, bit flips. The figures go to docs/reliability.md (run with ``-s`` to see them).

Each kind alternates two states, A and B, in one folder (the adapter store appends experts
instead). Writers are forked processes, killed with SIGKILL at a random moment of their save loop;
after each kill the folder must load as A or B (the store: as a prefix of the puts), and no temp
entry or old version may survive that load.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from storage_helpers import artefact_files, version_dir
from torch import nn

from moe_lora import ExpertBank, ExpertConfig
from moe_lora.core.io import CorruptFileError
from moe_lora.memory import AdapterStore, ExpertIndex, IndexConfig, ReplayBuffer, ReplayConfig

FORK = multiprocessing.get_context("fork")
KILLS, KILLS_SLOW = 25, 200


# ------------------------------------------------------------------ the artefact kinds
def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16))


def digest(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(torch.as_tensor(a).detach().numpy()).tobytes())
    return h.hexdigest()[:16]


def make_bank(variant: int) -> ExpertBank:
    bank = ExpertBank(base_model(), targets="all-linear")
    torch.manual_seed(100 + variant)
    for i in range(3 + variant):
        bank.add_expert(f"v{variant}e{i}", ExpertConfig(rank=4, init="random"), trainable=False)
    return bank


def bank_signature(bank: ExpertBank) -> tuple:
    return tuple(bank.names), digest(*[t for n in bank.names for t in bank.expert_state(n).values()])


def load_bank(folder: Path) -> tuple:
    return bank_signature(ExpertBank.load(folder, base_model()))


def make_index(variant: int) -> ExpertIndex:
    index = ExpertIndex(IndexConfig(dim=16, mode="exemplar"))
    rng = np.random.default_rng(variant)
    for i in range(4 + variant):
        index.add_expert(10 * variant + i, rng.normal(size=(20, 16)).astype(np.float32))
    return index


def index_signature(index: ExpertIndex) -> tuple:
    return tuple(index.expert_ids), digest(*[index.keys(i) for i in index.expert_ids])


def make_replay(variant: int) -> ReplayBuffer:
    buf = ReplayBuffer(ReplayConfig(capacity=64, balance="class", seed=variant))
    n = 100 + 30 * variant
    buf.add(torch.arange(n) % 5, variant, texts=[f"text {i}" for i in range(n)],
            features=torch.randn(n, 32, generator=torch.Generator().manual_seed(variant)))
    return buf


def replay_signature(buf: ReplayBuffer) -> tuple:
    items = [buf.as_dataset()[i] for i in range(len(buf))]
    return len(buf), digest(*[it["features"] for it in items], [int(it["label"]) for it in items])


@dataclass
class Kind:
    """An artefact kind: build state A (0) or B (1), save it, load a folder to a signature."""

    name: str
    make: Callable[[int], Any]
    save: Callable[[Any, Path], None]
    load: Callable[[Path], tuple]
    signature: Callable[[Any], tuple]


KINDS = [
    Kind("bank", make_bank, lambda b, f: b.save(f), load_bank, bank_signature),
    Kind("index", make_index, lambda i, f: i.save(f), lambda f: index_signature(
        ExpertIndex.load(f)), index_signature),
    Kind("replay", make_replay, lambda b, f: b.save(f), lambda f: replay_signature(
        ReplayBuffer.load(f)), replay_signature),
]


def tidy(folder: Path) -> bool:
    """Whether an artefact folder holds only its lock, pointer and one version (only its lock
    when nothing was committed yet)."""
    names = sorted(p.name for p in folder.iterdir())
    if not (folder / "CURRENT").exists():
        return names == [".lock"]
    return names == [".lock", "CURRENT", version_dir(folder).name]


def start(target: Callable[[], None]) -> multiprocessing.Process:
    proc = FORK.Process(target=target, daemon=True)
    proc.start()
    return proc


def kill(proc: multiprocessing.Process) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()


# ------------------------------------------------------------------ SIGKILL while saving
@dataclass
class KillFigures:
    kills: int = 0
    interrupted: int = 0  # kills that left a temp entry behind (the save was cut mid-way)
    failed_loads: int = 0
    untidy_after_open: int = 0


def save_forever(kind: Kind, states: list[Any], folder: Path) -> Callable[[], None]:
    def loop() -> None:
        for k in range(10**9):
            kind.save(states[k % 2], folder)

    return loop


def kill_rounds(kind: Kind, folder: Path, kills: int, seed: int) -> KillFigures:
    states = [kind.make(0), kind.make(1)]
    expected = {kind.signature(s) for s in states}
    kind.save(states[0], folder)
    t0 = time.perf_counter()
    kind.save(states[1], folder)
    save_time = time.perf_counter() - t0
    rng, fig = random.Random(seed), KillFigures()
    for _ in range(kills):
        proc = start(save_forever(kind, states, folder))
        time.sleep(rng.uniform(0.0, 3 * save_time))
        kill(proc)
        fig.kills += 1
        fig.interrupted += any(p.name.startswith(".tmp-") for p in folder.iterdir())
        try:
            fig.failed_loads += kind.load(folder) not in expected
        except Exception:
            fig.failed_loads += 1
        fig.untidy_after_open += not tidy(folder)
    return fig


def check_kills(kind: Kind, tmp_path: Path, kills: int) -> None:
    fig = kill_rounds(kind, tmp_path / kind.name, kills, seed=kills)
    print(f"\n[faults] SIGKILL {kind.name}: {fig}")
    assert fig.failed_loads == 0 and fig.untidy_after_open == 0, fig
    assert fig.interrupted > 0, "no kill landed inside a save: the test proves nothing"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_sigkill_while_saving_leaves_old_or_new(kind, tmp_path):
    check_kills(kind, tmp_path, KILLS)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_sigkill_while_saving_many_times(kind, tmp_path):
    check_kills(kind, tmp_path, KILLS_SLOW)


# ------------------------------------------------------------------ the adapter store
def store_bank() -> ExpertBank:
    return ExpertBank(base_model(), targets="all-linear")


def put_experts(root: Path, names: list[str]) -> Callable[[], None]:
    def loop() -> None:
        bank, store = store_bank(), AdapterStore(root, store_bank())
        for name in names:
            torch.manual_seed(int(name.split("-")[-1]))
            bank.add_expert(name, ExpertConfig(rank=4, init="random"), trainable=False)
            store.put(bank, name)

    return loop


def check_store(root: Path, expected: dict[str, str]) -> tuple[list[str], bool]:
    """Open the store and load every expert; returns its names (id order) and whether each
    expert's tensors are the ones put and every folder is tidy after the open."""
    store = AdapterStore(root, store_bank())
    names = [store.name_of(i) for i in store.ids]
    store.ensure(names)
    good = all(bank_digest(store.bank, n) == expected[n] for n in names)
    folders = [root / "catalogue"] + [root / "experts" / n for n in names]
    return names, good and all(tidy(f) for f in folders) and \
        sorted(os.listdir(root / "experts")) == sorted(names)


def bank_digest(bank: ExpertBank, name: str) -> str:
    return digest(*bank.expert_state(name).values())


def expected_experts(names: list[str]) -> dict[str, str]:
    bank = store_bank()
    out = {}
    for name in names:
        torch.manual_seed(int(name.split("-")[-1]))
        bank.add_expert(name, ExpertConfig(rank=4, init="random"), trainable=False)
        out[name] = bank_digest(bank, name)
    return out


def check_store_kills(tmp_path: Path, kills: int) -> None:
    sequence = [f"e-{i}" for i in range(10 * kills)]
    expected = expected_experts(sequence)
    rng, fig = random.Random(kills), KillFigures()
    root = tmp_path / "store"
    for _ in range(kills):
        done = len(AdapterStore(root, store_bank()))
        proc = start(put_experts(root, sequence[done:]))
        time.sleep(rng.uniform(0.01, 0.08))
        kill(proc)
        fig.kills += 1
        fig.interrupted += any(True for _ in root.rglob(".tmp-*"))
        try:
            names, tidy_ok = check_store(root, expected)
            fig.failed_loads += names != sequence[: len(names)]
            fig.untidy_after_open += not tidy_ok
        except Exception:
            fig.failed_loads += 1
    print(f"\n[faults] SIGKILL store: {fig}")
    assert fig.failed_loads == 0 and fig.untidy_after_open == 0, fig
    assert fig.interrupted > 0, "no kill landed inside a put: the test proves nothing"


def test_sigkill_while_putting_into_a_store(tmp_path):
    check_store_kills(tmp_path, KILLS)


@pytest.mark.slow
def test_sigkill_while_putting_into_a_store_many_times(tmp_path):
    check_store_kills(tmp_path, KILLS_SLOW // 2)


def test_two_store_handles_lose_no_update_and_share_no_id(tmp_path):
    root = tmp_path / "store"
    AdapterStore(root, store_bank())
    names = [[f"p{w}-{i}" for i in range(w * 100, w * 100 + 12)] for w in range(2)]
    expected = expected_experts(names[0] + names[1])
    procs = [start(put_experts(root, n)) for n in names]
    loads = failed = 0
    while any(p.is_alive() for p in procs):  # a reader opens the store and loads all it lists
        loads += 1
        try:
            store = AdapterStore(root, store_bank())
            listed = [store.name_of(i) for i in store.ids]
            store.ensure(listed)
            failed += not all(bank_digest(store.bank, n) == expected[n] for n in listed)
        except Exception:
            failed += 1
    for p in procs:
        p.join()
    store = AdapterStore(root, store_bank())
    held = [store.name_of(i) for i in store.ids]
    lost = 24 - len(set(held))
    print(f"\n[faults] concurrent store puts: 24 tried, {len(held)} held, {lost} lost; "
          f"{loads} loads during them, {failed} failed")
    assert [p.exitcode for p in procs] == [0, 0] and failed == 0
    assert sorted(held) == sorted(names[0] + names[1]) and store.ids == list(range(24))
    assert check_store(root, expected)[1]


# ------------------------------------------------------------------ concurrency
def save_n(kind: Kind, state: Any, folder: Path, n: int) -> Callable[[], None]:
    def loop() -> None:
        for _ in range(n):
            kind.save(state, folder)

    return loop


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_two_writers_and_a_reader(kind, tmp_path):
    folder = tmp_path / kind.name
    states = [kind.make(0), kind.make(1)]
    expected = {kind.signature(s) for s in states}
    kind.save(states[0], folder)
    procs = [start(save_n(kind, s, folder, 15)) for s in states]
    loads = failed = 0
    while any(p.is_alive() for p in procs):
        loads += 1
        try:
            failed += kind.load(folder) not in expected
        except Exception:
            failed += 1
    for p in procs:
        p.join()
    print(f"\n[faults] {kind.name}: 2 writers x 15 saves, {loads} loads during them, "
          f"{failed} failed")
    assert [p.exitcode for p in procs] == [0, 0] and failed == 0 and loads > 0
    assert kind.load(folder) in expected and tidy(folder)


# ------------------------------------------------------------------ bit flips
def flip_every_file(folder: Path, load: Callable[[], Any], seed: int) -> tuple[int, int]:
    """Flip 8 random bits (one at a time) in each file of the artefact(s) under ``folder``;
    returns (flips tried, flips detected)."""
    rng, tried, detected = random.Random(seed), 0, 0
    files = [f for root in sorted({p.parent for p in folder.rglob("CURRENT")})
             for f in artefact_files(root)]
    for path in files:
        good = path.read_bytes()
        for bit in rng.sample(range(8 * len(good)), min(8, 8 * len(good))):
            data = bytearray(good)
            data[bit // 8] ^= 1 << (bit % 8)
            path.write_bytes(bytes(data))
            tried += 1
            try:
                load()
            except CorruptFileError:
                detected += 1
            path.write_bytes(good)
    load()  # restored: loads again
    return tried, detected


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_a_bit_flip_in_any_file_is_detected(kind, tmp_path):
    kind.save(kind.make(1), tmp_path)
    tried, detected = flip_every_file(tmp_path, lambda: kind.load(tmp_path), seed=3)
    print(f"\n[faults] bit flips {kind.name}: {tried} tried, {detected} detected")
    assert detected == tried > 0


def test_a_bit_flip_in_any_store_file_is_detected(tmp_path):
    names = ["e-1", "e-2"]
    put_experts(tmp_path, names)()
    tried, detected = flip_every_file(
        tmp_path, lambda: AdapterStore(tmp_path, store_bank()).ensure(names), seed=4)
    print(f"\n[faults] bit flips store: {tried} tried, {detected} detected")
    assert detected == tried > 0
