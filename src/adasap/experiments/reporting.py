"""Result tables for the terminal (rich) and for files (Markdown)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from adasap.deploy.ratio import NOISY_WIDTH
from adasap.experiments.results import ResultRow

COLUMNS: tuple[tuple[str, str], ...] = (
    ("method", "method"),
    ("params", "params"),
    ("macs", "MACs"),
    ("clean_accuracy", "clean acc"),
    ("corruption_accuracy", "corrupted acc"),
    ("extra_accuracy", "extra corr. acc"),
    ("shift_accuracy", "ImageNet-V2 acc"),
    ("latency_ms", "CPU latency (b1)"),
    ("seconds", "wall time"),
)
# A detection run's table: the same fields hold P (mAP@0.5 on clean images), mPC and rPC.
DETECTION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("method", "method"),
    ("params", "params"),
    ("macs", "MACs"),
    ("clean_accuracy", "P (mAP@0.5)"),
    ("corruption_accuracy", "mPC"),
    ("relative_robustness", "rPC"),
    ("latency_ms", "CPU latency (b1)"),
    ("seconds", "wall time"),
)

LATENCY_NOTE = (
    "CPU latency (b1): median forward pass at batch 1, the dense and pruned models taking "
    "turns; the ratio in brackets is pruned/dense, the median of the per-round ratios; 'noisy' "
    f"where its 95% interval (shown) is wider than {NOISY_WIDTH:.0%} of it, as the machine was "
    "too busy to tell: time again on a quiet one with `adasap latency <run> --batch-sizes 1 "
    "--repeats 100`."
)


def _latency(row: ResultRow) -> str:
    """Median ms with the pruned/dense ratio, or "noisy" and the interval in its place."""
    if row.latency_noisy:
        return f"noisy ({row.latency_ratio_low:.2f}-{row.latency_ratio_high:.2f}x)"
    ratio = "" if row.latency_ratio is None else f" ({row.latency_ratio:.2f}x)"
    return f"{row.latency_ms:.2f} ms{ratio}"


def _format(row: ResultRow, key: str) -> str:
    value = getattr(row, key)
    if value is None:
        return "-"
    if key in ("params", "macs"):
        return f"{value / 1e6:.3f}M" if value >= 1e5 else f"{value / 1e3:.1f}K"
    if key.endswith("accuracy"):
        return f"{100 * value:.2f}%"
    if key == "relative_robustness":
        return f"{value:.3f}"
    if key == "latency_ms":
        return _latency(row)
    if key == "seconds":
        return f"{value / 60:.1f} min" if value >= 60 else f"{value:.0f} s"
    return str(value)


def _present(
    rows: Sequence[ResultRow], columns: Sequence[tuple[str, str]] = COLUMNS
) -> list[tuple[str, str]]:
    """The ``columns`` that some row has a value for."""
    return [
        (key, title) for key, title in columns if any(getattr(row, key) is not None for row in rows)
    ]


def results_table(
    rows: Sequence[ResultRow],
    title: str = "adasap results",
    columns: Sequence[tuple[str, str]] = COLUMNS,
) -> Table:
    """One row per method with size, clean and corrupted accuracy and wall time
    (``columns``: :data:`COLUMNS`, or :data:`DETECTION_COLUMNS` for detectors)."""
    table = Table(title=title)
    columns = _present(rows, columns)
    for key, name in columns:
        table.add_column(name, justify="left" if key == "method" else "right")
    for row in rows:
        table.add_row(*(_format(row, key) for key, _ in columns))
    if any(row.latency_ratio is not None for row in rows):
        table.caption = LATENCY_NOTE
    return table


def results_markdown(
    rows: Sequence[ResultRow],
    note: str | None = None,
    columns: Sequence[tuple[str, str]] = COLUMNS,
) -> str:
    """The table of :func:`results_table` in Markdown, with its notes (``note``: the reduced
    setting in words)."""
    columns = _present(rows, columns)
    lines = [
        "| " + " | ".join(name for _, name in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format(row, key) for key, _ in columns) + " |")
    notes = [note] if note else []
    if any(row.latency_ratio is not None for row in rows):
        notes.append(LATENCY_NOTE)
    sources = {row.corruption_source for row in rows} - {None}
    if sources:
        notes.append("Corrupted images: " + "; ".join(sorted(sources)) + ".")
    return "\n".join(lines + [""] + notes) + "\n"
