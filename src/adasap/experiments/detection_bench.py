"""``adasap bench --task detection``: methods x keeps x seeds on the canvas detection set.

The classification benchmark's grid (:func:`adasap.experiments.bench.open_grid`: its results
files, ``row.json`` adoption and failures) with detection cells: every seed trains (or reuses)
its dense detector, then each (keep, method) cell prunes and evaluates it as
:func:`adasap.experiments.run.pruned_row` does for every task, into a
:class:`~adasap.experiments.results.BenchRow` (P, mPC, rPC). The report (``<out>/report.md``)
gives mean ± std over the seeds and the paired differences from ``sgd`` with their 95%
t-intervals, from the classification report's statistics and tables.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from rich.console import Console

from adasap.errors import UserError
from adasap.experiments.bench import open_grid, refill_dense_cache
from adasap.experiments.bench_report import differences_section, failures_section, summary_table
from adasap.experiments.bench_stats import Columns, differences, summarize
from adasap.experiments.dense import dense_model, load_data
from adasap.experiments.detection_data import reduced_note
from adasap.experiments.grid import Parallel
from adasap.experiments.presets import BenchPreset, Cell, resolve_preset
from adasap.experiments.results import (
    RESULTS_FILE,
    BenchRow,
    cell_dir,
    read_bench_rows,
    save_row,
    unfinished_failures,
)
from adasap.experiments.run import pruned_row
from adasap.io import atomic_write_text

REPORT_FILE = "report.md"
# the report's columns, with the detection names of the rows' fields
SUMMARY_COLUMNS: Columns = (
    ("params", "params", "count"),
    ("clean_accuracy", "P (%)", "pct"),
    ("corruption_accuracy", "mPC (%)", "pct"),
    ("relative_robustness", "rPC", "ratio"),
)
DELTA_COLUMNS: Columns = (
    ("clean_accuracy", "P delta (pts)", "pct"),
    ("corruption_accuracy", "mPC delta (pts)", "pct"),
)


# BenchPresets over the detection defaults (``task: detection``); criterion None: the config's
DETECTION_PRESETS: dict[str, BenchPreset] = {
    "small": BenchPreset(
        name="small",
        description="tiny_ssd on the Fashion-MNIST canvases at the `adasap run --task "
        "detection` setting; sgd, sam and adasap at keep 50% and 30% of the parameters; "
        "2 seeds; all 19 corruptions x 5 severities",
        base={"task": "detection", "corruptions": "all"},
        pairs=(("sgd", None), ("sam", None), ("adasap", None)),
        keeps=(0.5, 0.3),
        seeds=(0, 1),
    ),
    "smoke": BenchPreset(
        name="smoke",
        description="a few seconds' check of the machinery (tiny canvases, 2 corruptions); "
        "its numbers mean nothing",
        base={
            "task": "detection",
            "train_limit": 8,
            "test_limit": 4,
            "corruption_limit": 2,
            "corruptions": "quick",
            "image_size": 48,
            "dense_epochs": 1.0,
            "batch_size": 4,
            "warmup_epochs": 0.5,
            "prune_epochs": 0.5,
            "finetune_epochs": 0.5,
            "prune_steps": 1,
            "progress": False,
        },  # fmt: skip
        pairs=(("sgd", None), ("adasap", None)),
        keeps=(0.5,),
        seeds=(0, 1),
    ),
}


def run_detection_bench(
    preset: str | BenchPreset,
    out: str | Path,
    console: Console | None = None,
    parallel: Parallel | None = None,
    report_only: bool = False,
) -> Path:
    """Run every cell not yet in ``<out>/results.jsonl`` (none with ``report_only``) as
    :func:`~adasap.experiments.bench.run_bench` does, then write the report; returns its path.
    The dense detector of each seed comes first (trained, or found in the cache), then the
    pruned cells, which load it from the cache."""
    console = console or Console()
    preset = resolve_preset(preset, DETECTION_PRESETS, "detection bench preset")
    if not report_only:
        grid = open_grid(preset, out, console, parallel or Parallel())
        todo = grid.todo()
        with grid.running(todo):
            seeds = dict.fromkeys(cell.reference for cell in todo)
            dense = [(reference.id, (grid.preset, reference)) for reference in seeds]
            grid.run(refill_dense_cache, dense, lambda _: "dense detector ready", fatal=True)
            grid.run(detection_cell, [(c.id, (grid.preset, c, grid.out)) for c in todo], _describe)
    return write_detection_report(out, preset)


def detection_cell(
    preset: BenchPreset, cell: Cell, out: Path, console: Console | None = None
) -> BenchRow:
    """One pruned cell, run in this process from the seed's cached dense detector: its row,
    also in ``<out>/runs/<cell>/row.json`` (with the model and reports)."""
    console = console or Console(quiet=True)
    started = time.perf_counter()
    config = preset.config(cell)
    data = load_data(config)
    dense, _ = dense_model(config, data, console)
    row = pruned_row(cell.method, dense, data, config, cell_dir(out, cell.id), console)
    values = {"cell": cell.id, "criterion": config.prune.criterion, "keep": cell.keep,
              "seed": cell.seed, "keep_kind": config.prune.keep_kind,
              "threads": torch.get_num_threads(),
              "cell_seconds": time.perf_counter() - started}  # fmt: skip
    return save_row(out, BenchRow.from_dict({**row.to_dict(), **values}))


def _describe(row: BenchRow) -> str:
    mpc = row.corruption_accuracy
    return f"P {row.clean_accuracy:.2%}" + (f", mPC {mpc:.2%}" if mpc is not None else "")


def _threads(rows: Sequence[BenchRow]) -> str:
    """The cells' torch threads (rows written before they were recorded: this process's)."""
    counts = sorted({r.threads for r in rows if r.threads is not None})
    return f"torch threads per cell: {', '.join(map(str, counts or [torch.get_num_threads()]))}"


def report_markdown(
    rows: Sequence[BenchRow],
    preset: BenchPreset,
    setting: str,
    failures: Sequence[Mapping] = (),
) -> str:
    """The detection report: P, mPC and rPC per (method, criterion, keep), the paired differences
    from sgd with their t-intervals (:mod:`adasap.experiments.bench_stats`)."""
    seeds = sorted({r.seed for r in rows})
    lines = [
        f"# Detection benchmark: preset {preset.name}",
        "",
        f"Command: `adasap bench --task detection --preset {preset.name}`. {preset.description}.",
        f"Machine: {platform.platform()}, {_threads(rows)}; report written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Seeds: "
        f"{', '.join(map(str, seeds))}.",
        "",
        setting,
        "",
        "P = clean mAP@0.5 (%), mPC = mean over the 15 benchmark corruptions x 5 severities (%), "
        "rPC = mPC / P; mean ± std over the seeds.",
        "",
        *summary_table(summarize(rows), SUMMARY_COLUMNS),
        "",
        *differences_section(differences(rows), DELTA_COLUMNS),
        *failures_section(failures),
    ]
    return "\n".join(lines)


def write_detection_report(out: str | Path, preset: BenchPreset) -> Path:
    """``<out>/report.md`` from ``<out>/results.jsonl``."""
    out = Path(out)
    rows = read_bench_rows(out)
    if not rows:
        raise UserError(f"{out / RESULTS_FILE} holds no finished cells: run the benchmark first")
    setting = reduced_note(preset.config(preset.cells()[0]))
    failed = unfinished_failures(out, {r.cell for r in rows})
    return atomic_write_text(out / REPORT_FILE, report_markdown(rows, preset, setting, failed))
