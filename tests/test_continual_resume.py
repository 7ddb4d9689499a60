"""SIGKILL in the middle of a task, resume: the results equal an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moe_lora.core.commit import read_version

ARGS = ["configs/split_digits.yaml", "strategies.run=[naive,replay,experts-taskid,experts-retrieval,experts-mole]",
        "train.epochs=8"]


def _cmd(out, *extra):
    return [sys.executable, "-m", "moe_lora.cli", "continual", *ARGS, f"output.dir={out}", *extra]


def _completed(folder):
    """Steps of the strategy's last committed checkpoint (None: none committed yet)."""
    try:
        with read_version(folder) as version:
            return json.loads((version / "state.json").read_text())["record"]["completed"]
    except (FileNotFoundError, KeyError, ValueError):  # none yet, or replaced while reading
        return None


def _strip(results):
    return {n: {k: v for k, v in e.items() if k != "train_seconds"}
            for n, e in results["strategies"].items()}


@pytest.mark.slow
def test_sigkill_mid_task_then_resume_equals_uninterrupted(tmp_path):
    full = tmp_path / "full"
    subprocess.run(_cmd(full), check=True, capture_output=True, timeout=240)
    expected = _strip(json.loads((full / "results.json").read_text()))

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    replay = cut / "checkpoints" / "replay"
    deadline = time.time() + 180
    while time.time() < deadline:  # wait until replay has finished 2 of 5 tasks, then kill
        if (_completed(replay) or 0) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "results.json").exists()
    done = _completed(replay)
    assert done is not None and 2 <= done < 5

    subprocess.run(_cmd(cut, "--resume"), check=True, capture_output=True, timeout=240)
    assert _strip(json.loads((cut / "results.json").read_text())) == expected
