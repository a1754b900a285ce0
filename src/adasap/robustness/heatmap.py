"""The corruption x severity heatmap of a report (matplotlib, drawn on an Agg canvas)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np

from adasap.robustness.corruptions import SEVERITIES


def heatmap_png(values: Mapping[str, Mapping[int, float]], title: str, label: str) -> bytes:
    """A corruption x severity heatmap of ``values[name][severity]`` (fractions in [0, 1], shown
    in %, rows in the order given) as PNG bytes (matplotlib, Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(values)
    grid = np.full((max(len(names), 1), len(SEVERITIES)), np.nan)
    for i, name in enumerate(names):
        for j, s in enumerate(SEVERITIES):
            grid[i, j] = values[name].get(s, np.nan)
    fig = Figure(figsize=(6.5, 1.6 + 0.32 * len(grid)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(100 * grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not math.isnan(value):
            colour = "white" if value < 0.6 else "black"
            ax.text(j, i, f"{100 * value:.1f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(SEVERITIES)), [f"severity {s}" for s in SEVERITIES], fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()
