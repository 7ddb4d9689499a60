"""Run the moe-lora benchmark suite (issue 6) and write ``benchmarks/results/<name>.json``.

    python benchmarks/run.py                       # full CPU suite, 1 and 2 threads
    python benchmarks/run.py --quick --cases 1 3   # a short run of two cases
    python benchmarks/run.py --device cuda --dtype bf16 --threads 1

Every case prints its rows as it finishes; a case that fails its equality check or raises becomes
an ``error`` row and the run exits with status 1. See docs/performance.md for the method.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/run.py` from anywhere

import torch  # noqa: E402

from benchmarks import cases_inference, cases_routing, cases_scale, cases_train  # noqa: E402
from benchmarks.fixtures import random_weights  # noqa: E402
from benchmarks.harness import Row, Settings, format_table, write_results  # noqa: E402

CaseFn = Callable[[Settings], list[Row]]

# (case ids, function): one function may measure several cases in one interleaved group.
CASES: list[tuple[tuple[str, ...], CaseFn]] = [
    (("1",), cases_inference.case_layer),
    (("2",), cases_inference.case_merged),
    (("3", "10"), cases_inference.case_mixed),
    (("4",), cases_inference.case_decode),
    (("5", "11"), cases_train.case_training),
    (("6",), cases_train.case_olora),
    (("7",), cases_routing.case_router),
    (("8",), cases_routing.case_retrieval),
    (("9",), cases_inference.case_growth),
    (("12",), cases_scale.case_scale),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds (smoke test)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    p.add_argument("--cases", nargs="+", default=None, help="case ids to run (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10, quick 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--name", default=None, help="results name (default: host name)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/<name>.json)")
    return p.parse_args(argv)


def run_case(ids: tuple[str, ...], fn: CaseFn, settings: Settings) -> list[Row]:
    """Run one case function; an exception becomes an error row (the suite goes on)."""
    try:
        rows = fn(settings)
    except Exception as err:  # noqa: BLE001 - reported in the table and the exit status
        traceback.print_exc()
        rows = [Row.error(ids[0], fn.__name__, None, f"{type(err).__name__}: {err}")]
    for r in rows:
        r.threads = settings.threads
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    selected = [(ids, fn) for ids, fn in CASES
                if args.cases is None or set(ids) & set(args.cases)]
    name = args.name or platform.node() or "results"
    out = args.out or ROOT / "benchmarks" / "results" / f"{name}.json"
    rows: list[Row] = []
    started = time.perf_counter()
    meta = {
        "name": name,
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": args.device,
        "dtype": args.dtype,
        "quick": args.quick,
        "threads": args.threads,
        "cases": args.cases,
        "weights": "random" if random_weights() else "pretrained",
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        settings = Settings(device=args.device, dtype=DTYPES[args.dtype], quick=args.quick,
                            rounds=args.rounds or (3 if args.quick else 10),
                            warmup=1 if args.quick else 2, threads=threads)
        for ids, fn in selected:
            t0 = time.perf_counter()
            new = run_case(ids, fn, settings)
            rows += new
            print(format_table(new).split("\n", 2)[2], f"  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            # rewritten after every case: an interrupted run keeps what it measured
            write_results(out, rows, {**meta, "complete": False})
    print("\n" + format_table(rows))
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    write_results(out, rows, {**meta, "complete": True})
    print(f"wrote {out}")
    return 1 if any(r.status == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
