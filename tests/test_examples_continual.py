"""examples/continual_smollm2.py --fast runs end to end and its experts learn their labels."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "continual_smollm2.py"


@pytest.mark.slow
def test_continual_smollm2_fast_learns_each_task():
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--fast"], capture_output=True, text=True,
                          timeout=300, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    acc = report["accuracy_matrix"]
    assert len(acc) == 2
    for i, row in enumerate(acc):  # R[i][j] for every seen task, nan after
        assert all(0.0 <= a <= 1.0 for a in row[: i + 1]), row
        assert all(math.isnan(a) for a in row[i + 1 :]), row
    loss = report["label_loss"]
    # each task's expert lowers the loss of the true labels on that task's test glosses
    assert len(loss["before"]) == len(loss["after"]) == 2
    for before, after in zip(loss["before"], loss["after"], strict=True):
        assert after < 0.75 * before, loss
