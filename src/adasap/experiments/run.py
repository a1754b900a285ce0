"""The main job: dense model -> pruned by each method -> scores on clean and corrupted images,
speed -> tables.

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
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from adasap.deploy.serialization import DENSE, save_model
from adasap.devices import resolve_device
from adasap.distributed import broadcast_value, is_main, on_main
from adasap.errors import UserError
from adasap.experiments.config import ExperimentConfig, dump_yaml, from_flat
from adasap.experiments.dense import dense_model, folder_label
from adasap.experiments.job import Job, job_of
from adasap.experiments.reporting import results_markdown, results_tables
from adasap.experiments.results import ResultRow
from adasap.experiments.speed import (
    check_runtimes,
    int8_rows,
    speed_runtime,
    speed_title,
    timed_rows,
)
from adasap.io import (
    RUN_MARKER,
    atomic_write_json,
    atomic_write_text,
    hold_lock,
    read_json_mapping,
    writing,
)
from adasap.method.pruning import measure_size
from adasap.training.checkpoint import CHECKPOINT_FILE, RunInterrupted, TrainingDiverged
from adasap.training.pipeline import prune


def prepare_run_dir(
    out_dir: str, name: str | None, overwrite: bool, held: contextlib.ExitStack, label: str
) -> Path:
    """The run directory ``out_dir/name``, empty but for its marker and locked until ``held``
    closes; or a one-line error, before anything on disk changes, saying what to do instead.

    Without ``name`` the run gets a new directory ``<date>-<time>-<label>`` (``-2``, ``-3``, ...
    when taken), made by an exclusive ``mkdir``: runs started in the same second never share
    one. A named one may exist empty; with ``overwrite`` it may hold an earlier run, deleted
    only if adasap made it (it holds :data:`RUN_MARKER`), it is a directory inside ``out_dir``
    (not a link to one elsewhere) and no other process holds its lock.
    """
    out = Path(out_dir)
    with writing(out / name if name else out, "choose a writable --out directory"):
        out.mkdir(parents=True, exist_ok=True)
        if name is None:
            run_dir = _new_dir(out, time.strftime("%Y%m%d-%H%M%S") + f"-{label}")
        else:
            run_dir = out / name
            _check_replaceable(run_dir, overwrite)  # before the lock: it writes in the folder
            run_dir.mkdir(exist_ok=True)
        held.callback(hold_lock(run_dir / RUN_MARKER, str(run_dir), "pass another --name").release)
        _check_replaceable(run_dir, overwrite)  # again: another process may have written there
        for entry in _contents(run_dir):  # what the checks allowed: an earlier adasap run
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return run_dir


def _new_dir(out: Path, stem: str) -> Path:
    """A directory made now in ``out``: ``stem``, or ``stem-2``, ``stem-3``, ... when taken."""
    run_dir, number = out / stem, 1
    while True:
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            number += 1
            run_dir = out / f"{stem}-{number}"


def _contents(run_dir: Path) -> list[Path]:
    """What ``run_dir`` holds besides its marker and lock."""
    own = (RUN_MARKER, RUN_MARKER + ".lock")
    return [entry for entry in run_dir.iterdir() if entry.name not in own]


def _check_replaceable(run_dir: Path, overwrite: bool) -> None:
    """Raise unless ``run_dir`` is absent (a file there fails its ``mkdir``), empty, or, with
    ``overwrite``, a run directory adasap made, in place (not a link)."""
    if not run_dir.is_dir() or not _contents(run_dir):
        return
    ours = (run_dir / RUN_MARKER).is_file()
    if not overwrite:
        resumable = (run_dir / "config.json").is_file()
        resume = f", --resume {run_dir} to continue it" if resumable else ""
        if ours:
            fix = f"pass --overwrite to replace it{resume}, or another --name"
        else:
            fix = f"pass another --name{resume} (--overwrite replaces only a run adasap made)"
        raise UserError(f"{run_dir} already exists and is not empty: {fix}")
    if run_dir.is_symlink():
        raise UserError(
            f"{run_dir} is a link to {run_dir.resolve()}: --overwrite replaces only a run "
            "directory inside --out; pass another --name"
        )
    if not ours:
        raise UserError(
            f"{run_dir} was not made by adasap (it holds no {RUN_MARKER}), so --overwrite leaves "
            "it alone: move it away yourself, or pass another --name"
        )


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
    check_runtimes(config)
    job = job_of(config)
    data = job.load_data(config)
    if not resume:
        job.check(config, data)
    claimed: list[Path] = []  # the run directory, once it exists
    try:
        rows, int8, run_dir = _run(job, config, data, console, resume, claimed, started)
    except UserError as exc:
        # bad input found late (an image only a loader worker could decode): a new run that
        # finished no method leaves nothing behind; a diverged one keeps its checkpoint
        if claimed and not resume and not isinstance(exc, TrainingDiverged):
            on_main(lambda: _discard_unfinished(claimed[0], config.methods))
        raise
    tables = results_tables(
        rows, title=job.title, scores=job.scores, int8=int8, speed_title=speed_title(config)
    )
    for table in tables:
        console.print(table)
    console.print(f"results: {run_dir / 'results.md'}")
    minutes, rest = divmod(round(time.perf_counter() - started), 60)
    console.print(f"total time: {minutes} min {rest:02d} s (this command, evaluation included)")
    return run_dir


def _run(
    job: Job,
    config: ExperimentConfig,
    data: Any,
    console: Console,
    resume: bool,
    claimed: list[Path],
    started: float,
) -> tuple[list[ResultRow], list[ResultRow], Path]:
    """Claim (or reopen) the run directory, appended to ``claimed``, and hold its lock while
    the rows are made and written; the rows, the INT8 rows and the directory."""
    with contextlib.ExitStack() as held:  # rank 0's lock on the run, until it ends or fails
        claim = resumed_run_dir if resume else new_run_dir
        run_dir = on_main(lambda: claim(config, held))  # rank 0 names the run, tells the others
        claimed.append(run_dir)
        config = replace(config, name=run_dir.name)
        note = job.note(config, data)
        if note is not None:
            console.print(f"[bold yellow]{note}[/bold yellow]")
        try:
            rows = _rows(job, config, data, run_dir, console)
            int8 = int8_rows(job, config, data, rows, run_dir, console) if config.int8 else []
        except (RunInterrupted, KeyboardInterrupt) as exc:
            interrupted = exc if isinstance(exc, RunInterrupted) else RunInterrupted(None)
            interrupted.run_dir = run_dir
            raise interrupted from None
        seconds = time.perf_counter() - started
        config = with_resolved_round_to(config, rows)

        def write_results() -> None:
            record_round_to(run_dir, rows)
            results = {
                "config": config.to_flat(),
                "machine": machine_description(),
                "seconds": seconds,
                "setting": note,
                "runtime": speed_runtime(config),
                "rows": [row.to_dict() for row in rows],
                "int8": [row.to_dict() for row in int8],
            }
            atomic_write_json(run_dir / "results.json", results)
            markdown = results_markdown(
                rows, note, title=job.title, scores=job.scores, int8=int8,
                speed_title=speed_title(config),
            )  # fmt: skip
            atomic_write_text(run_dir / "results.md", markdown)

        on_main(write_results)
    return rows, int8, run_dir


def with_resolved_round_to(config: ExperimentConfig, rows: Sequence[ResultRow]) -> ExperimentConfig:
    """``config`` with ``round_to: auto`` replaced by what the pruner resolved it to (the
    same for every method of a run: it follows the runtime and the model)."""
    resolved = {row.round_to for row in rows} - {None}
    if config.prune.pruner.round_to != "auto" or len(resolved) != 1:
        return config
    pruner = replace(config.prune.pruner, round_to=resolved.pop())
    return replace(config, prune=replace(config.prune, pruner=pruner))


def record_round_to(run_dir: Path, rows: Sequence[ResultRow]) -> None:
    """The run's saved config with ``round_to: auto`` replaced by what it became, so that a
    reader sees it (and a resumed or repeated run prunes alike); otherwise as it was."""
    path = run_dir / "config.json"
    saved = from_flat(read_json_mapping(path, "restore it, or start a new run"), source=str(path))
    resolved = with_resolved_round_to(saved, rows)
    if resolved is not saved:
        write_config(run_dir, resolved)


def write_config(run_dir: Path, config: ExperimentConfig) -> None:
    """The run's own config, as it reproduces (and resumes) the run."""
    atomic_write_json(run_dir / "config.json", config.to_flat())
    atomic_write_text(run_dir / "config.yaml", dump_yaml(config))


def _discard_unfinished(run_dir: Path, methods: Sequence[str]) -> None:
    """Remove a new run's directory unless a method finished there (its summary written)."""
    if not any((run_dir / method / "summary.json").is_file() for method in methods):
        shutil.rmtree(run_dir, ignore_errors=True)


def resumed_run_dir(config: ExperimentConfig, held: contextlib.ExitStack) -> Path:
    """The run directory to continue, locked until ``held`` closes."""
    run_dir = Path(config.out_dir) / str(config.name)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist: there is nothing to resume")
    held.callback(hold_lock(run_dir / RUN_MARKER, str(run_dir), "stop it first").release)
    return run_dir


def new_run_dir(config: ExperimentConfig, held: contextlib.ExitStack) -> Path:
    """The new run directory (:func:`prepare_run_dir`) holding the run's config, locked until
    ``held`` closes; nothing is left behind on failure."""
    label = folder_label(config)
    run_dir = prepare_run_dir(config.out_dir, config.name, config.overwrite, held, label)
    config = replace(config, name=run_dir.name)
    try:
        write_config(run_dir, config)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # just emptied or made, and ours: no trace
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
    runtime = speed_runtime(config)
    # timed on rank 0 alone: the other ranks would compete for the same cores
    return on_main(lambda: timed_rows(rows, dense, run_dir, input_shape, images, runtime))


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
    continue. The row has no speed: :func:`~adasap.experiments.speed.timed_rows` times all
    models of a run together.
    """
    job = job_of(config)
    method_dir = run_dir / method
    summary = method_dir / "summary.json"
    if broadcast_value(summary.is_file() and (method_dir / "model.json").is_file()):
        console.print(f"[bold]{method}[/bold]: finished earlier, reusing {summary}")
        return ResultRow.from_dict(
            read_json_mapping(summary, f"delete {method_dir} to run {method} again")
        )
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
        size, seconds=result.seconds, latency=result.latency, round_to=result.round_to
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
