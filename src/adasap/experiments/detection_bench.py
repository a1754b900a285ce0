"""``adasap bench --task detection``: methods x keeps x seeds on the canvas detection set.

Every seed trains (or reuses) its dense detector, then each (keep, method) cell prunes and
evaluates it as :mod:`adasap.experiments.detection_run` does; a finished cell's row is
appended to ``<out>/results.jsonl`` and reused when the command is run again. The cells run
one after another or several at once (``--jobs``, ``--ray``: :mod:`adasap.experiments.grid`,
as the classification benchmark's). The report (``<out>/report.md``) gives mean +- std over
the seeds of P (mAP@0.5), mPC and rPC, and the differences from ``sgd`` at the same keep and
seed (mean +- std of the paired differences).
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from adasap.errors import UserError
from adasap.experiments.bench_stats import mean_std
from adasap.experiments.config import DETECTION_DEFAULTS, ExperimentConfig, from_flat
from adasap.experiments.detection_run import (
    dense_detector,
    load_detection_data,
    pruned_detector_row,
    reduced_note,
)
from adasap.experiments.grid import Parallel, connected, run_cells
from adasap.experiments.results import append_jsonl, read_jsonl, report_failure
from adasap.io import atomic_write_text

RESULTS_FILE = "results.jsonl"
REPORT_FILE = "report.md"


@dataclass(frozen=True)
class DetectionBenchPreset:
    """A grid: ``base`` (flat config values over the detection defaults) x methods x keeps x
    seeds."""

    name: str
    description: str
    methods: tuple[str, ...]
    keeps: tuple[float, ...]
    seeds: tuple[int, ...]
    base: dict[str, Any] = field(default_factory=dict)

    def config(self, keep: float, seed: int, out: Path) -> ExperimentConfig:
        values = {**DETECTION_DEFAULTS, **self.base, "keep": keep, "seed": seed}
        values.update(out_dir=str(out), corruptions=values.get("corruptions", "all"))
        return from_flat(values).validate()


DETECTION_PRESETS: dict[str, DetectionBenchPreset] = {
    "small": DetectionBenchPreset(
        name="small",
        description="tiny_ssd on the Fashion-MNIST canvases at the `adasap run --task "
        "detection` setting; sgd, sam and adasap at keep 50% and 30% of the parameters; "
        "2 seeds; all 19 corruptions x 5 severities",
        methods=("sgd", "sam", "adasap"),
        keeps=(0.5, 0.3),
        seeds=(0, 1),
    ),
    "smoke": DetectionBenchPreset(
        name="smoke",
        description="a few seconds' check of the machinery (tiny canvases, 2 corruptions); "
        "its numbers mean nothing",
        methods=("sgd", "adasap"),
        keeps=(0.5,),
        seeds=(0, 1),
        base={
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
    ),
}


def _cell_id(method: str, keep: float, seed: int) -> str:
    return f"{method}-keep{keep:g}-seed{seed}"


def _resolve_preset(preset: str | DetectionBenchPreset) -> DetectionBenchPreset:
    if isinstance(preset, DetectionBenchPreset):
        return preset
    if preset not in DETECTION_PRESETS:
        raise UserError(
            f"no detection bench preset {preset!r}: choose one of "
            f"{', '.join(DETECTION_PRESETS)} with --task detection"
        )
    return DETECTION_PRESETS[preset]


def run_detection_bench(
    preset: str | DetectionBenchPreset,
    out: str | Path,
    console: Console | None = None,
    parallel: Parallel | None = None,
    report_only: bool = False,
) -> Path:
    """Run every cell not yet in ``<out>/results.jsonl`` (none with ``report_only``), then
    write the report; returns its path.

    The dense detector of each seed comes first (trained, or found in the cache), then the
    pruned cells, which load it from the cache. With ``parallel`` (local processes or Ray
    tasks, :mod:`adasap.experiments.grid`) several run at once; the rows still follow the
    grid's order and each cell's numbers are those of the serial run at the same threads per
    cell. A cell that fails with a :class:`UserError` is reported, logged to
    ``failures.jsonl`` and skipped: the next run tries it again.
    """
    console = console or Console()
    parallel = (parallel or Parallel()).validate()
    preset = _resolve_preset(preset)
    if not parallel.serial:  # progress bars of cells running at once would be garbled
        preset = replace(preset, base={**preset.base, "progress": False})
    # absolute: the cells of a cluster run elsewhere (the folder must be shared with them)
    out = Path(out).resolve()
    first = preset.config(preset.keeps[0], preset.seeds[0], out)  # the device and the note
    out.mkdir(parents=True, exist_ok=True)
    done = {row["cell"] for row in read_jsonl(out / RESULTS_FILE)}
    grid = [(m, k, s) for s in preset.seeds for k in preset.keeps for m in preset.methods]
    todo = [] if report_only else [cell for cell in grid if _cell_id(*cell) not in done]
    device = first.prune.device
    with connected(parallel) if todo else contextlib.nullcontext():
        seeds = dict.fromkeys(seed for _, _, seed in todo)
        dense = [(f"dense-seed{seed}", (preset, seed, out)) for seed in seeds]
        for _, outcome in run_cells(
            dense_cell, dense, parallel, console, lambda _: "dense detector ready", device=device
        ):
            if isinstance(outcome, UserError):  # no cell of its seed can run: stop
                raise outcome
        tasks = [(_cell_id(*cell), (preset, *cell, out)) for cell in todo]
        for name, outcome in run_cells(
            detection_cell, tasks, parallel, console, _describe, device=device
        ):
            if isinstance(outcome, UserError):
                report_failure(out, name, outcome, console)
                continue
            append_jsonl(out / RESULTS_FILE, outcome)
    return write_detection_report(out, preset, reduced_note(first))


def dense_cell(
    preset: DetectionBenchPreset, seed: int, out: Path, console: Console | None = None
) -> None:
    """The dense detector of ``seed``, trained into the cache unless it is there already."""
    config = preset.config(preset.keeps[0], seed, out)
    dense_detector(config, load_detection_data(config), console or Console(quiet=True))


def detection_cell(
    preset: DetectionBenchPreset,
    method: str,
    keep: float,
    seed: int,
    out: Path,
    console: Console | None = None,
) -> dict[str, Any]:
    """One pruned cell, run in this process from the seed's cached dense detector: its
    ``results.jsonl`` row (the model and reports go to ``<out>/<cell>/``)."""
    console = console or Console(quiet=True)
    started = time.perf_counter()
    config = preset.config(keep, seed, out)
    data = load_detection_data(config)
    dense, _ = dense_detector(config, data, console)
    cell = _cell_id(method, keep, seed)
    row = pruned_detector_row(method, dense, data, config, out / cell, console)
    return {**row.to_dict(), "cell": cell, "keep": keep, "seed": seed,
            "threads": torch.get_num_threads(),
            "cell_seconds": time.perf_counter() - started}  # fmt: skip


def _describe(row: dict[str, Any]) -> str:
    mpc = row["corruption_accuracy"]
    return f"P {row['clean_accuracy']:.2%}" + (f", mPC {mpc:.2%}" if mpc is not None else "")


def _pct(stats: tuple[float | None, float | None]) -> str:
    mean, std = stats
    if mean is None:
        return "-"
    return f"{100 * mean:.2f}" + (f" +- {100 * std:.2f}" if std is not None else "")


def _differences(rows: Sequence[dict], key: str, method: str, keep: float) -> list[float]:
    """``key`` of ``method`` minus ``sgd``'s, per seed, at ``keep`` (seeds that have both)."""
    by = {(r["method"], r["keep"], r["seed"]): r for r in rows}
    return [
        r[key] - by[("sgd", keep, r["seed"])][key]
        for r in rows
        if r["method"] == method
        and r["keep"] == keep
        and ("sgd", keep, r["seed"]) in by
        and r[key] is not None
        and by[("sgd", keep, r["seed"])][key] is not None
    ]


def report_markdown(rows: Sequence[dict], preset: DetectionBenchPreset, setting: str) -> str:
    seeds = sorted({r["seed"] for r in rows})
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
        "rPC = mPC / P; mean +- std over the seeds.",
        "",
        "| method | keep | params | P | mPC | rPC | P - sgd | mPC - sgd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for keep in preset.keeps:
        for method in preset.methods:
            group = [r for r in rows if r["method"] == method and r["keep"] == keep]
            if not group:
                continue
            params, _ = mean_std(r["params"] for r in group)
            rpc, rpc_std = mean_std(r["relative_robustness"] for r in group)
            deltas = ["-", "-"]
            if method != "sgd":
                deltas = [
                    _pct(mean_std(_differences(rows, key, method, keep)))
                    for key in ("clean_accuracy", "corruption_accuracy")
                ]
            rpc_text = (
                "-"
                if rpc is None
                else f"{rpc:.3f}" + (f" +- {rpc_std:.3f}" if rpc_std is not None else "")
            )
            lines.append(
                f"| {method} | {keep:g} | {params / 1e6:.3f}M | "
                f"{_pct(mean_std(r['clean_accuracy'] for r in group))} | "
                f"{_pct(mean_std(r['corruption_accuracy'] for r in group))} | {rpc_text} | "
                f"{deltas[0]} | {deltas[1]} |"
            )
    return "\n".join(lines) + "\n"


def _threads(rows: Sequence[dict]) -> str:
    """The cells' torch threads (rows written before they were recorded: this process's)."""
    counts = sorted({r["threads"] for r in rows if "threads" in r}) or [torch.get_num_threads()]
    return f"torch threads per cell: {', '.join(map(str, counts))}"


def write_detection_report(out: str | Path, preset: DetectionBenchPreset, setting: str) -> Path:
    """``<out>/report.md`` from ``<out>/results.jsonl``."""
    out = Path(out)
    rows = read_jsonl(out / RESULTS_FILE)
    if not rows:
        raise UserError(f"{out / RESULTS_FILE} holds no finished cells: run the benchmark first")
    return atomic_write_text(out / REPORT_FILE, report_markdown(rows, preset, setting))
