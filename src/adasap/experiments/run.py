"""The main job: dense model -> pruned by each method -> clean and corruption accuracy -> table.

``run_experiment`` is what ``adasap run`` (and so ``make demo``) does. Everything it needs is
validated before the run directory is created, so bad input leaves nothing behind. Under
torchrun every rank runs it: all train and evaluate their parts, rank 0 alone decides what is
on disk, writes and prints (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from adasap.data import DataBundle, default_workers, evaluation_source, training_source
from adasap.deploy.latency import TimingSettings, compare_latency, latency_budget
from adasap.deploy.serialization import load_model, save_model
from adasap.devices import resolve_device
from adasap.distributed import broadcast_value, is_main, on_main, shard
from adasap.errors import UserError
from adasap.experiments.config import ExperimentConfig, dump_yaml
from adasap.experiments.dense import (
    dense_model,
    folder_label,
    load_data,
    model_architecture,
    safe_name,
)
from adasap.experiments.reporting import results_markdown, results_table
from adasap.experiments.results import ResultRow
from adasap.io import atomic_write_json, atomic_write_text, cache_root, writing
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size
from adasap.models.builders import build_model, find_classifier
from adasap.robustness.corruptions import CORRUPTIONS
from adasap.robustness.evaluation import evaluate_corruptions
from adasap.robustness.official import official_sets
from adasap.training.checkpoint import CHECKPOINT_FILE, RunInterrupted
from adasap.training.evaluate import evaluate_accuracy
from adasap.training.loop import steps_per_epoch
from adasap.training.pipeline import check_target_reachable, prune

QUICK_CORRUPTIONS = ("gaussian_noise", "gaussian_blur")
# The run table's latency: batch 1 on the CPU, the models taking turns for this many rounds
# (about 1 s in all for ResNet-20 on an idle 2-core CPU).
LATENCY_WARMUP = 10
LATENCY_ROUNDS = 100


def prepare_run_dir(out_dir: str, name: str, overwrite: bool) -> Path:
    """Create an empty run directory, or fail with a clear message before any work starts."""
    run_dir = Path(out_dir) / name
    with writing(run_dir, "choose a writable --out directory"):
        if run_dir.is_dir() and any(run_dir.iterdir()):
            if not overwrite:
                resume = (
                    f", --resume {run_dir} to continue it"
                    if (run_dir / "config.json").is_file()
                    else ""
                )
                raise UserError(
                    f"{run_dir} already exists and is not empty: pass --overwrite to replace "
                    f"it{resume}, or another --name"
                )
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    return run_dir


def check_keep_reachable(config: ExperimentConfig, data: DataBundle) -> None:
    """Fail before any work (and before the run directory exists) when ``keep`` would empty
    a layer: :func:`adasap.training.pipeline.check_target_reachable` on the untrained dense
    architecture.

    A latency budget is measured here as the run would measure it, on the training device;
    the run then reuses the cached latency table.
    """
    s = config.prune
    device = resolve_device(s.device) if s.keep_kind == "latency" else torch.device("cpu")
    model = build_model(**model_architecture(config, data)).to(device).eval()
    example = example_images(data).to(device)
    classifier = find_classifier(model, data.spec.num_classes)
    layout = NeuronLayout(model, example, [classifier] if classifier is not None else [])
    budget = None
    if s.keep_kind == "latency":
        with warnings.catch_warnings():  # a noisy machine: the run measures again and says so
            warnings.simplefilter("ignore")
            budget = latency_budget(
                layout, example[:1], s.keep, timing=TimingSettings(device=device.type)
            )
    check_target_reachable(layout, s, measure_size(model, example), budget)


def _corruption_names(config: ExperimentConfig) -> tuple[str, ...] | None:
    return {"all": tuple(CORRUPTIONS), "quick": QUICK_CORRUPTIONS, "none": None}[config.corruptions]


def example_images(data: DataBundle) -> torch.Tensor:
    """Two test images: the example input that traces and measures a model."""
    return evaluation_source(data.test).example(2)


def timed_rows(
    rows: list[ResultRow],
    dense,
    data: DataBundle | None,
    run_dir: Path,
    input_shape: tuple[int, ...] | None = None,
    images: torch.Tensor | None = None,
) -> list[ResultRow]:
    """``rows`` (dense first, then one per method) with their batch-1 CPU latency, on images of
    ``input_shape`` (C, H, W; default: the data's test images), random unless ``images``.

    The dense model and every pruned one (read back from ``run_dir/<method>``) are timed in
    one session, taking turns at each round, so that a change in machine load hits them alike;
    each pruned row also gets its pruned/dense ratio with its 95% interval and whether that
    interval is too wide to trust (:mod:`adasap.deploy.ratio`).
    """
    pruned = {row.method: load_model(run_dir / row.method) for row in rows[1:]}
    comparison = compare_latency(
        dense.cpu(),
        pruned,
        input_shape or tuple(example_images(data).shape[1:]),
        batch_sizes=(1,),
        warmup=LATENCY_WARMUP,
        repeats=LATENCY_ROUNDS,
        images=images,
    )
    timed = [replace(rows[0], latency_ms=comparison.rows[0]["dense_ms"])]
    for row, r in zip(rows[1:], comparison.rows, strict=True):
        timed.append(
            replace(
                row,
                latency_ms=r["pruned_ms"],
                latency_ratio=r["ratio"],
                latency_ratio_low=r["ratio_low"],
                latency_ratio_high=r["ratio_high"],
                latency_noisy=r["noisy"],
            )
        )
    return timed


def loader_workers(config: ExperimentConfig) -> int:
    """DataLoader processes for image folders: the config's ``workers``, else the default."""
    return default_workers() if config.workers is None else config.workers


def evaluate_model(
    model,
    data: DataBundle,
    config: ExperimentConfig,
    out_dir: Path,
    label: str,
    official: tuple[str, str] | None = None,
) -> ResultRow:
    """The row of ``label``: clean test accuracy, and accuracy on corrupted test images; the
    report goes to
    ``out_dir/label/corruptions.{json,md,png}``.

    Corrupted images are rendered from the first ``corruption_limit`` test images (once,
    cached), or read from official pre-rendered files with ``official=(root, name)``, e.g.
    ``("data/CIFAR-10-C", "cifar10-c")``, the only numbers comparable with published ones.
    """
    device = resolve_device(config.prune.device)
    model.to(device).eval()
    clean = evaluate_accuracy(model, data.test, device=device, sharded=True)
    row = ResultRow(method=label, clean_accuracy=clean)
    names = _corruption_names(config)
    if names is None:
        return row
    subset = data.test
    if official is None and config.corruption_limit is not None:
        subset = subset.subset(torch.arange(min(config.corruption_limit, len(subset))))
    report = evaluate_corruptions(
        model,
        subset,
        corruptions=names,
        # imagefolder:/a/b names its render cache folder imagefolder-a-b-...
        dataset_key=safe_name(f"{config.dataset}-test{len(data.test)}-n{len(subset)}"),
        device=device,
        seed=config.prune.seed,
        cache_dir=cache_root(config.cache_dir) / "corruptions",
        corrupted=(
            official_sets(*official, num_workers=loader_workers(config))
            if official is not None
            else None
        ),
        progress=config.progress,
        sharded=True,
    )
    on_main(lambda: report.save(out_dir / label))
    return replace(
        row,
        corruption_accuracy=report.corruption_accuracy,
        extra_accuracy=report.extra_accuracy,
        relative_robustness=report.relative_robustness,
        corruption_source=report.source,
    )


def run_experiment(
    config: ExperimentConfig, console: Console | None = None, resume: bool = False
) -> Path:
    """Run the comparison and write ``results.md``/``results.json`` in the run directory.

    With ``resume`` the run directory ``out_dir/name`` must exist: finished methods are kept,
    an interrupted one continues from its checkpoint, and the dense model comes from the cache
    (or its own checkpoint).
    """
    started = time.perf_counter()
    console = console or Console(quiet=not is_main())
    config = config.validate()
    resolve_device(config.prune.device)
    data = load_data(config)
    s = config.prune
    steps_per_epoch(training_source(data.train, batch_size=s.batch_size, shard=shard()))
    if resume:
        run_dir = Path(config.out_dir) / str(config.name)
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} does not exist: there is nothing to resume")
    else:
        check_keep_reachable(config, data)
        name = config.name or time.strftime("%Y%m%d-%H%M%S") + f"-{folder_label(config)}"
        config = replace(config, name=broadcast_value(name))  # rank 0's clock names the run
        run_dir = on_main(lambda: new_run_dir(config))
    if config.reduced:
        console.print(
            f"[bold yellow]Reduced setting[/bold yellow]: {len(data.train)} training images, "
            f"{len(data.test)} test images"
            + (f" ({config.corruption_limit} for corruptions)" if config.corruption_limit else "")
            + "; numbers are for a quick comparison, not for publication."
        )
    try:
        rows = _rows(config, data, run_dir, console)
    except RunInterrupted as exc:
        exc.run_dir = run_dir
        raise
    seconds = time.perf_counter() - started

    def write_results() -> None:
        results = {
            "config": config.to_flat(),
            "machine": machine_description(),
            "seconds": seconds,
            "rows": [row.to_dict() for row in rows],
        }
        atomic_write_json(run_dir / "results.json", results)
        atomic_write_text(run_dir / "results.md", results_markdown(rows, config.reduced))

    on_main(write_results)
    console.print(results_table(rows))
    console.print(f"results: {run_dir / 'results.md'}")
    minutes, rest = divmod(round(seconds), 60)
    console.print(f"total time: {minutes} min {rest:02d} s (this command, evaluation included)")
    return run_dir


def new_run_dir(config: ExperimentConfig) -> Path:
    """The new, empty run directory holding the run's config (nothing left behind on failure)."""
    run_dir = prepare_run_dir(config.out_dir, str(config.name), config.overwrite)
    try:
        atomic_write_json(run_dir / "config.json", config.to_flat())
        atomic_write_text(run_dir / "config.yaml", dump_yaml(config))
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # just created: leave nothing behind
        raise
    return run_dir


def _rows(config: ExperimentConfig, data: DataBundle, run_dir: Path, console) -> list[ResultRow]:
    dense, dense_info = dense_model(config, data, console)
    dense_size = measure_size(dense.cpu(), example_images(data))
    evaluated = evaluate_model(dense, data, config, run_dir, "dense")
    rows = [evaluated.with_cost(dense_size, seconds=dense_info.get("seconds"))]
    for method in config.methods:
        rows.append(pruned_row(method, dense, data, config, run_dir, console))
    # timed on rank 0 alone: the other ranks would compete for the same cores
    return on_main(lambda: timed_rows(rows, dense, data, run_dir))


def pruned_row(
    method: str,
    dense,
    data: DataBundle,
    config: ExperimentConfig,
    run_dir: Path,
    console,
    official: tuple[str, str] | None = None,
) -> ResultRow:
    """Prune with ``method`` and evaluate, or reuse the summary of an earlier finished run.

    The row has no latency: :func:`timed_rows` times all models of a run together.
    """
    method_dir = run_dir / method
    summary = method_dir / "summary.json"
    if broadcast_value(summary.is_file()):
        console.print(f"[bold]{method}[/bold]: finished earlier, reusing {summary}")
        return ResultRow.from_dict(json.loads(summary.read_text()))
    console.print(
        f"[bold]{method}[/bold]: pruning to keep {config.prune.keep:.0%} of the "
        f"{config.prune.keep_kind}"
    )
    method_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = method_dir / "metrics.jsonl"  # rank 0's: the others do not log
    with open(metrics_path, "w") if is_main() else contextlib.nullcontext() as metrics:

        def log(record: dict[str, Any]) -> None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

        result = prune(
            dense,
            data,
            settings=replace(config.prune, method=method),
            log=log,
            checkpoint_dir=method_dir,
            progress=config.progress,
        )
    model = result.model.cpu()
    architecture = model_architecture(config, data)
    on_main(lambda: save_model(method_dir, model, architecture, result.pruning_history))
    row = evaluate_model(model, data, config, run_dir, method, official).with_cost(
        result.size, seconds=result.seconds, latency=result.latency
    )

    def publish() -> None:
        atomic_write_json(summary, {**row.to_dict(), "history": result.history})
        (method_dir / CHECKPOINT_FILE).unlink(missing_ok=True)

    on_main(publish)
    return row


def machine_description() -> dict[str, Any]:
    import platform

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
