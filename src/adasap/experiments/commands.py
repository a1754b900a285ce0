"""The smaller jobs: ``adasap train`` (the dense model alone), ``adasap eval`` and ``adasap
latency`` (saved models)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from adasap.deploy.comparison import LatencyComparison
from adasap.deploy.onnx import find_models
from adasap.deploy.serialization import (
    DENSE,
    load_model,
    read_description,
    save_model,
    saved_task,
)
from adasap.devices import resolve_device
from adasap.distributed import is_main, on_main
from adasap.errors import UserError
from adasap.experiments.config import ExperimentConfig
from adasap.experiments.dense import dense_model, folder_label
from adasap.experiments.grid import Parallel
from adasap.experiments.job import JOBS, job_of
from adasap.experiments.reporting import results_table
from adasap.experiments.results import ResultRow
from adasap.experiments.run import prepare_run_dir
from adasap.experiments.sweep import run_sweep, sweep_report
from adasap.experiments.sweep_check import check_sweep
from adasap.experiments.sweep_presets import SWEEP_PRESETS
from adasap.io import atomic_write_json
from adasap.method.pruning import measure_size


def evaluate_path(
    path: str | Path,
    config: ExperimentConfig,
    official: tuple[str, str] | None = None,
    console: Console | None = None,
    imagenet_v2: str | Path | None = None,
) -> list[ResultRow]:
    """``adasap eval``: evaluate one saved model directory, or every model of a run directory.

    Reports are written next to each model (``corruptions.{json,md,png}``) and a table of
    all of them is printed. The saved models' task decides the data and the scores: a
    classifier's are those of ``config`` (the flags); a detector's those of its run's
    ``config.json`` unless ``config`` is a detection config. ``imagenet_v2`` is an
    ImageNet-V2 style folder (``<root>/<class index>/<image>``, classifiers only), its
    accuracy the table's ImageNet-V2 column.
    """
    console = console or Console(quiet=not is_main())
    path = Path(path)
    if (path / "model.json").is_file():
        models = {path.name: path}
    elif path.is_dir():
        models = {d.name: d for d in sorted(path.iterdir()) if (d / "model.json").is_file()}
    else:
        models = {}
    if not models:
        raise UserError(f"{path} holds no saved model: pass a run directory or a model directory")
    loaded = {label: load_model(directory) for label, directory in models.items()}  # fail fast
    tasks = {saved_task(read_description(d)) for d in models.values()}
    if len(tasks) > 1:
        raise UserError(f"{path} holds both classifiers and detectors: evaluate them apart")
    job = JOBS.get(tasks.pop())
    config = job.eval_config(config, next(iter(models.values()))).validate()
    data = job.load_data(config)
    for directory in models.values():
        job.check_fits(read_description(directory)["architecture"], config, data, directory)
    shifted = None if imagenet_v2 is None else job.shifted_data(config, data, imagenet_v2)
    rows = []
    for label, directory in models.items():
        model = loaded[label]
        row = job.evaluate(model, data, config, directory.parent, label, official, shifted)
        rows.append(row.with_cost(measure_size(model, job.example(config, data))))
    console.print(results_table(rows, title=f"adasap eval: {path}", columns=job.columns))
    return rows


def measure_path_latency(
    path: str | Path,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    device: str = "cpu",
    repeats: int = 20,
    console: Console | None = None,
) -> LatencyComparison:
    """``adasap latency``: a run's pruned models (or one model directory) beside the dense one,
    printed as a table and written to ``<path>/latency.json``. How the dense model and the
    inputs are made is the task's (:meth:`~adasap.experiments.job.Job.latency`)."""
    console = console or Console()
    models = find_models(path)
    job = JOBS.get(saved_task(read_description(next(iter(models.values())))))
    comparison = job.latency(
        Path(path), models, batch_sizes=batch_sizes, device=device, repeats=repeats,
        console=console,
    )  # fmt: skip
    console.print(comparison.table())
    written = atomic_write_json(Path(path) / "latency.json", comparison.to_dict())
    console.print(f"latency: {written}")
    return comparison


def train_dense_model(config: ExperimentConfig, console: Console | None = None) -> Path:
    """``adasap train``: the dense model (trained, or reused from the cache) in a run directory."""
    console = console or Console(quiet=not is_main())
    config = config.validate()
    job = job_of(config)
    data = job.load_data(config)
    job.check(config, data)  # before the run directory exists
    label = f"{folder_label(config)}-dense"
    with contextlib.ExitStack() as held:  # rank 0's lock on the run, until the model is saved
        run_dir = on_main(  # rank 0 names the run and tells the others
            lambda: prepare_run_dir(config.out_dir, config.name, config.overwrite, held, label)
        )
        model, info = dense_model(config, data, console)
        device = resolve_device(config.prune.device)
        score = job.training_task(config, data).score(
            model.to(device), data.test, device=device, sharded=True
        )
        architecture = job.architecture(config, data)
        extra = {"train": info}
        on_main(lambda: save_model(run_dir / DENSE, model.cpu(), architecture, extra=extra))
    headline = ", ".join(f"{k} {v:.2%}" for k, v in score.items())
    console.print(f"dense {config.model}: test {headline}; model in {run_dir / DENSE}")
    return run_dir


def run_grid(
    command: str,
    preset: str,
    out: str | Path,
    *,
    task: str = "classification",
    jobs: int | None = None,
    ray: str | None = None,
    report_only: bool = False,
    check: bool = False,
    console: Console | None = None,
) -> None:
    """``adasap bench`` (of ``task``) and ``adasap sweep``: run the grid of ``preset`` into
    ``out`` (the unfinished cells; none with ``report_only``) and write its report."""
    console = console or Console()
    parallel = Parallel(jobs=jobs, ray=ray).validate()
    if command == "bench":
        report = JOBS.get(task).bench(preset, Path(out), console, parallel, report_only)
        console.print(f"report: {report}")
        return
    if not report_only:
        chosen = SWEEP_PRESETS[preset]
        run_sweep(chosen.base, chosen.grid, out, console=console, parallel=parallel)
    console.print(f"sweep results: {sweep_report(out)}")
    if check:
        console.print(f"after-the-fact check: {check_sweep(out, console)}")
