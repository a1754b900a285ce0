"""``adasap bench --task detection``: methods x keeps x seeds on the canvas detection set.

Every seed trains (or reuses) its dense detector, then each (keep, method) cell prunes and
evaluates it as :mod:`adasap.experiments.detection_run` does; a finished cell's row is
appended to ``<out>/results.jsonl`` and reused when the command is run again. The report
(``<out>/report.md``) gives mean +- std over the seeds of P (mAP@0.5), mPC and rPC, and the
differences from ``sgd`` at the same keep and seed (mean +- std of the paired differences).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from adasap.errors import UserError
from adasap.experiments.bench_report import mean_std
from adasap.experiments.config import DETECTION_DEFAULTS, ExperimentConfig, from_flat
from adasap.experiments.detection_run import (
    dense_detector,
    load_detection_data,
    pruned_detector_row,
    reduced_note,
)
from adasap.experiments.results import append_jsonl, read_jsonl
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


def run_detection_bench(
    preset: str | DetectionBenchPreset,
    out: str | Path,
    console: Console | None = None,
    sequential: bool = True,
) -> Path:
    """Run every cell not yet in ``<out>/results.jsonl``; returns the report's path.

    ``sequential=False`` (the command's --jobs, --ray or --report-only) is refused: the
    cells run one after the other, and the report is rewritten by running again.
    """
    if not sequential:
        raise UserError(
            "the detection benchmark runs its cells one after the other and rewrites its "
            "report each time: drop --jobs, --ray and --report-only"
        )
    if isinstance(preset, str):
        if preset not in DETECTION_PRESETS:
            raise UserError(
                f"no detection bench preset {preset!r}: choose one of "
                f"{', '.join(DETECTION_PRESETS)} with --task detection"
            )
        preset = DETECTION_PRESETS[preset]
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = {row["cell"] for row in read_jsonl(out / RESULTS_FILE)}
    for seed in preset.seeds:
        todo = [(k, m) for k in preset.keeps for m in preset.methods]
        todo = [(k, m) for k, m in todo if _cell_id(m, k, seed) not in done]
        if not todo:
            continue
        config = preset.config(preset.keeps[0], seed, out)
        data = load_detection_data(config)
        dense, _ = dense_detector(config, data, console)
        for keep, method in todo:
            cell = _cell_id(method, keep, seed)
            started = time.perf_counter()
            cell_config = replace(config, prune=replace(config.prune, keep=keep))
            row = pruned_detector_row(method, dense, data, cell_config, out / cell, console)
            append_jsonl(
                out / RESULTS_FILE,
                {**row.to_dict(), "cell": cell, "keep": keep, "seed": seed,
                 "cell_seconds": time.perf_counter() - started},
            )  # fmt: skip
    note = reduced_note(preset.config(preset.keeps[0], preset.seeds[0], out))
    return write_detection_report(out, preset, note)


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
        f"Machine: {platform.platform()}, {torch.get_num_threads()} threads; report written "
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


def write_detection_report(out: str | Path, preset: DetectionBenchPreset, setting: str) -> Path:
    """``<out>/report.md`` from ``<out>/results.jsonl``."""
    out = Path(out)
    rows = read_jsonl(out / RESULTS_FILE)
    if not rows:
        raise UserError(f"{out / RESULTS_FILE} holds no finished cells: run the benchmark first")
    return atomic_write_text(out / REPORT_FILE, report_markdown(rows, preset, setting))
