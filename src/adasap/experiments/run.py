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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from adasap.deploy.latency import compare_latency
from adasap.deploy.serialization import DENSE, load_model, save_model
from adasap.devices import resolve_device
from adasap.distributed import broadcast_value, is_main, on_main
from adasap.errors import UserError
from adasap.experiments.config import ExperimentConfig, dump_yaml
from adasap.experiments.dense import dense_model, folder_label
from adasap.experiments.job import Job, job_of
from adasap.experiments.reporting import results_markdown, results_table
from adasap.experiments.results import ResultRow
from adasap.io import atomic_write_json, atomic_write_text, writing
from adasap.method.pruning import measure_size
from adasap.training.checkpoint import CHECKPOINT_FILE, RunInterrupted
from adasap.training.pipeline import prune

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


def timed_rows(
    rows: list[ResultRow],
    dense,
    run_dir: Path,
    input_shape: tuple[int, ...],
    images: torch.Tensor | None = None,
) -> list[ResultRow]:
    """``rows`` (dense first, then one per method) with their batch-1 CPU latency, on images of
    ``input_shape`` (C, H, W), random unless ``images``.

    The dense model and every pruned one (read back from ``run_dir/<method>``) are timed in
    one session, taking turns at each round, so that a change in machine load hits them alike;
    each pruned row also gets its pruned/dense ratio with its 95% interval and whether that
    interval is too wide to trust (:mod:`adasap.deploy.ratio`).
    """
    pruned = {row.method: load_model(run_dir / row.method) for row in rows[1:]}
    comparison = compare_latency(
        dense.cpu(),
        pruned,
        input_shape,
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


def evaluate_model(
    model,
    data: Any,
    config: ExperimentConfig,
    out_dir: Path,
    label: str,
    official: tuple[str, str] | None = None,
) -> ResultRow:
    """The row of ``label`` (clean and corrupted scores of the config's task); the reports go
    to ``out_dir/label``."""
    return job_of(config).evaluate(model, data, config, out_dir, label, official)


def run_experiment(
    config: ExperimentConfig, console: Console | None = None, resume: bool = False
) -> Path:
    """Run the comparison and write ``results.md``/``results.json`` in the run directory.

    With ``resume`` the run directory ``out_dir/name`` must exist: finished methods are kept,
    an interrupted one continues from its checkpoint, and the dense model comes from the cache
    (or its own checkpoint). Interrupted (Ctrl-C), it raises :class:`RunInterrupted` naming
    the run directory.
    """
    started = time.perf_counter()
    console = console or Console(quiet=not is_main())
    config = config.validate()
    resolve_device(config.prune.device)
    job = job_of(config)
    data = job.load_data(config)
    if resume:
        run_dir = Path(config.out_dir) / str(config.name)
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} does not exist: there is nothing to resume")
    else:
        job.check(config, data)
        name = config.name or time.strftime("%Y%m%d-%H%M%S") + f"-{folder_label(config)}"
        config = replace(config, name=broadcast_value(name))  # rank 0's clock names the run
        run_dir = on_main(lambda: new_run_dir(config))
    note = job.note(config, data)
    if note is not None:
        console.print(f"[bold yellow]{note}[/bold yellow]")
    try:
        rows = _rows(job, config, data, run_dir, console)
    except (RunInterrupted, KeyboardInterrupt) as exc:
        interrupted = exc if isinstance(exc, RunInterrupted) else RunInterrupted(None)
        interrupted.run_dir = run_dir
        raise interrupted from None
    seconds = time.perf_counter() - started

    def write_results() -> None:
        results = {
            "config": config.to_flat(),
            "machine": machine_description(),
            "seconds": seconds,
            "setting": note,
            "rows": [row.to_dict() for row in rows],
        }
        atomic_write_json(run_dir / "results.json", results)
        atomic_write_text(run_dir / "results.md", results_markdown(rows, note, job.columns))

    on_main(write_results)
    console.print(results_table(rows, title=job.title, columns=job.columns))
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


def _rows(
    job: Job, config: ExperimentConfig, data: Any, run_dir: Path, console: Console
) -> list[ResultRow]:
    """The dense row, then one per method (finished ones reused), with their latencies."""
    dense, dense_info = dense_model(config, data, console)
    architecture = job.architecture(config, data)
    # the run holds its dense model too: adasap.load(run_dir / "dense"), eval and latency
    extra = {"train": dense_info}
    on_main(lambda: save_model(run_dir / DENSE, dense.cpu(), architecture, extra=extra))
    dense_size = measure_size(dense.cpu(), job.example(config, data))
    evaluated = job.evaluate(dense, data, config, run_dir, DENSE)
    rows = [evaluated.with_cost(dense_size, seconds=dense_info.get("seconds"))]
    for method in config.methods:
        rows.append(pruned_row(method, dense, data, config, run_dir, console))
    input_shape, images = job.timing_inputs(config, data)
    # timed on rank 0 alone: the other ranks would compete for the same cores
    return on_main(lambda: timed_rows(rows, dense, run_dir, input_shape, images))


def pruned_row(
    method: str,
    dense,
    data: Any,
    config: ExperimentConfig,
    run_dir: Path,
    console,
    official: tuple[str, str] | None = None,
) -> ResultRow:
    """Prune with ``method`` and evaluate, or reuse the summary of an earlier finished run.

    The model is saved in ``run_dir/method``, where its checkpoint lets an interrupted method
    continue. The row has no latency: :func:`timed_rows` times all models of a run together.
    """
    job = job_of(config)
    method_dir = run_dir / method
    summary = method_dir / "summary.json"
    if broadcast_value(summary.is_file() and (method_dir / "model.json").is_file()):
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
            task=job.training_task(config, data),
        )
    model = result.model.cpu()
    architecture = job.architecture(config, data)
    on_main(lambda: save_model(method_dir, model, architecture, result.pruning_history))
    size = measure_size(model, job.example(config, data))  # as the dense row's
    row = job.evaluate(model, data, config, run_dir, method, official).with_cost(
        size, seconds=result.seconds, latency=result.latency
    )

    def publish() -> None:
        atomic_write_json(
            summary,
            {**row.to_dict(), "kept": result.kept, "ignored_layers": result.ignored_layers,
             "history": result.history},
        )  # fmt: skip
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
