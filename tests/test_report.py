"""Report files: accuracy-matrix CSV and heatmap, strategy bar chart, routing-weight CSV and heatmap."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from moe_lora.core.report import (
    plot_accuracy_matrix,
    plot_routing_weights,
    plot_strategy_comparison,
    write_accuracy_matrix_csv,
    write_routing_weights_csv,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
R = torch.tensor([[0.9, float("nan")], [0.61234567890123, 0.8]], dtype=torch.float64)


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR" and len(data) > 1000
    assert not list(path.parent.glob(".*.tmp"))  # no temp file left behind


def test_accuracy_matrix_csv_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "out" / "accuracy_matrix_naive.csv"
    write_accuracy_matrix_csv(path, R, task_names=["a", "b"])
    rows = _read_csv(path)
    assert rows[0][1:] == ["a", "b"] and [r[0] for r in rows[1:]] == ["a", "b"]
    values = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]], dtype=torch.float64)
    assert torch.equal(torch.nan_to_num(values, nan=-1.0), torch.nan_to_num(R, nan=-1.0))
    assert math.isnan(values[0, 1])
    with pytest.raises(ValueError, match="task_names"):
        write_accuracy_matrix_csv(path, R, task_names=["a"])


def test_plots_are_png(tmp_path: Path) -> None:
    plot_accuracy_matrix(tmp_path / "r.png", R, title="naive")
    results = {
        "naive": {"average_accuracy": 0.5, "forgetting": 0.4, "bwt": -0.4, "fwt": None},
        "experts-taskid": {"average_accuracy": 0.9, "forgetting": 0.0, "bwt": 0.0, "fwt": None},
    }
    plot_strategy_comparison(
        tmp_path / "bars.png", results, metrics=("average_accuracy", "bwt", "fwt")
    )
    for name in ("r.png", "bars.png"):
        _assert_png(tmp_path / name)
    with pytest.raises(ValueError, match="at least one strategy"):
        plot_strategy_comparison(tmp_path / "empty.png", {})
    assert not (tmp_path / "empty.png").exists()


def test_routing_weights_files(tmp_path: Path) -> None:
    weights = torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), -1)
    experts = ["task0", "task1", "task2"]
    write_routing_weights_csv(tmp_path / "w.csv", weights, experts, [f"x{i}" for i in range(5)])
    rows = _read_csv(tmp_path / "w.csv")
    assert rows[0] == ["input", *experts] and rows[3][0] == "x2"
    got = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]])
    assert torch.equal(got, weights)
    plot_routing_weights(tmp_path / "w.png", weights, experts)
    _assert_png(tmp_path / "w.png")
    with pytest.raises(ValueError, match="expert_names"):
        plot_routing_weights(tmp_path / "bad.png", weights, experts[:2])
