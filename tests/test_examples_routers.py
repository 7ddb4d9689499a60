"""The routers example runs end to end in its fast mode."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "route_in_your_code.py"


def test_route_in_your_code_runs_fast(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--fast", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("task-id routing", "TopKRouter", "MoLERouter", "LoRAHub", "retrieval routing"):
        assert line in proc.stdout, proc.stdout
    assert "own expert 100%" in proc.stdout
    assert {p.name for p in tmp_path.iterdir()} >= {"TopKRouter.png", "MoLERouter.csv"}
