"""The benchmark: every (method, criterion) x size x seed from one dense model per seed.

:func:`run_bench` runs a preset (:mod:`adasap.experiments.presets`) one grid cell at a time and
appends one JSON line per finished cell to ``<out>/results.jsonl``; an interrupted cell resumes
from ``<out>/runs/<cell>/``, a finished one is skipped. Each line is a
:class:`~adasap.experiments.results.BenchRow`: clean and corruption accuracy, sharpness of the
dense model (before pruning) and of the pruned one (after), size, measured CPU latency (a pruned
model's timed in turns with the dense one, with its pruned/dense ratio) and wall time.
:func:`~adasap.experiments.bench_report.write_report` turns the lines into the report.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from adasap.data import DataBundle, batches
from adasap.deploy.latency import compare_latency, measure_latency
from adasap.deploy.serialization import load_model
from adasap.devices import resolve_device
from adasap.errors import UserError
from adasap.experiments.bench_report import write_report
from adasap.experiments.config import ExperimentConfig
from adasap.experiments.presets import PRESETS, BenchPreset, Cell
from adasap.experiments.results import (
    RESULTS_FILE,
    BenchRow,
    append_jsonl,
    prepare_out,
    read_bench_rows,
    report_failure,
)
from adasap.experiments.run import dense_model, evaluate_model, load_data, pruned_row
from adasap.method.pruning import measure_size
from adasap.robustness.sharpness import top_hessian_eigenvalue, worst_case_loss_increase
from adasap.training.checkpoint import RunInterrupted


def probe_batches(
    data: DataBundle, count: int, batch_size: int, seed: int, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """A fixed set of training batches (seeded, no augmentation) for the sharpness metrics."""
    stream = batches(
        data.train,
        batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        device=device,
    )
    return list(itertools.islice(stream, count))


def _per_corruption(directory: Path) -> dict[str, float] | None:
    path = directory / "corruptions.json"
    return json.loads(path.read_text())["per_corruption"] if path.is_file() else None


@dataclass
class _Seed:
    """What the cells of one seed share: its data, dense model and sharpness batches."""

    preset: BenchPreset
    out: Path
    data: DataBundle
    dense: nn.Module
    probe: list[tuple[Tensor, Tensor]]
    console: Console

    def measure(self, model: nn.Module, config: ExperimentConfig) -> dict[str, Any]:
        """Sharpness on the probe batches and CPU latency at batch 1 (:class:`BenchRow` fields)."""
        model.to(self.probe[0][0].device)
        rho = config.prune.optimizer.rho
        return {
            "loss_increase": worst_case_loss_increase(model, self.probe, rho),
            "hessian_eigenvalue": top_hessian_eigenvalue(
                model, self.probe, iterations=self.preset.hessian_iterations
            ),
            "sharpness_rho": rho,
            **self.latency(model),
        }

    def latency(self, model: nn.Module) -> dict[str, Any]:
        """Batch-1 CPU latency; a pruned model takes turns with the dense one, which gives its
        pruned/dense ratio and whether that is too noisy to trust (:mod:`adasap.deploy.ratio`)."""
        spec = self.data.spec
        shape = (spec.channels, spec.image_size, spec.image_size)
        repeats = self.preset.latency_repeats
        if model is self.dense:
            (alone,) = measure_latency(model, shape, batch_sizes=(1,), repeats=repeats)
            return {
                "latency_ms": alone.median_ms,
                "latency_p10_ms": alone.p10_ms,
                "latency_p90_ms": alone.p90_ms,
            }
        (row,) = compare_latency(self.dense, model, shape, batch_sizes=(1,), repeats=repeats).rows
        return {
            "latency_ms": row["pruned_ms"],
            "latency_p10_ms": row["pruned_p10_ms"],
            "latency_p90_ms": row["pruned_p90_ms"],
            "latency_ratio": row["ratio"],
            "latency_ratio_low": row["ratio_low"],
            "latency_ratio_high": row["ratio_high"],
            "latency_noisy": row["noisy"],
        }

    def dense_row(self, cell: Cell, config: ExperimentConfig, info: dict) -> BenchRow:
        start = time.perf_counter()
        evaluated = evaluate_model(self.dense, self.data, config, self.out / "runs", cell.id)
        measured = self.measure(self.dense, config)
        size = measure_size(self.dense.cpu(), self.probe[0][0][:1].cpu())
        row = replace(
            evaluated,
            method="dense",
            params=size.params,
            macs=size.macs,
            seconds=info.get("seconds"),
        )
        return BenchRow(
            **{**row.to_dict(), **measured},
            cell=cell.id,
            criterion=None,
            keep=1.0,
            seed=cell.seed,
            keep_kind=config.prune.keep_kind,
            keep_achieved=1.0,
            per_corruption=_per_corruption(self.out / "runs" / cell.id),
            # before = after for the unpruned model, so every row has both columns
            dense_loss_increase=measured["loss_increase"],
            dense_hessian_eigenvalue=measured["hessian_eigenvalue"],
            cell_seconds=time.perf_counter() - start,
        )

    def pruned_row(self, cell: Cell, config: ExperimentConfig, dense_row: BenchRow) -> BenchRow:
        """Prune (or resume, or reuse a finished run's summary), then evaluate and measure."""
        start = time.perf_counter()
        run_dir = self.out / "runs" / cell.id
        row = pruned_row(cell.method, self.dense, self.data, config, run_dir, self.console)
        model = load_model(run_dir / cell.method)
        kind = config.prune.keep_kind
        return BenchRow(
            **{**row.to_dict(), **self.measure(model, config)},
            cell=cell.id,
            criterion=cell.criterion,
            keep=cell.keep,
            seed=cell.seed,
            keep_kind=kind,
            keep_achieved=getattr(row, kind) / getattr(dense_row, kind),
            per_corruption=_per_corruption(run_dir / cell.method),
            dense_loss_increase=dense_row.loss_increase,
            dense_hessian_eigenvalue=dense_row.hessian_eigenvalue,
            cell_seconds=time.perf_counter() - start,
        )


def _resolve_preset(preset: str | BenchPreset) -> BenchPreset:
    if isinstance(preset, BenchPreset):
        return preset
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _run_seed(
    preset: BenchPreset,
    seed: int,
    cells: list[Cell],
    configs: dict[str, ExperimentConfig],
    done: dict[str, BenchRow],
    out: Path,
    console: Console,
) -> None:
    """The dense reference and the unfinished cells of one seed; ``done`` gains their rows."""
    reference = Cell("dense", None, 1.0, seed)
    todo = [c for c in cells if c.id not in done]
    if reference.id in done and not todo:
        return
    config = preset.config(reference)
    data = load_data(config)
    dense, info = dense_model(config, data, console)
    device = resolve_device(config.prune.device)
    probe = probe_batches(data, preset.sharpness_batches, preset.sharpness_batch_size, seed, device)
    shared = _Seed(preset, out, data, dense, probe, console)
    results = out / RESULTS_FILE
    if reference.id not in done:
        console.print(f"[bold]{reference.id}[/bold]: evaluating the dense model")
        done[reference.id] = shared.dense_row(reference, config, info)
        append_jsonl(results, done[reference.id].to_dict())
    for cell in todo:
        try:
            row = shared.pruned_row(cell, configs[cell.id], done[reference.id])
        except UserError as exc:
            report_failure(out, cell.id, exc, console)
            continue
        append_jsonl(results, row.to_dict())
        done[cell.id] = row
        console.print(
            f"[bold]{cell.id}[/bold]: clean {row.clean_accuracy:.2%}, "
            f"size {row.keep_achieved:.2f} of the dense {row.keep_kind}"
        )


def run_bench(
    preset_or_config: str | BenchPreset, out_dir: str | Path, *, console: Console | None = None
) -> Path:
    """Run every cell of a preset not yet in ``<out>/results.jsonl``, then write the report.

    Every cell's config is validated before any work. A cell that fails with a
    :class:`UserError` (e.g. a diverged run) is reported, logged to ``failures.jsonl`` and
    skipped; it is tried again by the next run. Returns ``out_dir``.
    """
    console = console or Console()
    preset = _resolve_preset(preset_or_config)
    cells = preset.cells()
    if not cells:
        raise UserError(f"preset {preset.name} has an empty grid: give pairs, keeps and seeds")
    configs = {cell.id: preset.config(cell) for cell in cells}
    out = prepare_out(out_dir, preset.identity(), "preset")
    done = {row.cell: row for row in read_bench_rows(out)}
    try:
        for seed in preset.seeds:
            _run_seed(
                preset, seed, [c for c in cells if c.seed == seed], configs, done, out, console
            )
    except RunInterrupted as exc:
        exc.run_dir = out
        raise
    report = write_report(out)
    console.print(f"benchmark report: {report / 'report.md'}")
    return out
