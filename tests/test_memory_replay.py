"""ReplayBuffer: reservoir statistics, balancing, exact persistence, and mixing into batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from storage_helpers import recommit, version_dir

from moe_lora.core.io import CorruptFileError
from moe_lora.memory import ReplayBuffer, ReplayConfig, mixed_loader

torch.set_num_threads(1)


def held_ids(buffer: ReplayBuffer) -> list[int]:
    return [int(item["idx"][0]) for item in buffer.as_dataset()]


def stream(buffer: ReplayBuffer, labels, tasks, start: int = 0) -> None:
    n = len(labels)
    idx = torch.arange(start, start + n)[:, None]
    buffer.add(torch.as_tensor(labels), torch.as_tensor(tasks), idx=idx)


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="ReplayConfig.capacity"):
        ReplayConfig(capacity=0)
    with pytest.raises(ValueError, match="ReplayConfig.balance"):
        ReplayConfig(capacity=4, balance="label")


def test_reservoir_keeps_every_example_with_equal_probability():
    capacity, n, trials = 10, 50, 2000
    counts = np.zeros(n)
    for t in range(trials):
        buffer = ReplayBuffer(ReplayConfig(capacity=capacity, seed=t))
        stream(buffer, [0] * n, [0] * n)
        assert len(buffer) == capacity and buffer.n_seen == n
        counts[held_ids(buffer)] += 1
    freq = counts / trials
    print(
        f"inclusion frequency: min {freq.min():.3f} max {freq.max():.3f}, expected {capacity / n}"
    )
    assert np.abs(freq - capacity / n).max() < 0.05  # 5.6 standard deviations
    assert chisquare(counts, np.full(n, trials * capacity / n)).pvalue > 1e-3


def test_reservoir_is_deterministic_under_its_seed():
    runs = []
    for seed in (1, 1, 2):
        buffer = ReplayBuffer(ReplayConfig(capacity=8, seed=seed))
        stream(buffer, list(range(100)), [0] * 100)
        runs.append(held_ids(buffer))
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_class_balance_splits_the_budget_and_keeps_small_classes():
    rng = np.random.default_rng(0)
    labels = rng.permutation([0] * 300 + [1] * 60 + [2] * 12)
    buffer = ReplayBuffer(ReplayConfig(capacity=60, balance="class", seed=3))
    stream(buffer, labels, [0] * len(labels))
    counts = {g[0]: n for g, n in buffer.group_counts().items()}
    assert counts[2] == 12  # fewer than its share: all kept
    assert counts[0] + counts[1] == 48 and abs(counts[0] - counts[1]) <= 1
    held = Counter(int(item["label"]) for item in buffer.as_dataset())
    assert held == Counter(counts)


def test_task_balance_with_tasks_arriving_in_sequence():
    buffer = ReplayBuffer(ReplayConfig(capacity=30, balance="task", seed=4))
    for task in range(3):
        stream(buffer, [7] * 100, [task] * 100, start=100 * task)
        assert sum(buffer.group_counts().values()) == 30
    assert buffer.group_counts() == {(0,): 10, (1,): 10, (2,): 10}
    for item in buffer.as_dataset():  # each example is filed under its own task
        assert int(item["idx"][0]) // 100 == int(item["task"])


def test_task_class_balance():
    buffer = ReplayBuffer(ReplayConfig(capacity=40, balance="task_class", seed=5))
    for task in range(2):
        stream(buffer, [0, 1] * 100, [task] * 200, start=200 * task)
    assert buffer.group_counts() == {(0, 0): 10, (0, 1): 10, (1, 0): 10, (1, 1): 10}


def filled_buffer(seed: int = 6) -> ReplayBuffer:
    """A task-balanced buffer with texts, ragged token ids and fixed-size features."""
    buffer = ReplayBuffer(ReplayConfig(capacity=12, balance="task", seed=seed))
    gen = torch.Generator().manual_seed(seed)
    for task in range(2):
        add_batch(buffer, task, 20, gen)
    return buffer


def add_batch(buffer: ReplayBuffer, task: int, n: int, gen: torch.Generator) -> None:
    lengths = torch.randint(1, 9, (n,), generator=gen).tolist()
    buffer.add(
        torch.randint(0, 3, (n,), generator=gen),
        task,
        texts=[f"task {task} example {i}: ünïcode" for i in range(n)],
        input_ids=[torch.randint(0, 1000, (k,), generator=gen) for k in lengths],
        features=torch.randn(n, 4, 2, generator=gen),
    )


def assert_same_contents(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert len(a) == len(b) and a.n_seen == b.n_seen and a.group_counts() == b.group_counts()
    for x, y in zip(a.as_dataset(), b.as_dataset(), strict=True):
        assert x.keys() == y.keys() and x["text"] == y["text"]
        for key in ("label", "task", "input_ids", "features"):
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key])


def test_save_load_round_trip_is_exact_and_continues_identically(tmp_path: Path):
    original = filled_buffer()
    original.save(tmp_path)
    loaded = ReplayBuffer.load(tmp_path)
    assert loaded.config == original.config
    assert_same_contents(original, loaded)
    for buffer in (original, loaded):
        add_batch(buffer, 2, 30, torch.Generator().manual_seed(99))
    assert_same_contents(original, loaded)
    assert original.group_counts() == {(0,): 4, (1,): 4, (2,): 4}


def test_schema_changes_are_refused():
    buffer = filled_buffer()
    with pytest.raises(ValueError, match="fields of the first call"):
        buffer.add(torch.zeros(2), 0, texts=["a", "b"], features=torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="texts"):
        buffer.add(torch.zeros(1), 0, input_ids=[torch.zeros(3)], features=torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="'features' has 1 examples"):
        buffer.add(
            torch.zeros(2),
            0,
            texts=["a", "b"],
            input_ids=[torch.zeros(1)] * 2,
            features=torch.zeros(1, 4, 2),
        )


def test_corrupted_files_are_refused(tmp_path: Path):
    filled_buffer().save(tmp_path)
    tensors = version_dir(tmp_path) / "replay.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="replay.safetensors: checksum mismatch"):
        ReplayBuffer.load(tmp_path)
    recommit(tmp_path, lambda tmp: (tmp / "replay.json").write_text('{"format": "other"}'))
    with pytest.raises(CorruptFileError, match="not a replay buffer"):
        ReplayBuffer.load(tmp_path)


def test_mixed_loader_puts_a_fixed_share_of_replay_in_every_batch():
    replay = ReplayBuffer(ReplayConfig(capacity=10, seed=0))
    stream(replay, [1] * 30, [0] * 30)
    new = ReplayBuffer(ReplayConfig(capacity=50, seed=0))  # 50 examples of the new task
    stream(new, [2] * 50, [1] * 50, start=1000)
    task_set = new.as_dataset()

    def epochs(seed: int) -> list[list[list[int]]]:
        loader = mixed_loader(task_set, replay, ratio=0.25, batch_size=8, seed=seed)
        return [[batch["idx"][:, 0].tolist() for batch in loader] for _ in range(2)]

    first, second = epochs(0)
    assert len(first) == 9  # 50 new examples, 6 per batch
    for batch in first[:-1]:
        assert sum(i >= 1000 for i in batch) == 6 and sum(i < 1000 for i in batch) == 2
    new_seen = sorted(i for batch in first for i in batch if i >= 1000)
    assert new_seen == list(range(1000, 1050))  # every new example once per epoch
    replay_seen = [i for batch in first for i in batch if i < 1000]
    assert set(replay_seen) <= set(held_ids(replay)) and len(set(replay_seen[:10])) == 10
    assert epochs(0) == [first, second] and first != second and epochs(1)[0] != first
