"""The benchmark suite runs end to end in --quick mode and writes valid JSON (nothing is timed here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"case", "what", "value", "unit", "goal", "met", "a_name", "b_name", "a", "b", "check",
            "status", "threads", "extra"}


def test_quick_suite_writes_valid_json(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--threads", "1",
           "--rounds", "2", "--cases", "1", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["schema"] == 1
    meta = data["meta"]
    assert meta["quick"] is True and meta["threads"] == [1] and meta["complete"] is True
    rows = data["rows"]
    assert {r["case"] for r in rows} == {"1", "4"}
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["status"] == "ok", r
        assert r["unit"] == "x" and r["value"] > 0
        if r["check"].endswith("aten kernels"):  # a launch count: no timings
            assert r["value"] == r["extra"]["kernels"] / r["extra"]["kernels_ref"] > 1.0
            continue
        assert "allclose" in r["check"] or r["check"] == "timing only"
        for side in ("a", "b"):
            t = r[side]
            assert t["rounds"] == 2 and 0 < t["min_s"] <= t["median_s"]
        if r["goal"] is not None:
            op, threshold = r["goal"].split()
            assert op in ("<=", ">=") and float(threshold) > 0
            assert isinstance(r["met"], bool)
    assert "| case |" in proc.stdout


def test_scale_case_runs_at_toy_shapes_and_stays_pending_on_the_cpu() -> None:
    """Case 12 (GPU-sized shapes) runs its code at toy shapes with ``--quick``: every per-sample
    row equals PEFT ``adapter_names`` and carries tokens/s and peak memory; at full size on the
    CPU it reports itself pending instead of running for hours."""
    from benchmarks.cases_scale import case_scale
    from benchmarks.harness import Settings

    rows = case_scale(Settings(quick=True, rounds=1, warmup=0))
    assert len(rows) == 8 and all(r.status == "ok" for r in rows)
    for r in rows:
        if "PEFT" in r.what:
            assert "allclose" in r.check, r.check
        assert r.extra["tokens_per_s"][r.a_name] > 0 and "base" in r.extra["peak_mib"]
    (pending,) = case_scale(Settings())
    assert pending.status == "pending" and "--device cuda" in pending.check
