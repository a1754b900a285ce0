"""The benchmark report's plots, as PNG files (matplotlib without a display)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adasap.experiments.results import BenchRow
from adasap.io import atomic_write_bytes
from adasap.robustness.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Label a scatter or line plot, grid and legend it, and save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_png(fig, path)


def run_label(method: str, criterion: str | None) -> str:
    """A legend entry: the method, with its criterion when it has one."""
    return method if criterion is None else f"{method} ({criterion})"


def plot_size(summary: list[dict[str, Any]], path: Path) -> None:
    """Corruption accuracy against parameters, mean +- std over seeds (summary entries)."""
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    lines: dict[tuple[str, str | None], list[dict]] = {}
    for e in summary:
        if e["corruption_accuracy"][0] is not None:
            lines.setdefault((e["method"], e["criterion"]), []).append(e)
    for (method, criterion), entries in lines.items():
        entries.sort(key=lambda e: e["params"][0])
        ax.errorbar(
            [e["params"][0] / 1e6 for e in entries],
            [100 * e["corruption_accuracy"][0] for e in entries],
            yerr=[100 * (e["corruption_accuracy"][1] or 0) for e in entries],
            marker="*" if method == "dense" else "o",
            markersize=12 if method == "dense" else 6,
            capsize=3,
            label=run_label(method, criterion),
        )
    _finish(
        fig,
        ax,
        "parameters (millions)",
        "corruption accuracy (%)",
        "Corruption accuracy vs model size (mean ± std over seeds)",
        path,
    )


def plot_scatter(rows: Sequence[BenchRow], path: Path) -> None:
    """Clean against corruption accuracy, one point per run."""
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    markers = {}
    points: dict[str, list[BenchRow]] = {}
    for row in rows:
        if row.corruption_accuracy is not None:
            points.setdefault(run_label(row.method, row.criterion), []).append(row)
    for label, group in points.items():
        marker = markers.setdefault(group[0].criterion, "os^Dv*"[len(markers) % 6])
        ax.scatter(
            [100 * r.clean_accuracy for r in group],
            [100 * r.corruption_accuracy for r in group],
            marker=marker,
            label=label,
            alpha=0.8,
        )
    _finish(
        fig,
        ax,
        "clean accuracy (%)",
        "corruption accuracy (%)",
        "Clean vs corrupted accuracy (one point per run)",
        path,
    )


def plot_per_corruption(keep: float | None, bars: dict[str, dict[str, float]], path: Path) -> None:
    """Bars per corruption (mean accuracy) for each label of ``bars``, all at ``keep``."""
    fig = _figure(11.0, 4.5)
    ax = fig.add_subplot()
    if keep is not None:
        names = [n for n in CORRUPTIONS if any(n in means for means in bars.values())]
        width = 0.8 / len(bars)
        for i, (label, means) in enumerate(bars.items()):
            heights = [100 * means.get(n, 0.0) for n in names]
            ax.bar([j + i * width for j in range(len(names))], heights, width, label=label)
        ticks = [n + " (extra)" if n in EXTRA_CORRUPTIONS else n for n in names]
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(names))], ticks, rotation=60, ha="right"
        )
        ax.set_title(f"Accuracy per corruption (mean of 5 severities) at keep {keep:g}")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    _save_png(fig, path)


def plot_pareto(
    points: dict[str, list[tuple[float, float]]],
    fronts: dict[str, list[tuple[float, float]]],
    clean_bar: float | None,
    path: Path,
) -> None:
    """Clean against corrupted accuracy (fractions), a point per setting, each method's front
    as a line, and the clean bar (a vertical line) where there is one."""
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    for i, (method, xy) in enumerate(points.items()):
        color = f"C{i}"
        ax.scatter([100 * x for x, _ in xy], [100 * y for _, y in xy], color=color, alpha=0.5)
        front = fronts.get(method, [])
        ax.plot([100 * x for x, _ in front], [100 * y for _, y in front], "-o", color=color,
                label=f"{method} ({len(xy)} setting{'' if len(xy) == 1 else 's'})")  # fmt: skip
    if clean_bar is not None:
        ax.axvline(100 * clean_bar, color="grey", linestyle="--", label="clean bar")
    _finish(
        fig,
        ax,
        "clean validation accuracy (%)",
        "corrupted validation score (%)",
        "Each method's Pareto front over the swept settings",
        path,
    )
