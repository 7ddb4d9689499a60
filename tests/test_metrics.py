"""Continual metrics against hand-computed matrices, and the cross-process sync of their states."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_lora.continual.metrics import (
    AccuracyMatrix,
    RouterAccuracy,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)

NAN = float("nan")
# R[i][j]: accuracy on task j after training task i. R[1][0] > R[0][0] and R[0][1] > R[1][1] make
# the max in the forgetting formula and its range l >= j matter.
R = [
    [0.90, 0.85, 0.20],
    [0.95, 0.80, 0.30],
    [0.60, 0.50, 0.95],
]
BASELINE = [0.1, 0.2, 0.25]


def test_scalar_metrics_by_hand() -> None:
    assert average_accuracy(R) == pytest.approx((0.60 + 0.50 + 0.95) / 3)
    # j=0: max(0.90, 0.95) - 0.60; j=1: max(0.80) - 0.50 (R[0][1] precedes learning task 1)
    assert forgetting(R) == pytest.approx((0.35 + 0.30) / 2)
    assert backward_transfer(R) == pytest.approx(((0.60 - 0.90) + (0.50 - 0.80)) / 2)
    assert forward_transfer(R, BASELINE) == pytest.approx(((0.85 - 0.2) + (0.30 - 0.25)) / 2)
    assert forward_transfer(R, None) is None


def test_partial_run_uses_completed_block() -> None:
    partial = torch.tensor([[0.9, NAN, NAN], [0.95, 0.8, NAN], [NAN, NAN, NAN]])
    assert average_accuracy(partial) == pytest.approx(0.875)
    assert forgetting(partial) == pytest.approx(0.90 - 0.95)
    assert backward_transfer(partial) == pytest.approx(0.95 - 0.90)
    assert forward_transfer(partial, BASELINE) is None  # R[0][1] never evaluated


def test_single_task_and_bad_input() -> None:
    one = [[0.7]]
    assert (average_accuracy(one), forgetting(one), backward_transfer(one)) == (0.7, 0.0, 0.0)
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError, match="no evaluated entry"):
        forgetting(torch.full((2, 2), NAN))


def test_accuracy_matrix_accumulates() -> None:
    metric = AccuracyMatrix(n_tasks=2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])  # argmax 0, 1, 0, 1
    metric.update(0, 0, logits, torch.tensor([0, 1, 1, 1]))  # 3/4
    metric.update(0, 0, torch.tensor([1]), torch.tensor([1]))  # 4/5 overall
    metric.update(1, 1, torch.tensor([2, 3]), torch.tensor([2, 2]))  # 1/2
    r = metric.compute()
    assert r[0, 0] == pytest.approx(0.8) and r[1, 1] == pytest.approx(0.5)
    assert math.isnan(r[0, 1]) and math.isnan(r[1, 0])
    with pytest.raises(ValueError, match="eval_task=2"):
        metric.update(0, 2, torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="do not match"):
        metric.update(0, 0, torch.tensor([0, 1]), torch.tensor([0]))


def test_router_accuracy() -> None:
    metric = RouterAccuracy()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute())
    weights = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3]])  # argmax 0, 1, 0
    metric.update(weights, torch.tensor([0, 1, 2]))
    metric.update(torch.tensor([2]), torch.tensor([2]))
    assert float(metric.compute()) == pytest.approx(3 / 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        acc, router = AccuracyMatrix(n_tasks=2), RouterAccuracy()
        if rank == 0:  # 2/2 right on (0, 0); routes 1/2 right
            acc.update(0, 0, torch.tensor([0, 1]), torch.tensor([0, 1]))
            router.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
        else:  # 0/2 right on (0, 0), 1/1 on (1, 1); routes 2/2 right
            acc.update(0, 0, torch.tensor([1, 0]), torch.tensor([0, 1]))
            acc.update(1, 1, torch.tensor([3]), torch.tensor([3]))
            router.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
        payload = {"R": acc.compute().tolist(), "router": float(router.compute())}
        Path(out, f"rank{rank}.json").write_text(json.dumps(payload))
    finally:
        dist.destroy_process_group()


def test_metrics_sync_across_two_processes(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        r = got["R"]
        assert r[0][0] == pytest.approx(0.5) and r[1][1] == pytest.approx(1.0)
        assert math.isnan(r[0][1]) and math.isnan(r[1][0])
        assert got["router"] == pytest.approx(3 / 4)
