"""Result tables for the terminal (rich) and for files (Markdown).

A run prints two tables, three with ``--int8``, each narrow enough for an 80-column terminal:

- accuracy: size (params, MACs), the task's scores (a classifier's clean, corrupted and extra
  accuracy; a detector's P, mPC, rPC) and wall time;
- speed, in the runtime the run deploys to: pruned/dense MACs (the limit of what pruning can
  buy), the pruned/dense time of a forward pass at batch 1 and at the throughput batch with
  its 95% interval ("noisy" where that is too wide: :mod:`adasap.deploy.ratio`), and the
  efficiency, MACs ratio / time ratio at the throughput batch (1: the time falls as the MACs
  do);
- INT8: each model quantized, its file size and its scores computed on the quantized model
  (its speed is in the speed table, against the dense fp32 model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from rich.table import Table

from adasap.deploy.comparison import row_ratio
from adasap.deploy.ratio import NOISY_WIDTH
from adasap.experiments.results import SPEED_BATCHES, ResultRow

Columns = Sequence[tuple[str, str]]

# The task's scores: (ResultRow field, column title); the titles are short so that the
# accuracy table fits 80 columns, and the table's note says what each one is.
ACCURACY_SCORES: Columns = (
    ("clean_accuracy", "clean"),
    ("corruption_accuracy", "corrupted"),
    ("extra_accuracy", "extra"),
    ("shift_accuracy", "ImageNet-V2"),
)
# A detection run's: the same fields hold P (mAP@0.5 on clean images), mPC and rPC.
DETECTION_SCORES: Columns = (
    ("clean_accuracy", "P (mAP@0.5)"),
    ("corruption_accuracy", "mPC"),
    ("relative_robustness", "rPC"),
)
SCORE_NOTES = {
    "clean": "clean: top-1 accuracy on the clean test images",
    "corrupted": "corrupted: its mean over the benchmark corruptions x 5 severities",
    "extra": "extra: over the held-out corruptions",
    "ImageNet-V2": "ImageNet-V2: on its test folder",
    "P (mAP@0.5)": "P: mAP@0.5 on the clean test images",
    "mPC": "mPC: its mean over the corruptions x 5 severities",
    "rPC": "rPC = mPC / P",
}

SPEED_NOTE = (
    "MACs: pruned/dense, the limit of what pruning can buy; time b<N>: pruned/dense time of a "
    "forward pass at batch N (the dense row: its median), the models taking turns: the median "
    f"of the per-round ratios and its 95% interval, 'noisy' where that is wider than "
    f"{NOISY_WIDTH:.0%} of it (the machine was too busy to tell: time again on a quiet one with "
    "`adasap latency <run>`); efficiency: MACs ratio / time ratio at the largest batch (1: the "
    "time falls as the MACs do)."
)
INT8_TITLE = "INT8 (ONNX Runtime, static quantization)"
INT8_NOTE = (
    "INT8: each model quantized (ONNX Runtime, static QDQ, calibrated on training images), its "
    "scores computed on the quantized model, file: its ONNX file; its speed: the 'int8' lines "
    "of the speed table, against the dense fp32 model in ONNX Runtime."
)


def _count(value: float) -> str:
    return f"{value / 1e6:.3f}M" if value >= 1e5 else f"{value / 1e3:.1f}K"


def _format(row: ResultRow, key: str) -> str:
    value = getattr(row, key)
    if value is None:
        return "-"
    if key in ("params", "macs"):
        return _count(value)
    if key.endswith("accuracy"):
        return f"{100 * value:.2f}%"
    if key == "relative_robustness":
        return f"{value:.3f}"
    if key == "file_bytes":
        return f"{value / 1e6:.2f} MB"
    if key == "seconds":
        return f"{value / 60:.1f} min" if value >= 60 else f"{value:.0f} s"
    return str(value)


def accuracy_columns(scores: Columns) -> Columns:
    """The accuracy table's columns around a task's ``scores``."""
    return (("method", "method"), ("params", "params"), ("macs", "MACs"), *scores,
            ("seconds", "wall time"))  # fmt: skip


def int8_columns(scores: Columns) -> Columns:
    """The INT8 table's columns: the quantized file's size and the task's ``scores``."""
    return (("method", "method"), ("file_bytes", "file"), *scores)


def _time(entry: Mapping[str, Any] | None) -> str:
    """A time column's cell: the dense model's median, or the pruned/dense ratio."""
    if not entry:
        return "-"
    if entry.get("ratio") is None:
        return f"{entry['ms']:.2f} ms"
    return str(row_ratio(entry))


def speed_cells(
    method: str,
    macs_ratio: float | None,
    times: Mapping[int, Mapping[str, Any]],
    batches: Sequence[int],
) -> list[str]:
    """A speed table line: ``times`` by batch size (``ms``, and a pruned model's ``ratio``,
    ``ratio_low``, ``ratio_high``, ``rounds``, ``noisy``); the efficiency at the last batch."""
    last = times.get(batches[-1]) if batches else None
    efficiency = "-"
    if macs_ratio is not None and last and last.get("ratio") and not last.get("noisy"):
        efficiency = f"{macs_ratio / last['ratio']:.2f}"
    macs = "-" if macs_ratio is None else f"{macs_ratio:.2f}x"
    return [method, macs, *(_time(times.get(b)) for b in batches), efficiency]


def speed_header(batches: Sequence[int]) -> list[str]:
    return ["method", "MACs", *(f"time b{b}" for b in batches), "efficiency"]


def speed_lines(rows: Sequence[ResultRow], label: str = "") -> list[list[str]]:
    """The speed table's lines of ``rows`` (those timed), the method named with ``label``."""
    return [
        speed_cells(row.method + label, row.macs_ratio, row.times, SPEED_BATCHES)
        for row in rows
        if row.times
    ]


@dataclass(frozen=True)
class Section:
    """One table of a report: its title, column names, lines of cells and the note under it."""

    title: str
    header: list[str]
    lines: list[list[str]]
    note: str

    def table(self, note: bool = True) -> Table:
        """The section for the terminal (``note``: with its note as the caption)."""
        table = Table(title=self.title, caption=self.note if note else None)
        for position, name in enumerate(self.header):
            table.add_column(name, justify="left" if position == 0 else "right")
        for line in self.lines:
            table.add_row(*line)
        return table

    def markdown(self) -> list[str]:
        return [
            f"**{self.title}**",
            "",
            "| " + " | ".join(self.header) + " |",
            "|" + "|".join("---" for _ in self.header) + "|",
            *("| " + " | ".join(line) + " |" for line in self.lines),
            "",
            self.note,
            "",
        ]


def comparison_speed_tables(
    rows: Sequence[Mapping[str, Any]], macs_ratios: Mapping[str, float], batches: Sequence[int]
) -> list[Table]:
    """``adasap latency``'s speed tables, one per runtime (the note under the last), from the
    rows of :func:`~adasap.deploy.comparison.compare_latency` and each pruned model's MACs
    ratio."""
    sections = []
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        timed = [r for r in rows if r["runtime"] == runtime]
        dense = {r["batch_size"]: {"ms": r["dense_ms"]} for r in timed}
        lines = [speed_cells("dense", 1.0, dense, batches)]
        for model in dict.fromkeys(r["model"] for r in timed):
            times = {
                r["batch_size"]: {**r, "ms": r["pruned_ms"]} for r in timed if r["model"] == model
            }
            lines.append(speed_cells(model, macs_ratios[model], times, batches))
        title = f"Speed in {runtime}, pruned/dense"
        sections.append(Section(title, speed_header(batches), lines, SPEED_NOTE))
    return [section.table(note=section is sections[-1]) for section in sections]


def score_note(header: Sequence[str]) -> str:
    """What the score columns of ``header`` hold."""
    return "; ".join(SCORE_NOTES[name] for name in header if name in SCORE_NOTES) + "."


def _rows_section(title: str, rows: Sequence[ResultRow], columns: Columns, note: str) -> Section:
    """The ``columns`` that some row has a value for, one line per row."""
    present = [
        (key, name) for key, name in columns if any(getattr(r, key) is not None for r in rows)
    ]
    lines = [[_format(row, key) for key, _ in present] for row in rows]
    return Section(title, [name for _, name in present], lines, note)


def result_sections(
    rows: Sequence[ResultRow],
    *,
    title: str = "adasap results",
    scores: Columns = ACCURACY_SCORES,
    int8: Sequence[ResultRow] = (),
    speed_title: str = "Speed, pruned/dense",
) -> list[Section]:
    """The accuracy table of ``rows`` (``scores``: the task's), the speed table (when they
    were timed; ``speed_title`` names the runtime) and the INT8 table (with ``int8`` rows)."""
    accuracy = _rows_section(title, rows, accuracy_columns(scores), "")
    sections = [replace(accuracy, note=score_note(accuracy.header))]
    speed = speed_lines(rows) + speed_lines(int8, " int8")
    if speed:
        sections.append(Section(speed_title, speed_header(SPEED_BATCHES), speed, SPEED_NOTE))
    if int8:
        sections.append(_rows_section(INT8_TITLE, int8, int8_columns(scores), INT8_NOTE))
    return sections


def results_tables(rows: Sequence[ResultRow], **options: Any) -> list[Table]:
    """The tables of :func:`result_sections` (``options``: its keywords) for the terminal."""
    return [section.table() for section in result_sections(rows, **options)]


def results_markdown(rows: Sequence[ResultRow], note: str | None = None, **options: Any) -> str:
    """The tables of :func:`result_sections` (``options``: its keywords) in Markdown
    (``note``: the reduced setting in words, above them; the source of the corrupted images
    below)."""
    lines = [note, ""] if note else []
    for section in result_sections(rows, **options):
        lines += section.markdown()
    sources = {row.corruption_source for row in [*rows, *options.get("int8", ())]} - {None}
    if sources:
        lines.append("Corrupted images: " + "; ".join(sorted(sources)) + ".")
    return "\n".join(lines).rstrip("\n") + "\n"
