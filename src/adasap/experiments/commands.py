"""The smaller jobs: ``adasap train`` (the dense model alone), ``adasap eval`` and ``adasap
latency`` (saved models)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from adasap.data import DataBundle, training_source
from adasap.deploy.comparison import LatencyComparison, run_latency
from adasap.deploy.onnx import find_models
from adasap.deploy.serialization import is_detector, load_model, read_description, save_model
from adasap.devices import resolve_device
from adasap.distributed import broadcast_value, is_main, on_main, shard
from adasap.errors import UserError
from adasap.experiments.bench import run_bench
from adasap.experiments.bench_report import write_report
from adasap.experiments.config import ExperimentConfig
from adasap.experiments.detection_bench import run_detection_bench
from adasap.experiments.detection_saved import evaluate_detectors, run_detection_latency
from adasap.experiments.grid import Parallel
from adasap.experiments.reporting import results_table
from adasap.experiments.results import ResultRow
from adasap.experiments.run import (
    dense_model,
    evaluate_model,
    example_images,
    folder_label,
    load_data,
    loader_workers,
    model_architecture,
    prepare_run_dir,
)
from adasap.experiments.sweep import run_sweep, sweep_report
from adasap.experiments.sweep_check import check_sweep
from adasap.experiments.sweep_presets import SWEEP_PRESETS
from adasap.io import atomic_write_json
from adasap.method.pruning import measure_size
from adasap.robustness.official import load_imagenet_v2
from adasap.training.evaluate import evaluate_accuracy
from adasap.training.loop import steps_per_epoch


def evaluate_path(
    path: str | Path,
    config: ExperimentConfig,
    official: tuple[str, str] | None = None,
    console: Console | None = None,
    imagenet_v2: str | Path | None = None,
) -> list[ResultRow]:
    """``adasap eval``: evaluate one saved model directory, or every model of a run directory.

    Reports are written next to each model (``corruptions.{json,md,png}``) and a table of
    all of them is printed. ``imagenet_v2`` is an ImageNet-V2 style folder
    (``<root>/<class index>/<image>``), resized and centre-cropped as the validation images
    are; its accuracy is the table's ImageNet-V2 column.
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
    detectors = [is_detector(read_description(d)["architecture"]) for d in models.values()]
    if any(detectors):
        if not all(detectors):
            raise UserError(f"{path} holds both classifiers and detectors: evaluate them apart")
        return evaluate_detectors(loaded, models, config, console)
    config = config.validate()
    data = load_data(config)
    for directory in models.values():
        _check_fits(read_description(directory)["architecture"], data, directory)
    shifted = None
    if imagenet_v2 is not None:
        size = data.spec.image_size
        shifted = load_imagenet_v2(
            imagenet_v2,
            resize=round(size * 256 / 224),
            crop=size,
            num_workers=loader_workers(config),
        )
    device = resolve_device(config.prune.device)
    rows = []
    for label, directory in models.items():
        model = loaded[label]
        row = evaluate_model(model, data, config, directory.parent, label, official)
        if shifted is not None:
            shift = evaluate_accuracy(model, shifted, device=device, sharded=True)
            row = replace(row, shift_accuracy=shift)
        size = measure_size(model, example_images(data))
        rows.append(row.with_cost(size))
    console.print(results_table(rows, title=f"adasap eval: {path}"))
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
    printed as a table and written to ``<path>/latency.json``.

    Classifiers go through :func:`~adasap.deploy.comparison.run_latency` (fresh dense weights,
    random inputs: their time depends on neither); detectors through
    :func:`~adasap.experiments.detection_saved.run_detection_latency` (the run's trained dense
    detector and test images: their post-processing time depends on both).
    """
    console = console or Console()
    models = find_models(path)
    timing = dict(batch_sizes=batch_sizes, device=device, repeats=repeats)
    if is_detector(read_description(next(iter(models.values())))["architecture"]):
        comparison = run_detection_latency(path, **timing, console=console)
    else:
        comparison = run_latency(path, **timing)
    console.print(comparison.table())
    written = atomic_write_json(Path(path) / "latency.json", comparison.to_dict())
    console.print(f"latency: {written}")
    return comparison


def _check_fits(architecture: dict[str, Any], data: DataBundle, directory: Path) -> None:
    """The model in ``directory`` was built for the data's image shape and classes."""
    spec = data.spec
    model_side = (
        int(architecture["in_channels"]),
        int(architecture["image_size"]),
        architecture.get("num_classes"),
    )
    data_side = (spec.channels, spec.image_size, spec.num_classes)
    if model_side != data_side:
        raise UserError(
            f"the model in {directory} takes {_images_and_classes(*model_side)}, but dataset "
            f"{spec.name} has {_images_and_classes(*data_side)}: pass the --dataset the model "
            "was trained on"
        )


def _images_and_classes(channels: int, size: int, classes: Any) -> str:
    return f"{channels}x{size}x{size} images (channels x height x width) and {classes} classes"


def train_dense_model(config: ExperimentConfig, console: Console | None = None) -> Path:
    """``adasap train``: the dense model (trained, or reused from the cache) in a run directory."""
    console = console or Console(quiet=not is_main())
    config = config.validate()
    data = load_data(config)
    steps_per_epoch(training_source(data.train, batch_size=config.prune.batch_size, shard=shard()))
    name = config.name or time.strftime("%Y%m%d-%H%M%S") + f"-{folder_label(config)}-dense"
    name = broadcast_value(name)  # under torchrun rank 0 names the run and writes its files
    run_dir = on_main(lambda: prepare_run_dir(config.out_dir, name, config.overwrite))
    model, info = dense_model(config, data, console)
    device = resolve_device(config.prune.device)
    accuracy = evaluate_accuracy(model.to(device), data.test, device=device, sharded=True)
    architecture = model_architecture(config, data)
    on_main(lambda: save_model(run_dir / "dense", model.cpu(), architecture, extra={"train": info}))
    console.print(
        f"dense {config.model}: test accuracy {accuracy:.2%}; model in {run_dir / 'dense'}"
    )
    return run_dir


def run_grid(
    command: str,
    preset: str,
    out: str | Path,
    *,
    task: str | None = None,
    jobs: int | None = None,
    ray: str | None = None,
    report_only: bool = False,
    check: bool = False,
    console: Console | None = None,
) -> None:
    """``adasap bench`` and ``adasap sweep``: run the grid of ``preset`` into ``out`` (the
    unfinished cells; none with ``report_only``) and write its report; ``task="detection"``
    runs the detection benchmark (:mod:`adasap.experiments.detection_bench`)."""
    console = console or Console()
    parallel = Parallel(jobs=jobs, ray=ray).validate()
    if task == "detection":
        report = run_detection_bench(preset, out, console, parallel, report_only)
        console.print(f"report: {report}")
        return
    if command == "bench":
        if not report_only:
            run_bench(preset, out, console=console, parallel=parallel)
        console.print(f"report: {write_report(out) / 'report.md'}")
        return
    if not report_only:
        chosen = SWEEP_PRESETS[preset]
        run_sweep(chosen.base, chosen.grid, out, console=console, parallel=parallel)
    console.print(f"sweep results: {sweep_report(out)}")
    if check:
        console.print(f"after-the-fact check: {check_sweep(out, console)}")
