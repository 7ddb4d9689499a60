"""Writing a continual run's results: results.json, per-strategy CSV and heatmap, a bar chart, a table.

Files (all atomic) in the output folder::

    results.json                           {"benchmark", "config", "strategies": {NAME: {...}}, ...}
    accuracy_matrix_<strategy>.csv / .png  R of each strategy in its own setting
    strategies.png                         average accuracy, forgetting and BWT side by side
    evaluation.json                        ``moe-lora evaluate``: each strategy re-evaluated from
                                           its family's last checkpoint on every task's test set
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_lora.core.io import atomic_write_json
from moe_lora.core.report import (
    plot_accuracy_matrix,
    plot_strategy_comparison,
    write_accuracy_matrix_csv,
)

__all__ = ["format_evaluation", "format_table", "write_evaluation", "write_results"]


def _nan(m: list[list[float | None]]) -> list[list[float]]:
    return [[float("nan") if v is None else v for v in row] for row in m]


def write_results(results: dict[str, Any], out: Path, plots: bool = True) -> None:
    """Write every result file of ``results`` into ``out`` and print the comparison table."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    tasks = results.get("tasks")
    for name, entry in results["strategies"].items():
        r = _nan(entry["accuracy_matrix"])
        names = tasks if tasks and len(tasks) == len(r[0]) else None
        short = [f"t{j}" for j in range(len(r[0]))] if names else None
        write_accuracy_matrix_csv(out / f"accuracy_matrix_{name}.csv", r, names)
        if plots:
            plot_accuracy_matrix(out / f"accuracy_matrix_{name}.png", r,
                                 f"{name} ({entry['setting']})", short)
    if plots:
        plot_strategy_comparison(out / "strategies.png", results["strategies"],
                                 title=f"{results['benchmark']}: strategies")
    print(format_table(results))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_table(results: dict[str, Any]) -> str:
    """A plain-text comparison table (one row per strategy and setting)."""
    head = f"{'strategy':<20} {'setting':<14} {'avg acc':>8} {'forget':>8} {'BWT':>8} " \
           f"{'FWT':>8} {'router':>8} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for name, e in results["strategies"].items():
        rows = [(name, e)]
        if "task_aware" in e:
            rows.append((f"  {name}", e["task_aware"] | {"setting": "task-aware",
                                                        "router_accuracy": None,
                                                        "train_seconds": None}))
        for label, x in rows:
            secs = x.get("train_seconds")
            lines.append(
                f"{label:<20} {x['setting']:<14} {_fmt(x['average_accuracy']):>8} "
                f"{_fmt(x['forgetting']):>8} {_fmt(x['bwt']):>8} {_fmt(x.get('fwt')):>8} "
                f"{_fmt(x.get('router_accuracy')):>8} {'-' if secs is None else f'{secs:.0f}':>8}"
            )
    return "\n".join(lines)


def write_evaluation(evaluation: dict[str, Any], out: Path) -> None:
    """Write ``evaluation.json`` (atomic) into the run folder ``out`` and print its table."""
    atomic_write_json(out / "evaluation.json", evaluation)
    print(format_evaluation(evaluation))


def format_evaluation(evaluation: dict[str, Any]) -> str:
    """A table of per-task test accuracies: one row per strategy and setting, one column per task.

    ``evaluation["strategies"][NAME]``: ``setting``, ``accuracy`` (per task, None where not
    evaluated), ``average_accuracy``, ``router_accuracy`` and, for shared-head strategies,
    ``task_aware`` (the same accuracies with the task id given).
    """
    n = len(evaluation["tasks"])
    head = f"{'strategy':<20} {'setting':<14} " + " ".join(f"{f't{j}':>6}" for j in range(n)) \
        + f" {'avg acc':>8} {'router':>8}"
    lines = [head, "-" * len(head)]
    for name, e in evaluation["strategies"].items():
        rows = [(name, e)]
        if "task_aware" in e:
            rows.append((f"  {name}", e["task_aware"] | {"setting": "task-aware"}))
        for label, x in rows:
            accs = " ".join(f"{'-' if a is None else f'{a:.3f}':>6}" for a in x["accuracy"])
            lines.append(f"{label:<20} {x['setting']:<14} {accs} {_fmt(x['average_accuracy']):>8} "
                         f"{_fmt(x.get('router_accuracy')):>8}")
    return "\n".join(lines)
