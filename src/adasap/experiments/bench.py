"""The benchmark: every (method, criterion) x size x seed from one dense model per seed.

:func:`run_bench` runs a preset (:mod:`adasap.experiments.presets`): the dense reference of
each seed, then the pruned cells, one after another or several at once
(:class:`~adasap.experiments.grid.Parallel`: local processes, or tasks on a Ray cluster). It
appends one JSON line per finished cell to ``<out>/results.jsonl``, in grid order; an
interrupted cell resumes from ``<out>/runs/<cell>/``, a finished one is skipped. Each line is a
:class:`~adasap.experiments.results.BenchRow`: clean and corruption accuracy, sharpness of the
dense model (before pruning) and of the pruned one (after), size, measured CPU latency in the
runtime the cell deploys to (a pruned model's timed in turns with the dense one, with its
pruned/dense ratio) and wall time.
:func:`~adasap.experiments.bench_report.write_report` turns the lines into the report.
"""

from __future__ import annotations

import itertools
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
from adasap.experiments.dense import (
    cached_dense_sha256,
    dense_cache_directory,
    dense_model,
    dense_recipe,
    load_data,
)
from adasap.experiments.grid import Grid, Parallel, Task
from adasap.experiments.presets import BenchPreset, Cell, resolve_preset
from adasap.experiments.results import (
    BENCH_FILES,
    RESULTS_FILE,
    RUNS_DIR,
    BenchRow,
    cell_dir,
    save_row,
)
from adasap.experiments.run import evaluate_model, pruned_row
from adasap.experiments.speed import speed_runtime
from adasap.io import load_json
from adasap.method.pruning import measure_size
from adasap.robustness.sharpness import top_hessian_eigenvalue, worst_case_loss_increase


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
    return load_json(path)["per_corruption"] if path.is_file() else None


@dataclass
class _Seed:
    """What a cell takes from its seed: the data, the dense model and the sharpness batches."""

    preset: BenchPreset
    out: Path
    data: DataBundle
    dense: nn.Module
    probe: list[tuple[Tensor, Tensor]]
    console: Console
    dense_sha256: str | None

    def measure(self, model: nn.Module, config: ExperimentConfig) -> dict[str, Any]:
        """Sharpness on the probe batches and CPU latency at batch 1 in the runtime the cell
        deploys to (:class:`BenchRow` fields)."""
        model.to(self.probe[0][0].device)
        rho = config.prune.pruner.rho
        return {
            "loss_increase": worst_case_loss_increase(model, self.probe, rho),
            "hessian_eigenvalue": top_hessian_eigenvalue(
                model, self.probe, iterations=self.preset.hessian_iterations
            ),
            "sharpness_rho": rho,
            **self.latency(model, speed_runtime(config)),
        }

    def latency(self, model: nn.Module, runtime: str) -> dict[str, Any]:
        """Batch-1 CPU latency in ``runtime``; a pruned model takes turns with the dense one,
        which gives its pruned/dense ratio and whether that is too noisy to trust
        (:mod:`adasap.deploy.ratio`)."""
        spec = self.data.spec
        shape = (spec.channels, spec.image_size, spec.image_size)
        repeats = self.preset.latency_repeats
        if model is self.dense:
            (alone,) = measure_latency(
                model, shape, batch_sizes=(1,), runtime=runtime, repeats=repeats
            )
            return {
                "runtime": runtime,
                "latency_ms": alone.median_ms,
                "latency_p10_ms": alone.p10_ms,
                "latency_p90_ms": alone.p90_ms,
            }
        (row,) = compare_latency(
            self.dense, model, shape, batch_sizes=(1,), runtimes=(runtime,), repeats=repeats
        ).rows
        return {
            "runtime": runtime,
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
        evaluated = evaluate_model(self.dense, self.data, config, self.out / RUNS_DIR, cell.id)
        measured = self.measure(self.dense, config)
        size = measure_size(self.dense.cpu(), self.probe[0][0][:1].cpu())
        row = evaluated.with_cost(size, method="dense", seconds=info.get("seconds"))
        return BenchRow(
            **{**row.to_dict(), **measured},
            cell=cell.id,
            criterion=None,
            keep=1.0,
            seed=cell.seed,
            keep_kind=config.prune.keep_kind,
            keep_achieved=1.0,
            per_corruption=_per_corruption(cell_dir(self.out, cell.id)),
            # before = after for the unpruned model, so every row has both columns
            dense_loss_increase=measured["loss_increase"],
            dense_hessian_eigenvalue=measured["hessian_eigenvalue"],
            cell_seconds=time.perf_counter() - start,
            dense_sha256=self.dense_sha256,
        )

    def pruned_row(self, cell: Cell, config: ExperimentConfig, dense_row: BenchRow) -> BenchRow:
        """Prune (or resume, or reuse a finished run's summary), then evaluate and measure."""
        start = time.perf_counter()
        run_dir = cell_dir(self.out, cell.id)
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
            dense_sha256=self.dense_sha256,
        )


@dataclass
class BenchGrid(Grid[BenchRow]):
    """A benchmark's grid (:func:`open_grid`): its cells are the preset's pruned cells."""

    preset: BenchPreset  # with progress bars off when cells run at once


def open_grid(
    preset: BenchPreset, out_dir: str | Path, console: Console, parallel: Parallel
) -> BenchGrid:
    """The grid of ``preset`` in ``out_dir`` (:meth:`GridFiles.open`), every cell's config
    validated before any work; rows are adopted for the seeds' dense references first."""
    parallel = parallel.validate()
    cells = preset.cells()
    if not cells:
        raise UserError(f"preset {preset.name} has an empty grid: give pairs, keeps and seeds")
    for cell in cells:
        preset.config(cell)
    if not parallel.serial:  # progress bars of cells running at once would be garbled
        preset = preset.with_base(progress=False)
    references = list(dict.fromkeys(cell.reference for cell in cells))
    out, done = BENCH_FILES.open(out_dir, preset.identity(), [c.id for c in references + cells])
    device = preset.config(cells[0]).prune.device
    return BenchGrid(BENCH_FILES, out, cells, done, parallel, console, device, preset)


def bench_cell(
    preset: BenchPreset,
    cell: Cell,
    out: Path,
    dense_row: BenchRow | None,
    console: Console | None = None,
) -> BenchRow:
    """One cell, run in this process: the seed's dense reference (``dense_row`` None), or a
    pruned model measured against ``dense_row``. The row also goes to
    ``<out>/runs/<cell>/row.json``, so that it outlives the process that asked for it."""
    console = console or Console(quiet=True)
    reference = preset.config(cell.reference)
    data = load_data(reference)
    dense, info = dense_model(reference, data, console)
    device = resolve_device(reference.prune.device)
    probe = probe_batches(
        data, preset.sharpness_batches, preset.sharpness_batch_size, cell.seed, device
    )
    sha256 = cached_dense_sha256(dense_cache_directory(reference, dense_recipe(reference, data)))
    shared = _Seed(preset, out, data, dense, probe, console, sha256)
    if dense_row is None:
        row = shared.dense_row(cell, reference, info)
    else:
        row = shared.pruned_row(cell, preset.config(cell), dense_row)
    return save_row(out, replace(row, threads=torch.get_num_threads()))


def refill_dense_cache(preset: BenchPreset, cell: Cell, console: Console | None = None) -> None:
    """Train the dense model of ``cell`` (a seed's dense reference) into the dense cache."""
    config = preset.config(cell)
    dense_model(config, load_data(config), console or Console(quiet=True))


def _dense_entry(preset: BenchPreset, reference: Cell) -> tuple[Path, str | None]:
    """The dense cache directory of a seed and the sha256 of the model there (None: none)."""
    config = preset.config(reference)
    directory = dense_cache_directory(config, dense_recipe(config, load_data(config)))
    return directory, cached_dense_sha256(directory)


def _check_dense_models(
    entries: dict[Cell, tuple[Path, str | None]], done: dict[str, BenchRow], out: Path
) -> None:
    """Refuse to add cells to a seed whose finished rows came from another dense model than
    the cached one (trained again elsewhere): the paired differences would mix two models."""
    for reference, (directory, current) in entries.items():
        recorded = done[reference.id].dense_sha256
        if recorded is None or current is None or recorded == current:
            continue  # rows of earlier versions record no model
        raise UserError(
            f"the dense model of seed {reference.seed} in the cache (weights {current[:12]}) is "
            f"not the one its finished rows used ({recorded[:12]}): it was trained again, on "
            f"other hardware or software. Put that model back into {directory}, or remove seed "
            f"{reference.seed}'s rows from {out / RESULTS_FILE} to run the seed again"
        )


def _describe(row: BenchRow) -> str:
    if row.method == "dense":
        return f"dense model evaluated, clean {row.clean_accuracy:.2%}"
    return (
        f"clean {row.clean_accuracy:.2%}, size {row.keep_achieved:.2f} of the dense {row.keep_kind}"
    )


def _tasks(grid: BenchGrid, cells: list[Cell]) -> list[Task]:
    """``bench_cell``'s arguments: a pruned cell is measured against its seed's dense row; a
    dense reference, not done yet, gets None."""
    return [(c.id, (grid.preset, c, grid.out, grid.done.get(c.reference.id))) for c in cells]


def run_bench(
    preset_or_config: str | BenchPreset,
    out_dir: str | Path,
    *,
    console: Console | None = None,
    parallel: Parallel | None = None,
) -> Path:
    """Run every cell of a preset not yet in ``<out>/results.jsonl``, then write the report.

    Every cell's config is validated before any work. The dense reference of each seed runs
    first, then the pruned cells; with ``parallel`` (:class:`~adasap.experiments.grid.Parallel`:
    local processes or a Ray cluster) several at once, with the same results as one after
    another. A cell that fails with a :class:`UserError` (e.g. a diverged run) is reported,
    logged to ``failures.jsonl`` and skipped; it is tried again by the next run. Returns
    ``out_dir``.
    """
    console = console or Console()
    grid = open_grid(resolve_preset(preset_or_config), out_dir, console, parallel or Parallel())
    todo = grid.todo()
    needed = list(dict.fromkeys(c.reference for c in todo))
    dense = [r for r in needed if r.id not in grid.done]
    # A finished reference whose model left the cache (a resume on another machine) is
    # trained again here, all seeds at once, not by its seed's first cell while the
    # seed's other cells wait for it.
    entries = {r: _dense_entry(grid.preset, r) for r in needed if r.id in grid.done}
    refill = [r for r, (_, sha256) in entries.items() if sha256 is None]
    with grid.running(todo):
        if refill:
            console.print(f"dense models missing from the cache: {', '.join(r.id for r in refill)}")
            tasks = [(r.id, (grid.preset, r)) for r in refill]
            grid.run(refill_dense_cache, tasks, lambda _: "dense model cached", fatal=True)
            entries.update({r: _dense_entry(grid.preset, r) for r in refill})
        _check_dense_models(entries, grid.done, grid.out)
        grid.run(bench_cell, _tasks(grid, dense), _describe, fatal=True)
        grid.run(bench_cell, _tasks(grid, todo), _describe)
    report = write_report(grid.out)
    console.print(f"benchmark report: {report / 'report.md'}")
    return Path(out_dir)
