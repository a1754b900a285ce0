"""The tuning sweep that picks defaults (:data:`adasap.experiments.sweep_presets.SWEEP_PRESETS`).

It scores each setting on the validation split carved from the training data, corrupted with
the held-out ImageNet-C-bar / CIFAR-10-C-bar family (``cbar``) and the 4 extra corruptions, never
on the test set or the 15 benchmark corruptions. Settings are ranked by the mean of the two
family means (:attr:`SweepRow.score`); the ranking and the choice go to ``choice.json``. Each
run's pruned model is kept, so :mod:`adasap.experiments.sweep_check` can evaluate the runs on
the test set afterwards; nothing here reads what it writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from adasap.deploy.serialization import save_model
from adasap.devices import resolve_device
from adasap.errors import UserError
from adasap.experiments.bench_report import format_number
from adasap.experiments.config import ExperimentConfig, from_flat
from adasap.experiments.dense import dense_model, load_data, model_architecture
from adasap.experiments.grid import Grid, Parallel
from adasap.experiments.results import GridFiles, Row, unfinished_failures
from adasap.experiments.sweep_presets import sweep_settings
from adasap.io import atomic_write_json, atomic_write_text, cache_root
from adasap.robustness.corruptions import CBAR_CORRUPTIONS, EXTRA_CORRUPTIONS
from adasap.robustness.evaluation import evaluate_corruptions
from adasap.training.checkpoint import CHECKPOINT_FILE
from adasap.training.pipeline import prune

SWEEP_FILE = "sweep.jsonl"
CHOICE_FILE = "choice.json"


@dataclass
class SweepRow(Row):
    """One finished sweep run, scored on validation data (a line of ``sweep.jsonl``)."""

    run: str
    method: str
    settings: dict[str, Any]
    val_accuracy: float
    val_extra_accuracy: float | None
    val_images: int
    per_corruption: dict[str, float]
    params: int
    keep_achieved: float
    seconds: float
    # None in rows written before the sweep scored the held-out cbar family.
    val_cbar_accuracy: float | None = None

    @property
    def score(self) -> float:
        """What the sweep ranks by: the mean of the cbar and extra accuracies it has."""
        scores = [s for s in (self.val_cbar_accuracy, self.val_extra_accuracy) if s is not None]
        return sum(scores) / len(scores) if scores else 0.0


# a run's row is a line of sweep.jsonl and its sweep_runs/<run>/row.json
SWEEP_FILES = GridFiles(SWEEP_FILE, "sweep_runs", SweepRow, key="run", what="sweep")


@dataclass
class SweepRun:
    """One run of the sweep: a method under one combination of the grid's ``settings``."""

    method: str
    settings: dict[str, Any]  # less ``methods``
    config: ExperimentConfig

    @property
    def id(self) -> str:
        return "-".join([self.method, *(f"{k}={v}" for k, v in self.settings.items())])


def sweep_cell(run: SweepRun, out: Path, console: Console | None = None) -> SweepRow:
    """One run, in this process: prune, then score on the validation split under the cbar and
    extra corruptions only. The row also goes to ``<out>/sweep_runs/<run>/row.json``."""
    console = console or Console(quiet=True)
    config = run.config
    run_dir = SWEEP_FILES.run_dir(out, run.id)
    data = load_data(config)
    dense, _ = dense_model(config, data, console)
    console.print(f"[bold]{run.id}[/bold]: pruning")
    result = prune(
        dense,
        data,
        settings=replace(config.prune, method=run.method),
        checkpoint_dir=run_dir,
        progress=config.progress,
    )
    device = resolve_device(config.prune.device)
    report = evaluate_corruptions(
        result.model.to(device),
        data.val,
        dataset_key=f"{config.dataset}-val{len(data.val)}",
        corruptions=(*CBAR_CORRUPTIONS, *EXTRA_CORRUPTIONS),
        device=device,
        seed=config.prune.seed,
        cache_dir=cache_root(config.cache_dir) / "corruptions",
        progress=config.progress,
    )
    report.save(run_dir)
    model = result.model.cpu()
    save_model(run_dir, model, model_architecture(config, data), result.pruning_history)
    row = SweepRow(
        run=run.id,
        method=run.method,
        settings=run.settings,
        val_accuracy=report.clean_accuracy,
        val_extra_accuracy=report.extra_accuracy,
        val_cbar_accuracy=report.cbar_accuracy,
        val_images=len(data.val),
        per_corruption=report.per_corruption,
        params=result.size.params,
        keep_achieved=result.keep_fraction(config.prune.keep_kind),
        seconds=result.seconds,
    )
    SWEEP_FILES.save(out, row)
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    return row


def run_sweep(
    base_config: ExperimentConfig | Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]],
    out_dir: str | Path,
    *,
    console: Console | None = None,
    parallel: Parallel | None = None,
) -> Path:
    """Prune with every combination of ``grid`` (flat config keys -> values) over the base.

    Each combination runs every method of its config's ``methods``. Scores come from the
    validation split only (clean, the held-out cbar family and the 4 extra corruptions); the
    test set is never read.
    Finished runs are lines of ``<out>/sweep.jsonl`` and are skipped; an interrupted one
    resumes from ``<out>/sweep_runs/<run>/``. With ``parallel``
    (:class:`~adasap.experiments.grid.Parallel`) several runs go at once; runs that share a
    dense model wait for the first to train it. A run that fails with a :class:`UserError` is
    reported, logged to ``failures.jsonl`` and skipped; the next sweep tries it again. Writes
    ``sweep.md`` and returns ``out_dir``.
    """
    console = console or Console()
    parallel = (parallel or Parallel()).validate()
    base = base_config if isinstance(base_config, ExperimentConfig) else from_flat(base_config)
    quiet = not parallel.serial  # progress bars of runs going at once would be garbled
    runs = [
        SweepRun(
            method,
            {k: v for k, v in settings.items() if k != "methods"},
            replace(config, progress=False) if quiet else config,
        )
        for settings in sweep_settings(grid)
        for config in [from_flat(settings, base).validate()]
        for method in config.methods
    ]
    if not runs:
        raise UserError("the sweep grid is empty: give each key at least one value")
    flat = {k: v for k, v in base.to_flat().items() if k != "progress"}
    definition = json.loads(json.dumps({"base": flat, "runs": [r.id for r in runs]}, default=str))
    out, done = SWEEP_FILES.open(out_dir, definition, [run.id for run in runs])
    sweep = Grid(SWEEP_FILES, out, runs, done, parallel, console, base.prune.device)
    todo = sweep.todo()
    with sweep.running(todo):
        sweep.run(sweep_cell, [(run.id, (run, out)) for run in todo], _describe)
    console.print(f"sweep report: {sweep_report(out)}")
    return Path(out_dir)


def _describe(row: SweepRow) -> str:
    return f"validation score {row.score:.2%}, clean {row.val_accuracy:.2%}"


def ranked_rows(out_dir: str | Path) -> list[SweepRow]:
    """The sweep's finished runs, best first: by validation score, then clean validation
    accuracy. Validation numbers only: nothing else is read."""
    out = Path(out_dir)
    rows = SWEEP_FILES.read(out)
    if not rows:
        raise UserError(f"{out / SWEEP_FILE} holds no results: run the sweep first")
    return sorted(rows, key=lambda r: (-r.score, -r.val_accuracy))


def sweep_report(out_dir: str | Path) -> Path:
    """``<out>/sweep.md``, the sweep's runs best validation score (cbar and extras) first, and
    ``<out>/choice.json``: that ranking and the chosen (first) run."""
    out = Path(out_dir)
    rows = ranked_rows(out)
    best = rows[0]
    atomic_write_json(
        out / CHOICE_FILE,
        {"chosen": best.run, "method": best.method, "settings": best.settings,
         "score": best.score, "ranking": [r.run for r in rows]},
    )  # fmt: skip
    keys = list(dict.fromkeys(k for r in rows for k in r.settings))
    header = ["rank", "method", *keys, "val score (%)", "val cbar acc (%)",
              "val extra corruption acc (%)", "val clean acc (%)", "size kept",
              "train time (min)"]  # fmt: skip
    lines = [
        "# Tuning sweep",
        "",
        f"Scored on the validation split ({rows[0].val_images} images carved from the "
        f"training data), corrupted with the {len(CBAR_CORRUPTIONS)} held-out ImageNet-C-bar / "
        f"CIFAR-10-C-bar corruptions ({', '.join(CBAR_CORRUPTIONS)}) and the "
        f"{len(EXTRA_CORRUPTIONS)} extra corruptions ({', '.join(EXTRA_CORRUPTIONS)}) "
        "x 5 severities each. The score, which ranks the runs, is the mean of the cbar and the "
        "extra accuracy; the test set and the 15 benchmark corruptions are never used.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for rank, r in enumerate(rows, 1):
        cells = [str(rank), r.method, *(str(r.settings.get(k, "-")) for k in keys)]
        cells += [
            format_number("pct", r.score),
            "-" if r.val_cbar_accuracy is None else format_number("pct", r.val_cbar_accuracy),
            format_number("pct", r.val_extra_accuracy or 0),
            format_number("pct", r.val_accuracy),
            f"{r.keep_achieved:.3f}",
            format_number("min", r.seconds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    failed = unfinished_failures(out, {r.run for r in rows})
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {f['run']}: {f['error']}" for f in failed]
    return atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
