"""Result files of a continual run: accuracy-matrix CSV and heatmap, strategy bar chart, routing maps.

Every file is written atomically through :func:`moe_lora.io.atomic_path`. Plots use matplotlib's
object API with the Agg canvas (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from moe_lora.core.io import atomic_path, atomic_write_bytes

__all__ = [
    "plot_accuracy_matrix",
    "plot_routing_weights",
    "plot_strategy_comparison",
    "plot_strategy_panels",
    "write_accuracy_matrix_csv",
    "write_routing_weights_csv",
]

PathLike = str | os.PathLike[str]
DEFAULT_BAR_METRICS = ("average_accuracy", "forgetting", "bwt")


def _matrix(values: Tensor | Sequence[Sequence[float]]) -> Tensor:
    m = torch.as_tensor(values, dtype=torch.float64)
    if m.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(m.shape)}")
    return m


def _write_csv(path: PathLike, header: list[str], rows: list[list[str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _save(fig: Figure, path: PathLike) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def write_accuracy_matrix_csv(
    path: PathLike, r: Tensor | Sequence[Sequence[float]], task_names: Sequence[str] | None = None
) -> None:
    """Write ``R [T, T]`` as CSV: a header of eval tasks, one row per train task.

    Values are written with full float precision (``repr``); not-evaluated entries as ``nan``.

    Raises:
        ValueError: ``r`` is not 2-D or ``task_names`` has the wrong length.
    """
    m = _matrix(r)
    names = list(task_names) if task_names is not None else [f"task{j}" for j in range(m.shape[1])]
    if len(names) != m.shape[1]:
        raise ValueError(f"task_names has {len(names)} names for {m.shape[1]} tasks")
    rows = [[names[i]] + [repr(float(v)) for v in m[i].tolist()] for i in range(m.shape[0])]
    _write_csv(path, ["trained_on \\ evaluated_on", *names], rows)


def plot_accuracy_matrix(
    path: PathLike,
    r: Tensor | Sequence[Sequence[float]],
    title: str = "Accuracy matrix",
    task_names: Sequence[str] | None = None,
    caption: str | None = None,
) -> None:
    """Save ``R [T, T]`` as a PNG heatmap with each cell's value printed (blank where ``nan``).

    ``task_names`` label the axes (default ``T1..Tn``); ``caption`` is printed below the plot
    (e.g. each task's classes).
    """
    m = _matrix(r)
    names = list(task_names) if task_names is not None else [f"T{j + 1}" for j in range(m.shape[1])]
    size = 1.5 + 0.6 * m.shape[1]
    lines = caption.count("\n") + 1 if caption else 0
    fig = Figure(figsize=(max(size, 6.0 if caption else size), size + 0.18 * lines))
    ax = fig.add_subplot()
    image = ax.imshow(m.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for i, row in enumerate(m.tolist()):
        for j, v in enumerate(row):
            if v == v:  # nan is left blank
                color = "w" if v < 0.6 else "k"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(m.shape[1]), names, rotation=45, ha="right")
    ax.set_yticks(range(m.shape[0]), names[: m.shape[0]])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=6, va="bottom", ha="left", family="monospace")
        fig.subplots_adjust(bottom=0.18 + 0.03 * lines)
    _save(fig, path)


def plot_strategy_comparison(
    path: PathLike,
    results: Mapping[str, Mapping[str, float | None]],
    metrics: Sequence[str] = DEFAULT_BAR_METRICS,
    title: str = "Strategies",
) -> None:
    """Save a grouped bar chart: one group per strategy, one bar per metric (``None`` is skipped).

    Args:
        results: strategy name -> {metric name -> value}, e.g. the ``strategies`` of results.json.
        metrics: which metrics to draw.

    Raises:
        ValueError: ``results`` or ``metrics`` is empty.
    """
    plot_strategy_panels(path, {title: results}, metrics)


def plot_strategy_panels(
    path: PathLike,
    panels: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    metrics: Sequence[str] = DEFAULT_BAR_METRICS,
) -> None:
    """Save one grouped bar chart per panel, side by side (e.g. task-agnostic | task-aware).

    Args:
        panels: panel title -> strategy name -> {metric name -> value}; empty panels are skipped.
        metrics: which metrics to draw (``None`` values are skipped).

    Raises:
        ValueError: no panel has a strategy, or ``metrics`` is empty.
    """
    kept = {t: r for t, r in panels.items() if r}
    if not kept or not metrics:
        raise ValueError("plot_strategy_panels needs at least one strategy and one metric")
    widths = [len(r) for r in kept.values()]
    fig = Figure(figsize=(2.5 + 1.1 * sum(widths), 4.5))
    axes = fig.subplots(1, len(kept), squeeze=False, width_ratios=widths)[0]
    for ax, (title, results) in zip(axes, kept.items(), strict=True):
        _bars(ax, results, metrics)
        ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def _bars(ax: Any, results: Mapping[str, Mapping[str, float | None]],
          metrics: Sequence[str]) -> None:
    names = list(results)
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        xs = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(names))]
        ys = [results[n].get(metric) for n in names]
        kept = [(x, float(y)) for x, y in zip(xs, ys, strict=True) if y is not None]
        ax.bar([x for x, _ in kept], [y for _, y in kept], width=width, label=metric)
    ax.axhline(0.0, color="k", linewidth=0.5)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
    ax.legend(fontsize=7)


def _routing_checked(
    weights: Tensor, expert_names: Sequence[str], row_labels: Sequence[str] | None
) -> tuple[Tensor, list[str]]:
    w = _matrix(weights.detach().cpu())
    if len(expert_names) != w.shape[1]:
        raise ValueError(f"expert_names has {len(expert_names)} names for {w.shape[1]} experts")
    labels = list(row_labels) if row_labels is not None else [str(i) for i in range(w.shape[0])]
    if len(labels) != w.shape[0]:
        raise ValueError(f"row_labels has {len(labels)} labels for {w.shape[0]} rows")
    return w, labels


def write_routing_weights_csv(
    path: PathLike,
    weights: Tensor,
    expert_names: Sequence[str],
    row_labels: Sequence[str] | None = None,
) -> None:
    """Write routing weights ``[N, E]`` as CSV: one row per input (labelled), one column per expert.

    Raises:
        ValueError: ``weights`` is not 2-D or a name list has the wrong length.
    """
    w, labels = _routing_checked(weights, expert_names, row_labels)
    rows = [[labels[i]] + [repr(float(v)) for v in w[i].tolist()] for i in range(w.shape[0])]
    _write_csv(path, ["input", *expert_names], rows)


def plot_routing_weights(
    path: PathLike,
    weights: Tensor,
    expert_names: Sequence[str],
    row_labels: Sequence[str] | None = None,
    title: str = "Routing weights",
) -> None:
    """Save routing weights ``[N, E]`` as a PNG heatmap (inputs down, experts across).

    Raises:
        ValueError: ``weights`` is not 2-D or a name list has the wrong length.
    """
    w, labels = _routing_checked(weights, expert_names, row_labels)
    fig = Figure(figsize=(2.5 + 0.5 * w.shape[1], 1.5 + 0.25 * min(w.shape[0], 60)))
    ax = fig.add_subplot()
    image = ax.imshow(w.numpy(), aspect="auto", cmap="magma", vmin=0.0)
    ax.set_xticks(range(w.shape[1]), list(expert_names), rotation=45, ha="right")
    if w.shape[0] <= 60:
        ax.set_yticks(range(w.shape[0]), labels, fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)
