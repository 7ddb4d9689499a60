"""What the command line does to a person's folders and terminal: a finished run is never mixed
with another (--resume / --overwrite), files honour the umask, a user error is one line without a
traceback (unless --debug), and a run prints a short, non-repeating report."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from moe_lora.cli import main
from moe_lora.continual.settings import ConfigError
from moe_lora.core.commit import read_version

SMALL = ["configs/split_digits.yaml", "strategies.run=[naive,experts-taskid]", "train.epochs=1"]


def _cli(*args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    """``python -m moe_lora.cli ARGS`` in a fresh process (optionally under ``umask``)."""
    return subprocess.run([sys.executable, "-m", "moe_lora.cli", *args], capture_output=True,
                          text=True, timeout=300,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _one_error_line(err: str) -> str:
    """The single line a user error prints (asserts there is exactly one, and no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("moe-lora: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished two-strategy run, written by a fresh process under umask 027."""
    out = tmp_path_factory.mktemp("small") / "run"
    proc = _cli("continual", *SMALL, f"output.dir={out}", umask=0o027)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ------------------------------------------------------------------ folders and files
def test_every_output_file_honours_the_umask(small_run):
    files = [p for p in small_run.rglob("*") if p.is_file()]
    dirs = [small_run, *(p for p in small_run.rglob("*") if p.is_dir())]
    assert {"results.json", "accuracy_matrix_naive.csv", "state.json",
            "tensors.safetensors"} <= {p.name for p in files}
    wrong = [f"{p.relative_to(small_run)} {stat.S_IMODE(p.stat().st_mode):o}" for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o640]  # 0o666 & ~0o027
    wrong += [f"{p.relative_to(small_run)}/ {stat.S_IMODE(p.stat().st_mode):o}" for p in dirs
              if stat.S_IMODE(p.stat().st_mode) != 0o750]  # 0o777 & ~0o027
    assert not wrong, wrong


def test_rerun_is_refused_then_overwrite_replaces_the_run(small_run, tmp_path, capsys):
    run = _copy(small_run, tmp_path / "run")
    before = (run / "results.json").read_bytes()
    args = ["continual", *SMALL, f"output.dir={run}"]

    assert main(args) == 2  # the same command again: refused, nothing touched
    line = _one_error_line(capsys.readouterr().err)
    assert "output.dir" in line and str(run) in line
    assert "--resume" in line and "--overwrite" in line
    assert (run / "results.json").read_bytes() == before

    partial = _copy(run, tmp_path / "partial")  # an interrupted run (checkpoints, no results)
    (partial / "results.json").unlink()
    assert main(["continual", *SMALL, f"output.dir={partial}"]) == 2
    assert "output.dir" in _one_error_line(capsys.readouterr().err)

    with pytest.raises(SystemExit) as exit_info:  # one or the other
        main([*args, "--resume", "--overwrite"])
    assert exit_info.value.code == 2
    capsys.readouterr()

    (run / "accuracy_matrix_stale.csv").write_text("from an earlier run\n")
    (run / "notes.txt").write_text("the user's own file\n")
    assert main(["continual", "configs/split_digits.yaml", "strategies.run=[naive]",
                 "train.epochs=2", f"output.dir={run}", "--overwrite"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert list(results["strategies"]) == ["naive"] and results["config"]["train"]["epochs"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["naive"]
    assert sorted(p.name for p in (run / "logs").iterdir() if p.name != "tensorboard") == ["naive"]
    assert not (run / "accuracy_matrix_stale.csv").exists()  # a run's file: replaced
    assert not (run / "accuracy_matrix_experts-taskid.csv").exists()
    assert (run / "notes.txt").read_text() == "the user's own file\n"  # not a run's file: kept
    mode = 0o666 & ~_process_umask()
    assert stat.S_IMODE((run / "results.json").stat().st_mode) == mode
    assert stat.S_IMODE((run / "accuracy_matrix_naive.csv").stat().st_mode) == mode


# ------------------------------------------------------------------ user errors
def test_user_errors_are_one_line_without_traceback(small_run, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    assert main(["continual", str(bad), f"output.dir={tmp_path / 'a'}"]) == 2
    assert "train.epochz" in _one_error_line(capsys.readouterr().err)

    missing = tmp_path / "no_such.jsonl"
    assert main(["continual", "configs/split_wordnet.yaml", "data.benchmark=file",
                 f"data.path={missing}", f"output.dir={tmp_path / 'b'}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "data.path" in line and str(missing) in line

    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    _one_error_line(capsys.readouterr().err)


def test_a_corrupt_checkpoint_is_one_line_naming_it(small_run, tmp_path, capsys):
    run = _copy(small_run, tmp_path / "run")
    with read_version(run / "checkpoints" / "experts") as version:
        tensors = version / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-8:] = b"\x00garbage"
    tensors.write_bytes(bytes(data))
    for args in (["evaluate", str(run)],
                 ["export", str(run), "task1", str(tmp_path / "peft")],
                 ["continual", *SMALL, f"output.dir={run}", "--resume"],
                 ["info", str(run)]):
        assert main(args) == 2, args
        assert str(version) in _one_error_line(capsys.readouterr().err), args
    assert not (tmp_path / "peft").exists()

    other = _copy(small_run, tmp_path / "other")
    current = other / "checkpoints" / "naive" / "CURRENT"
    current.write_text('{"version": ')  # a truncated pointer
    assert main(["evaluate", str(other)]) == 2
    assert str(current) in _one_error_line(capsys.readouterr().err)


def test_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="train.epochz"):
        main(["continual", str(bad), "--debug"])
    proc = _cli("continual", str(bad), "--debug")
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "train.epochz" in proc.stderr
    proc = _cli("continual", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.epochz" in _one_error_line(proc.stderr)


# ------------------------------------------------------------------ the console
TIPS = ("💡", "Tip:", "LOCAL_RANK", "GPU available", "TPU available", "HPU available",
        "Traceback", "litlogger", "lightning.ai")


@pytest.fixture
def terminal(capfd, monkeypatch):
    """What a terminal would show of an in-process command: stdout and stderr (capfd), with the
    log handlers that libraries made at import (before the capture) writing to it too, and the
    warnings Python would print under its default filters.

    Returns a function giving the shown lines (as a terminal shows ``\r`` updates: the last).
    """
    for logger in [logging.getLogger(), *map(logging.getLogger,
                                             list(logging.Logger.manager.loggerDict))]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                monkeypatch.setattr(handler, "stream", sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # Python's defaults for a command, not pytest's
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                         ResourceWarning):
            warnings.filterwarnings("ignore", category=category)

        def shown() -> tuple[list[str], str]:
            captured = capfd.readouterr()
            text = captured.out + captured.err + "".join(
                warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
            lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
            return [line for line in lines if line.strip()], text

        yield shown


def test_a_run_prints_a_short_report_without_repeats_or_tips(tmp_path, terminal):
    out = tmp_path / "run"
    assert main(["continual", "configs/split_digits.yaml", "train.epochs=2",
                 f"output.dir={out}"]) == 0
    shown, text = terminal()
    assert len(shown) <= 40, "\n".join(shown)
    repeated = {line for line in shown if shown.count(line) > 1 and set(line) != {"-"}}
    assert not repeated, repeated
    for tip in TIPS:
        assert tip not in text, tip
    results = json.loads((out / "results.json").read_text())
    for name in results["strategies"]:  # the table has every result
        assert any(line.startswith(f"{name} ") for line in shown), name
    assert sum("results written to" in line for line in shown) == 1
