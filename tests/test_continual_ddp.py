"""Two CPU processes (DDP, gloo) give the single-process results, identical state on every rank
(experts, MoLE gates and the Bayes router's statistics included)."""

import json
import subprocess
import sys

import pytest
import torch

STRATEGIES = "[naive,experts-taskid,experts-retrieval,experts-mole,experts-stats]"


def _run(out, *extra):
    cmd = [sys.executable, "-m", "moe_lora.cli", "continual", "configs/split_digits.yaml",
           f"output.dir={out}", f"strategies.run={STRATEGIES}", "train.epochs=6", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, device):
    """gloo on the CPU; with ``--device cuda`` also NCCL on two GPUs (skipped with fewer)."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL DDP needs two GPUs, torch sees {torch.cuda.device_count()}")
    acc = "train.accelerator=" + ("gpu" if device.type == "cuda" else "cpu")
    _, single = _run(tmp_path / "one", acc)
    proc, multi = _run(tmp_path / "two", acc, "train.devices=2", "train.strategy=ddp")
    assert multi["processes"]["world_size"] == 2
    assert set(multi["processes"]["state_sha256"]) == {"naive", "experts"}  # one per strategy
    for strategy, digests in multi["processes"]["state_sha256"].items():
        assert len(digests) == 2 and digests[0] == digests[1], strategy  # banks equal
    assert proc.stderr.count("results written to") == 1  # rank 0 alone reports and writes
    assert proc.stdout.count("train s") == 1  # the results table, once
    for name, e in single["strategies"].items():
        m = multi["strategies"][name]
        assert m["average_accuracy"] == pytest.approx(e["average_accuracy"], abs=0.06), name
        assert m["forgetting"] == pytest.approx(e["forgetting"], abs=0.1), name
    assert multi["strategies"]["experts-taskid"]["forgetting"] <= 0.01
