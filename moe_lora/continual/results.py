"""Writing a continual run's results: results.json, per-result CSV and heatmap, a bar chart, a table.

Files (all atomic, with the user's umask) in the output folder::

    results.json                          {"benchmark", "config", "tasks", "class_names",
                                           "strategies": {RESULT: {...}}, ...}; 4 decimals
    accuracy_matrix_<result>.csv / .png   R of each result in its own setting; tasks T1..Tn,
                                          the classes of each task under the heatmap
    strategies.png                        task-agnostic panel (AA, TP, WP) | task-aware panel (AA)
    evaluation.json                       ``moe-lora evaluate``: each result re-predicted from its
                                          strategy's last checkpoint on every task's test set

Tasks are numbered from 1 everywhere a person reads them (console, folders, plots, CSV).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_lora.core.io import atomic_write_json
from moe_lora.core.report import (
    plot_accuracy_matrix,
    plot_strategy_panels,
    write_accuracy_matrix_csv,
)

__all__ = ["format_evaluation", "format_table", "task_caption", "write_evaluation",
           "write_results"]


def _nan(m: list[list[float | None]]) -> list[list[float]]:
    return [[float("nan") if v is None else v for v in row] for row in m]


def task_caption(results: dict[str, Any]) -> str:
    """One line per task: ``T1: class, class, ...`` (from the run's class names)."""
    names = results.get("class_names") or []
    per = results["config"]["data"].get("classes_per_task") if names else None
    tasks = results.get("tasks") or []
    if not names or not per or len(names) != per * len(tasks):
        return "\n".join(f"T{j + 1}: {t}" for j, t in enumerate(tasks))
    return "\n".join(f"T{j + 1}: {', '.join(names[j * per:(j + 1) * per])}"
                     for j in range(len(tasks)))


def write_results(results: dict[str, Any], out: Path, plots: bool = True) -> None:
    """Write every result file of ``results`` into ``out`` and print the comparison table."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    n = len(results["tasks"])
    labels = [f"T{j + 1}" for j in range(n)]
    caption = task_caption(results)
    for name, entry in results["strategies"].items():
        if "accuracy_matrix" not in entry:
            continue
        r = _nan(entry["accuracy_matrix"])
        write_accuracy_matrix_csv(out / f"accuracy_matrix_{name}.csv", r, labels)
        if plots:
            plot_accuracy_matrix(out / f"accuracy_matrix_{name}.png", r,
                                 f"{name} ({entry['setting']})", labels, caption)
    if plots:
        plot_strategy_panels(out / "strategies.png", _panels(results["strategies"]),
                             ("average_accuracy", "tp", "wp", "forgetting"))
    print(format_table(results))


def _panels(strategies: dict[str, Any]) -> dict[str, dict[str, Any]]:
    agnostic = {n: e for n, e in strategies.items() if e["setting"] == "task-agnostic"}
    aware = {n: e for n, e in strategies.items() if e["setting"] == "task-aware"}
    aware |= {f"{n} (task id)": e["task_aware"] for n, e in strategies.items() if "task_aware" in e}
    return {"task-agnostic (no task id)": agnostic, "task-aware (task id given)": aware}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: one row per result and setting (AA, forgetting, BWT, FWT, TP, WP)."""
    head = (f"{'strategy':<22} {'setting':<14} {'AA':>6} {'forget':>7} {'BWT':>7} {'FWT':>7} "
            f"{'TP':>6} {'WP':>6} {'train s':>8}")
    lines = [head, "-" * len(head)]
    for name, e in results["strategies"].items():
        rows = [(name, e)]
        if "task_aware" in e:
            rows.append((f"  {name}", e["task_aware"] | {"setting": "task-aware"}))
        for label, x in rows:
            secs = x.get("train_seconds")
            lines.append(
                f"{label:<22} {x['setting']:<14} {_fmt(x.get('average_accuracy')):>6} "
                f"{_fmt(x.get('forgetting')):>7} {_fmt(x.get('bwt')):>7} {_fmt(x.get('fwt')):>7} "
                f"{_fmt(x.get('tp')):>6} {_fmt(x.get('wp')):>6} "
                f"{'' if secs is None else f'{secs:.0f}':>8}")
    return "\n".join(lines)


def write_evaluation(evaluation: dict[str, Any], out: Path) -> None:
    """Write ``evaluation.json`` (atomic) into the run folder ``out`` and print its table."""
    atomic_write_json(out / "evaluation.json", evaluation)
    print(format_evaluation(evaluation))


def format_evaluation(evaluation: dict[str, Any]) -> str:
    """A table of per-task test accuracies: one row per result, one column per task (T1..Tn).

    ``evaluation["strategies"][NAME]``: ``setting``, ``accuracy`` (per task, None where not
    evaluated), ``average_accuracy``, ``tp`` and, for shared-head strategies, ``task_aware``.
    """
    n = len(evaluation["tasks"])
    head = f"{'strategy':<22} {'setting':<14} " + " ".join(f"{f'T{j + 1}':>6}" for j in range(n)) \
        + f" {'AA':>6} {'TP':>6}"
    lines = [head, "-" * len(head)]
    for name, e in evaluation["strategies"].items():
        rows = [(name, e)]
        if "task_aware" in e:
            rows.append((f"  {name}", e["task_aware"] | {"setting": "task-aware"}))
        for label, x in rows:
            accs = " ".join(f"{_fmt(a):>6}" for a in x["accuracy"])
            lines.append(f"{label:<22} {x['setting']:<14} {accs} "
                         f"{_fmt(x['average_accuracy']):>6} {_fmt(x.get('tp')):>6}")
    return "\n".join(lines)
