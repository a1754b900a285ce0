"""The smaller jobs: ``adasap train`` (the dense model alone), ``adasap eval``, ``adasap
latency`` and ``adasap export`` (saved models)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from adasap.deploy.comparison import LatencyComparison
from adasap.deploy.onnx import ExportReport, export_onnx, find_models, select_model
from adasap.deploy.runtimes import DEFAULT_RUNTIME, get_runtime
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
from adasap.experiments.config import ExperimentConfig, from_flat
from adasap.experiments.dense import dense_model, folder_label
from adasap.experiments.grid import Parallel
from adasap.experiments.job import JOBS, job_of
from adasap.experiments.reporting import comparison_speed_tables, results_tables
from adasap.experiments.results import ResultRow
from adasap.experiments.run import prepare_run_dir
from adasap.experiments.speed import INT8_RUNTIME, check_deployable, evaluate_in
from adasap.experiments.sweep import run_sweep, sweep_report
from adasap.experiments.sweep_check import check_sweep
from adasap.experiments.sweep_presets import SWEEP_PRESETS
from adasap.io import atomic_write_json, read_json_mapping
from adasap.method.pruning import measure_size
from adasap.tasks import make_task


def evaluate_path(
    path: str | Path,
    config: ExperimentConfig,
    official: tuple[str, str] | None = None,
    console: Console | None = None,
    imagenet_v2: str | Path | None = None,
    runtime: str = "torch",
) -> list[ResultRow]:
    """``adasap eval``: evaluate one saved model directory, or every model of a run directory.

    Reports are written next to each model (``corruptions.{json,md,png}``) and a table of
    all of them is printed. The saved models' task decides the data and the scores: a
    classifier's are those of ``config`` (the flags); a detector's those of its run's
    ``config.json`` unless ``config`` is a detection config. ``imagenet_v2`` is an
    ImageNet-V2 style folder (``<root>/<class index>/<image>``, classifiers only), its
    accuracy the table's ImageNet-V2 column. With a ``runtime`` other than torch, the scores
    are computed by each model deployed there (a quantized one calibrated on the training
    images), its files and reports in ``<model>/<runtime>/``.
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
    task = tasks.pop()
    check_deployable(task, runtime, "pass --runtime torch")
    job = JOBS.get(task)
    config = job.eval_config(config, next(iter(models.values()))).validate()
    data = job.load_data(config)
    for directory in models.values():
        job.check_fits(read_description(directory)["architecture"], config, data, directory)
    shifted = None if imagenet_v2 is None else job.shifted_data(config, data, imagenet_v2)
    quantized = get_runtime(runtime).precision == "int8"
    calibration = job.calibration_images(config, data) if quantized else None
    rows = []
    for label, directory in models.items():
        model = loaded[label]
        if runtime == "torch":
            row = job.evaluate(model, data, config, directory.parent, label, official, shifted)
        else:
            row, _ = evaluate_in(
                runtime, job, model, data, config, directory, calibration=calibration,
                official=official, shifted=shifted,
            )  # fmt: skip
        rows.append(row.with_cost(measure_size(model, job.example(config, data))))
    where = "" if runtime == "torch" else f" (computed in {runtime})"
    title = f"adasap eval: {path}{where}"
    console.print(results_tables(rows, title=title, scores=job.scores)[0])
    return rows


def measure_path_latency(
    path: str | Path,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    runtimes: Sequence[str] | None = None,
    device: str = "cpu",
    repeats: int = 20,
    console: Console | None = None,
) -> LatencyComparison:
    """``adasap latency``: a run's pruned models (or one model directory) beside the dense one
    in each of ``runtimes`` (default: the run's ``runtime`` and torch; a detector's: torch),
    printed as tables (the times, and per runtime the speed table of ``adasap run``: MACs
    ratio, time ratios, efficiency) and written to ``<path>/latency.json``, each row with its
    ``macs_ratio`` and ``efficiency`` = macs_ratio / ratio. How the dense model and the inputs
    are made is the task's (:meth:`~adasap.experiments.job.Job.latency`)."""
    console = console or Console()
    models = find_models(path)
    task = saved_task(read_description(next(iter(models.values()))))
    if runtimes is None:
        runtimes = default_runtimes(task, models)
    for runtime in runtimes:
        check_deployable(task, runtime, "pass --runtime torch")
    comparison = JOBS.get(task).latency(
        Path(path), models, batch_sizes=batch_sizes, runtimes=runtimes, device=device,
        repeats=repeats, console=console,
    )  # fmt: skip
    macs = macs_ratios(models)
    for row in comparison.rows:
        row.update(macs_ratio=macs[row["model"]], efficiency=macs[row["model"]] / row["ratio"])
    console.print(comparison.table())
    for table in comparison_speed_tables(comparison.rows, macs, batch_sizes):
        console.print(table)
    written = atomic_write_json(Path(path) / "latency.json", comparison.to_dict())
    console.print(f"latency: {written}")
    return comparison


def default_runtimes(task: str, models: dict[str, Path]) -> tuple[str, ...]:
    """The runtime the run deploys to (its ``config.json``'s ``runtime``, else the default)
    and PyTorch; a detector's: PyTorch alone (its ONNX graph takes one image)."""
    if not make_task(task).onnx_timing:
        return ("torch",)
    saved = next(iter(models.values())).parent / "config.json"
    values = read_json_mapping(saved, "restore it, or pass --runtime") if saved.is_file() else {}
    return tuple(dict.fromkeys((str(values.get("runtime", DEFAULT_RUNTIME)), "torch")))


def macs_ratios(models: dict[str, Path]) -> dict[str, float]:
    """Pruned/dense MACs of each model but the dense one; the dense model is rebuilt from the
    saved architecture (MACs do not depend on the weights)."""
    description = read_description(next(iter(models.values())))
    task, architecture = make_task(saved_task(description)), description["architecture"]
    dense = task.build_saved(architecture)
    example, _ = task.replay_inputs(dense, architecture)
    dense_macs = measure_size(dense, example).macs
    return {
        name: measure_size(load_model(directory), example).macs / dense_macs
        for name, directory in models.items()
        if name != DENSE
    }


def export_path(
    path: str | Path,
    onnx: str | Path,
    *,
    method: str | None = None,
    opset: int = 17,
    int8: bool = False,
) -> ExportReport:
    """``adasap export``: the model ``method`` of a run (or a model directory) as a checked
    ONNX file; with ``int8`` quantized to INT8, calibrated on the training images of the
    run's own config (:meth:`~adasap.experiments.job.Job.calibration_images`)."""
    model_dir = select_model(path, method)
    if not int8:
        return export_onnx(model_dir, onnx, opset=opset)
    task = saved_task(read_description(model_dir))
    check_deployable(task, INT8_RUNTIME, "export it without --int8")
    job = JOBS.get(task)
    saved = model_dir.parent / "config.json"
    if not saved.is_file():
        raise UserError(
            f"{model_dir} is not in a run directory (no {saved.name} beside it), so there are no "
            "training images to calibrate INT8 on: export a model of an adasap run"
        )
    values = read_json_mapping(saved, "restore it, or start a new run with the same options")
    config = from_flat(values, source=str(saved)).validate()
    calibration = job.calibration_images(config, job.load_data(config))
    return export_onnx(model_dir, onnx, opset=opset, int8=True, calibration=calibration)


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
