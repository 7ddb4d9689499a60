"""Timing, checking and reporting for the benchmark suite.

Method (issue 6): every compared pair runs in one process, after a warm-up, in interleaved rounds
(A B A B ...), and the minimum over the rounds is the reported time (the median is recorded too).
Each speed case first checks that both sides compute the same result (:func:`check_close`) or, when
their semantics differ, states what it compared in :attr:`Row.check`.

A :class:`Row` is one line of the results table: two timings ``a`` and ``b`` (seconds; either may be
absent for absolute measurements), the ``value`` compared with the goal (a ratio, a percentage, a
time in ms or a recall), the goal itself and whether it was met.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from moe_lora.core.io import atomic_write_json

__all__ = [
    "Goal",
    "Row",
    "Settings",
    "Timing",
    "check_close",
    "count_kernels",
    "peak_memory",
    "time_interleaved",
    "format_table",
    "write_results",
]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Goal:
    """``value <op> threshold`` with ``op`` one of ``"<="`` / ``">="``."""

    op: str
    threshold: float

    def met(self, value: float) -> bool:
        return value <= self.threshold if self.op == "<=" else value >= self.threshold

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}"


@dataclass
class Settings:
    """How a run measures: device, dtype, rounds, thread count."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    rounds: int = 10
    warmup: int = 2
    quick: bool = False
    threads: int = 1

    def sync(self) -> None:
        """Wait for queued device work (a no-op on CPU)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    @property
    def tol(self) -> dict[str, float]:
        """allclose tolerances for this dtype."""
        if self.dtype == torch.bfloat16:
            return {"rtol": 5e-2, "atol": 5e-2}
        if self.dtype == torch.float16:
            return {"rtol": 1e-2, "atol": 1e-2}
        return {"rtol": 1e-4, "atol": 1e-4}


@dataclass
class Timing:
    """Seconds per call over the interleaved rounds."""

    min_s: float
    median_s: float
    rounds: int


@dataclass
class Row:
    """One line of the results table (see the module docstring)."""

    case: str
    what: str
    value: float | None = None
    unit: str = "x"
    goal: str | None = None
    met: bool | None = None
    a_name: str | None = None
    b_name: str | None = None
    a: Timing | None = None
    b: Timing | None = None
    check: str = ""
    status: str = "ok"  # ok | pending | error
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def ratio(
        cls,
        case: str,
        what: str,
        a: tuple[str, Timing],
        b: tuple[str, Timing],
        goal: Goal | None,
        check: str,
        *,
        invert: bool = False,
        **extra: Any,
    ) -> Row:
        """``a.min / b.min`` (or ``b / a`` with ``invert``: a throughput ratio) against ``goal``."""
        value = b[1].min_s / a[1].min_s if invert else a[1].min_s / b[1].min_s
        return cls(
            case, what, value, "x", None if goal is None else str(goal),
            None if goal is None else goal.met(value), a[0], b[0], a[1], b[1], check, extra=extra,
        )

    @classmethod
    def measured(
        cls, case: str, what: str, value: float, unit: str, goal: Goal | None, check: str, **kw: Any
    ) -> Row:
        """An absolute measurement (ms, %, recall) against ``goal``."""
        return cls(
            case, what, value, unit, None if goal is None else str(goal),
            None if goal is None else goal.met(value), check=check, **kw,
        )

    @classmethod
    def launches(cls, case: str, what: str, a: Callable[[], Any], b: Callable[[], Any]) -> Row:
        """Kernels one call of ``a`` launches over those of ``b`` (:func:`count_kernels`): the
        device-independent side of a launch-bound ratio (reference; no goal)."""
        ka, kb = sum(count_kernels(a).values()), sum(count_kernels(b).values())
        return cls.measured(case, what, ka / kb, "x", None, f"{ka} vs {kb} aten kernels",
                            extra={"kernels": ka, "kernels_ref": kb})

    @classmethod
    def pending(cls, case: str, what: str, goal: Goal | None, reason: str) -> Row:
        """A case whose component is not there yet."""
        return cls(case, what, goal=None if goal is None else str(goal), status="pending",
                   check=reason)

    @classmethod
    def error(cls, case: str, what: str, goal: Goal | None, message: str) -> Row:
        """A case that failed (a check or an exception); the run exits non-zero."""
        return cls(case, what, goal=None if goal is None else str(goal), status="error",
                   check=message)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], settings: Settings, rounds: int | None = None
) -> dict[str, Timing]:
    """Time each callable in interleaved rounds (A B C A B C ...) after ``settings.warmup`` calls.

    Returns:
        name -> :class:`Timing` (min and median seconds per call).
    """
    n = rounds or settings.rounds
    for _ in range(settings.warmup):
        for fn in fns.values():
            fn()
    settings.sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            settings.sync()
            samples[name].append(time.perf_counter() - t0)
    return {k: Timing(min(v), statistics.median(v), n) for k, v in samples.items()}


def check_close(what: str, a: torch.Tensor, b: torch.Tensor, settings: Settings) -> str:
    """Assert ``a`` and ``b`` are allclose at the dtype's tolerance; returns a description.

    Raises:
        AssertionError: they differ (the message gives the largest absolute difference).
    """
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape or not torch.allclose(a, b, **settings.tol):
        diff = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
        raise AssertionError(f"{what}: results differ (shapes {tuple(a.shape)} vs "
                             f"{tuple(b.shape)}, max abs diff {diff:.3g})")
    return f"{what}: allclose (rtol={settings.tol['rtol']:g})"


_VIEWS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "t", "transpose", "permute",
    "unsqueeze", "squeeze", "select", "slice", "alias", "detach", "as_strided", "split",
    "unbind", "lift_fresh", "view_as", "unflatten", "flatten", "narrow", "diagonal",
})


def count_kernels(fn: Callable[[], Any]) -> dict[str, int]:
    """The aten operations one call of ``fn`` dispatches, by name, views excluded.

    Each such operation launches at least one kernel on a GPU, so the total is the launch count
    that bounds a launch-bound forward (small batches, decode). Counted below autograd by the
    dispatcher: the same on every device, measurable without a GPU.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, int] = {}

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func.overloadpacket.__name__
            if name not in _VIEWS:
                counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return counts


@contextmanager
def peak_memory(settings: Settings) -> Iterator[dict[str, float]]:
    """Peak tensor memory allocated inside the block, in MiB, above what was live at its start.

    CPU: summed from the torch profiler's allocation events (the PyTorch allocator, not the
    process RSS, which glibc keeps high). CUDA: ``torch.cuda.max_memory_allocated``.
    """
    out: dict[str, float] = {}
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    out["peak_mib"] = peak / 2**20


def format_table(rows: list[Row]) -> str:
    """The results as a Markdown table (case, A, B, value, goal, met)."""

    def ms(t: Timing | None) -> str:
        return "" if t is None else f"{t.min_s * 1e3:.2f} ms"

    lines = [
        "| thr | case | what | A | B | value | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = f"{r.a_name}: {ms(r.a)}" if r.a_name else ""
        b = f"{r.b_name}: {ms(r.b)}" if r.b_name else ""
        value = "" if r.value is None else f"{r.value:.3g} {r.unit}".strip()
        met = {True: "yes", False: "**no**", None: ""}[r.met] if r.status == "ok" else r.status
        lines.append(f"| {r.threads} | {r.case} | {r.what} | {a} | {b} | {value} | "
                     f"{r.goal or ''} | {met} |")
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("peft", "transformers", "faiss-cpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_results(path: Path, rows: list[Row], meta: Mapping[str, Any]) -> None:
    """Write the run as JSON (atomically): ``{"schema", "meta", "rows": [...]}``."""
    payload = {
        "schema": SCHEMA_VERSION,
        "meta": {
            **meta,
            "host": platform.node(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "created": datetime.now(timezone.utc).isoformat(),
            "versions": _versions(),
        },
        "rows": [asdict(r) for r in rows],
    }
    atomic_write_json(path, payload)
