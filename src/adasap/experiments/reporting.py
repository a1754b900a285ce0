"""Result tables for the terminal (rich) and for files (Markdown)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from adasap.experiments.results import ResultRow

COLUMNS: tuple[tuple[str, str], ...] = (
    ("method", "method"),
    ("params", "params"),
    ("macs", "MACs"),
    ("clean_accuracy", "clean acc"),
    ("corruption_accuracy", "corrupted acc"),
    ("extra_accuracy", "extra corr. acc"),
    ("latency_ms", "CPU latency (b1)"),
    ("seconds", "wall time"),
)


def _format(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("params", "macs"):
        return f"{value / 1e6:.3f}M" if value >= 1e5 else f"{value / 1e3:.1f}K"
    if key.endswith("accuracy"):
        return f"{100 * value:.2f}%"
    if key == "latency_ms":
        return f"{value:.2f} ms"
    if key == "seconds":
        return f"{value / 60:.1f} min" if value >= 60 else f"{value:.0f} s"
    return str(value)


def _present(rows: Sequence[ResultRow]) -> list[tuple[str, str]]:
    """The columns that some row has a value for."""
    return [
        (key, title) for key, title in COLUMNS if any(getattr(row, key) is not None for row in rows)
    ]


def results_table(rows: Sequence[ResultRow], title: str = "adasap results") -> Table:
    """One row per method with size, clean and corrupted accuracy and wall time."""
    table = Table(title=title)
    columns = _present(rows)
    for key, name in columns:
        table.add_column(name, justify="left" if key == "method" else "right")
    for row in rows:
        table.add_row(*(_format(key, getattr(row, key)) for key, _ in columns))
    return table


def results_markdown(rows: Sequence[ResultRow], reduced: bool = False) -> str:
    columns = _present(rows)
    lines = [
        "| " + " | ".join(name for _, name in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append(
            "| " + " | ".join(_format(key, getattr(row, key)) for key, _ in columns) + " |"
        )
    notes = []
    if reduced:
        notes.append("Reduced setting (subsets of the data, few epochs): a quick comparison.")
    sources = {row.corruption_source for row in rows} - {None}
    if sources:
        notes.append("Corrupted images: " + "; ".join(sorted(sources)) + ".")
    return "\n".join(lines + [""] + notes) + "\n"
