"""``adasap run --task detection``: a dense detector, pruned by each method, P / mPC / rPC, table.

The detection counterpart of :mod:`adasap.experiments.run`, sharing its run directory, config
files, table, latency comparison and ``--resume``: the default trains ``tiny_ssd`` on the
Fashion-MNIST canvases (cached like the classification dense model; VOC and COCO folders:
:mod:`adasap.experiments.detection_data`), prunes it with ``sgd`` and ``adasap``
(:func:`adasap.training.detection.prune_detector`) and evaluates each model on clean and
corrupted test images (Michaelis et al. 2019: P = clean mAP@0.5, mPC, rPC = mPC / P).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from adasap.data.detection import DetectionBatches, DetectionBundle, training_batches
from adasap.deploy.serialization import (
    detection_architecture,
    load_model,
    save_model,
)
from adasap.distributed import launched
from adasap.errors import UserError
from adasap.experiments.config import ExperimentConfig
from adasap.experiments.dense import cached_dense_model, folder_label
from adasap.experiments.detection_data import (
    data_key,
    image_side,
    load_detection_data,
    on_canvases,
    reduced_note,
    timing_images,
    training_workers,
)
from adasap.experiments.reporting import DETECTION_COLUMNS, results_markdown, results_table
from adasap.experiments.results import ResultRow
from adasap.experiments.run import machine_description, new_run_dir, timed_rows
from adasap.io import (
    atomic_write_json,
    atomic_write_text,
    cache_root,
    read_json_mapping,
)
from adasap.method.pruning import measure_size
from adasap.method.schedule import PhaseSchedule
from adasap.models.detection import build_detector
from adasap.robustness.corruptions import CORRUPTIONS
from adasap.robustness.detection import evaluate_detection, evaluate_detection_corruptions
from adasap.robustness.report import SOURCE_RENDERED
from adasap.training.checkpoint import RunInterrupted
from adasap.training.detection import prune_detector, train_detector
from adasap.training.progress import ProgressLog
from adasap.training.settings import base_optimizer, pruner_settings

QUICK_CORRUPTIONS = ("gaussian_noise", "gaussian_blur")
EVAL_BATCH = 32


def check_detection_command(config: ExperimentConfig, command: str) -> None:
    """What the command line cannot do with a detection config: a one-line error each."""
    if config.task != "detection":
        return
    if launched():
        raise UserError(
            "torchrun does not run detection jobs: start adasap with --task detection in one "
            "process"
        )
    if command == "train":
        raise UserError(
            "adasap train is for classifiers: adasap run --task detection trains (and caches) "
            "the dense detector"
        )


def architecture_of(config: ExperimentConfig, data: DetectionBundle) -> dict[str, Any]:
    return detection_architecture(config.model, data.spec.num_classes, image_side(config))


def _steps(epochs: float, data: DetectionBundle, batch_size: int) -> int:
    """``epochs`` passes over the training images, in batches (at least one step if > 0)."""
    per_epoch = -(-len(data.train) // batch_size)
    return max(1, round(epochs * per_epoch)) if epochs > 0 else 0


def _training_batches(config: ExperimentConfig, data: DetectionBundle) -> DetectionBatches:
    s = config.prune
    return training_batches(
        data.train, s.batch_size, seed=s.seed, num_workers=training_workers(config, data)
    )


def example_image(config: ExperimentConfig) -> list[torch.Tensor]:
    """The image every row's size is measured on: one square of the detector's input side
    (training images may differ in shape; the same random one for every model)."""
    side = image_side(config)
    return [torch.rand(3, side, side, generator=torch.Generator().manual_seed(0))]


def dense_recipe(config: ExperimentConfig, data: DetectionBundle) -> dict[str, Any]:
    """What the dense detector depends on: its cache key."""
    s = config.prune
    recipe = dict(
        architecture=architecture_of(config, data),
        dataset=config.dataset,
        train=len(data.train),
        epochs=config.dense_epochs,
        lr=config.dense_lr,
        batch_size=s.batch_size,
        seed=s.seed,
    )
    if not on_canvases(config):  # the canvases keep the key they had before VOC and COCO
        recipe["data"] = data_key(config)
    return recipe


def dense_directory(config: ExperimentConfig, recipe: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(config.cache_dir) / "dense" / f"{folder_label(config)}-{key}"


def dense_detector(config: ExperimentConfig, data: DetectionBundle, console: Console):
    """The dense detector trained with the config's recipe, or the cached one (as loaded)."""
    s = config.prune
    recipe = dense_recipe(config, data)
    architecture = recipe["architecture"]
    directory = dense_directory(config, recipe)

    def build():
        steps = _steps(config.dense_epochs, data, s.batch_size)
        console.print(f"dense model: training {config.model} for {steps} steps")
        torch.manual_seed(s.seed)
        started = time.perf_counter()
        model, loss = train_detector(
            build_detector(config.model, num_classes=data.spec.num_classes,
                           image_size=image_side(config)),
            _training_batches(config, data),
            steps,
            lr=config.dense_lr,
            device=s.device,
            progress=ProgressLog(enabled=config.progress, console=console),
        )  # fmt: skip
        info = {"seconds": time.perf_counter() - started, "loss": loss, "recipe": recipe}
        save_model(directory, model.cpu(), architecture, extra={"train": info})
        return load_model(directory), info

    return cached_dense_model(directory, build, console)


def evaluate_detector(
    model, data: DetectionBundle, config: ExperimentConfig, out_dir: Path, label: str
) -> ResultRow:
    """The row of ``label``: P, mPC and rPC on the first ``corruption_limit`` test images
    (all of them with ``corruptions: none``, P alone); the report goes to ``out_dir/label``."""
    model.cpu().eval()
    names = {"all": tuple(CORRUPTIONS), "quick": QUICK_CORRUPTIONS, "none": None}[
        config.corruptions
    ]
    if names is None:
        clean = evaluate_detection(model, data.test, batch_size=EVAL_BATCH)
        return ResultRow(method=label, clean_accuracy=clean["map_50"])
    test = data.test
    count = min(config.corruption_limit or len(test), len(test))
    report = evaluate_detection_corruptions(
        model,
        test.subset(range(count)),
        dataset_key=f"{data_key(config)}-seed{config.prune.seed}-test{len(test)}-n{count}",
        corruptions=names,
        batch_size=EVAL_BATCH,
        seed=config.prune.seed,
        cache_dir=cache_root(config.cache_dir) / "corruptions",
        progress=config.progress,
    )
    report.save(out_dir / label)
    return ResultRow(
        method=label,
        clean_accuracy=report.performance,
        corruption_accuracy=report.mpc,
        extra_accuracy=report.extra_mpc,
        relative_robustness=report.rpc,
        corruption_source=SOURCE_RENDERED,
    )


def pruned_detector_row(
    method: str, dense, data: DetectionBundle, config: ExperimentConfig, run_dir: Path, console
) -> ResultRow:
    """Prune a copy of ``dense`` with ``method``, save it in ``run_dir/method``, evaluate it."""
    s = replace(config.prune, method=method)
    console.print(f"[bold]{method}[/bold]: pruning to keep {s.keep:.0%} of the {s.keep_kind}")
    optimizer, optimizer_kwargs = base_optimizer(s.optimizer)
    steps = [_steps(e, data, s.batch_size) for e in (
        s.warmup_epochs, s.prune_epochs, s.finetune_epochs)]  # fmt: skip
    lr_warmup = _steps(s.lr_warmup_epochs, data, s.batch_size)
    torch.manual_seed(s.seed)
    model, result = prune_detector(
        copy.deepcopy(dense),
        _training_batches(config, data),
        PhaseSchedule(*steps, removals=s.prune_steps),
        method=method,
        keep=s.keep,
        keep_kind="macs" if s.keep_kind == "macs" else "params",
        criterion=s.criterion,
        optimizer=optimizer,
        optimizer_kwargs=optimizer_kwargs,
        lr_warmup_steps=min(lr_warmup, sum(steps) - 1),
        device=s.device,
        amp=s.amp,
        progress=ProgressLog(enabled=config.progress, console=console),
        settings=pruner_settings(s),
    )
    model = model.cpu()
    method_dir = run_dir / method
    save_model(method_dir, model, architecture_of(config, data), result.pruning_history)
    size = measure_size(model, example_image(config))  # as the dense row's, not the pruner's
    row = evaluate_detector(model, data, config, run_dir, method).with_cost(
        size, seconds=result.seconds
    )
    summary = {**row.to_dict(), "kept": result.kept, "phase_losses": result.phase_losses,
               "ignored_layers": result.ignored_layers}  # fmt: skip
    atomic_write_json(method_dir / "summary.json", summary)
    return row


def finished_detector_row(method_dir: Path, console: Console) -> ResultRow | None:
    """The row of a method that finished in an earlier attempt of the run (its model and
    ``summary.json`` saved), as it was then; None when it has to run (again)."""
    summary = method_dir / "summary.json"
    if not (summary.is_file() and (method_dir / "model.json").is_file()):
        return None
    console.print(f"[bold]{method_dir.name}[/bold]: finished earlier, reusing {summary}")
    return ResultRow.from_dict(read_json_mapping(summary, "delete its folder to run it again"))


def run_detection_experiment(
    config: ExperimentConfig, console: Console | None = None, resume: bool = False
) -> Path:
    """Run the detection comparison and write ``results.md``/``results.json`` in the run
    directory (``config.yaml``, and per method its model and corruption report).

    With ``resume`` the run directory ``out_dir/name`` must exist: the methods that finished
    there are kept (their rows read back from ``summary.json``), the others run from the start,
    the dense model comes from the cache and is evaluated again. Interrupted (Ctrl-C), the run
    raises :class:`RunInterrupted` naming its directory.
    """
    started = time.perf_counter()
    console = console or Console()
    config = config.validate()
    if config.task != "detection":
        raise UserError("run_detection_experiment needs task: detection")
    data = load_detection_data(config)
    if resume:
        run_dir = Path(config.out_dir) / str(config.name)
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} does not exist: there is nothing to resume")
    else:
        name = config.name or time.strftime("%Y%m%d-%H%M%S") + f"-{folder_label(config)}"
        config = replace(config, name=name)
        run_dir = new_run_dir(config)
    note = reduced_note(config, data)
    console.print(f"[bold yellow]{note}[/bold yellow]")
    try:
        rows = _rows(config, data, run_dir, console)
    except KeyboardInterrupt as exc:
        interrupted = RunInterrupted(None)
        interrupted.run_dir = run_dir
        raise interrupted from exc
    seconds = time.perf_counter() - started
    results = {
        "config": config.to_flat(),
        "machine": machine_description(),
        "seconds": seconds,
        "setting": note,
        "rows": [row.to_dict() for row in rows],
    }
    atomic_write_json(run_dir / "results.json", results)
    markdown = results_markdown(rows, columns=DETECTION_COLUMNS)
    atomic_write_text(run_dir / "results.md", markdown + "\n" + note + "\n")
    console.print(results_table(rows, title="adasap detection results", columns=DETECTION_COLUMNS))
    console.print(f"results: {run_dir / 'results.md'}")
    minutes, rest = divmod(round(seconds), 60)
    console.print(f"total time: {minutes} min {rest:02d} s (this command, evaluation included)")
    return run_dir


def _rows(
    config: ExperimentConfig, data: DetectionBundle, run_dir: Path, console: Console
) -> list[ResultRow]:
    """The dense row, then one per method (finished ones reused), with their latencies."""
    dense, dense_info = dense_detector(config, data, console)
    dense_size = measure_size(dense, example_image(config))
    evaluated = evaluate_detector(dense, data, config, run_dir, "dense")
    rows = [evaluated.with_cost(dense_size, seconds=dense_info.get("seconds"))]
    for method in config.methods:
        row = finished_detector_row(run_dir / method, console)
        rows.append(row or pruned_detector_row(method, dense, data, config, run_dir, console))
    side = image_side(config)
    images = timing_images(config, data)
    return timed_rows(rows, dense, None, run_dir, input_shape=(3, side, side), images=images)
