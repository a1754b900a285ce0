"""After a sweep has chosen: does its validation score rank the runs as the test corruptions do?

:func:`check_sweep` takes a finished sweep (:mod:`adasap.experiments.sweep`), whose ranking and
choice are already in ``<out>/choice.json``, evaluates every run's saved model on the test set
under the 15 benchmark corruptions (and clean), and writes ``<out>/check/``: one line per run
in ``check.jsonl`` (resumable), each run's corruption report, and ``check.md`` with the Spearman
rank correlation between the validation score (cbar + extras) and the test corruption accuracy
over the runs. It is computed once, after the fact: the sweep module never imports this one and
never reads ``check/``, so the choice cannot depend on test numbers (tests/test_sweep_check.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from scipy import stats

from adasap.deploy.serialization import load_model
from adasap.errors import UserError
from adasap.experiments.bench_report import format_number
from adasap.experiments.config import ExperimentConfig, from_flat
from adasap.experiments.dense import load_data
from adasap.experiments.results import PRESET_FILE, append_jsonl, read_jsonl
from adasap.experiments.run import evaluate_model
from adasap.experiments.sweep import CHOICE_FILE, SWEEP_FILE, SweepRow
from adasap.io import atomic_write_text, read_json_mapping

CHECK_DIR = "check"
CHECK_FILE = "check.jsonl"


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get their average rank); None with fewer than 3 pairs
    or when either side is constant (no ranking to compare)."""
    if len(x) != len(y):
        raise ValueError(f"need pairs, got {len(x)} and {len(y)} values")
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rho = float(stats.spearmanr(x, y).statistic)
    return None if math.isnan(rho) else rho


def _run_config(base: ExperimentConfig, row: SweepRow) -> ExperimentConfig:
    """The run's config as the sweep built it, made to evaluate all 19 corruptions quietly."""
    config = from_flat({**row.settings, "methods": [row.method]}, base).validate()
    return replace(config, corruptions="all", progress=False)


def check_sweep(out_dir: str | Path, console: Console | None = None) -> Path:
    """Evaluate a finished sweep's runs on the test set and write ``<out>/check/check.md``.

    Needs the sweep's ``choice.json`` (written when it ranked its runs) and the models it saved.
    Runs already in ``check/check.jsonl`` are not evaluated again.
    """
    out = Path(out_dir)
    console = console or Console()
    for name in (CHOICE_FILE, PRESET_FILE):
        if not (out / name).is_file():
            raise UserError(
                f"{out} holds no {name}: check a folder that `adasap sweep` wrote and ranked"
            )
    choice = read_json_mapping(out / CHOICE_FILE, "rerun adasap sweep --report-only")
    definition = read_json_mapping(out / PRESET_FILE, "restore it from the sweep").get("sweep")
    if not isinstance(definition, dict) or not isinstance(definition.get("base"), dict):
        raise UserError(f"{out / PRESET_FILE} is not a sweep's: check a sweep folder")
    base = from_flat(definition["base"])
    rows = {r["run"]: SweepRow(**r) for r in read_jsonl(out / SWEEP_FILE)}
    check = out / CHECK_DIR
    done = {r["run"] for r in read_jsonl(check / CHECK_FILE)}
    data_cache: dict[tuple, Any] = {}
    for run_id in choice["ranking"]:
        if run_id in done:
            continue
        run_dir = out / "sweep_runs" / run_id
        if not (run_dir / "model.json").is_file():
            raise UserError(
                f"{run_dir} holds no saved model (the sweep predates saved models): rerun "
                "that sweep into a new --out"
            )
        config = _run_config(base, rows[run_id])
        key = (config.dataset, config.data_dir, config.train_limit, config.test_limit,
               config.prune.seed)  # fmt: skip
        if key not in data_cache:
            data_cache[key] = load_data(config)
        data = data_cache[key]
        console.print(f"[bold]{run_id}[/bold]: evaluating on the test set")
        result = evaluate_model(load_model(run_dir), data, config, check, run_id)
        append_jsonl(
            check / CHECK_FILE,
            {"run": run_id, "test_clean_accuracy": result.clean_accuracy,
             "test_corruption_accuracy": result.corruption_accuracy},
        )  # fmt: skip
    return write_check_report(out, choice, rows)


def write_check_report(out: Path, choice: dict[str, Any], rows: dict[str, SweepRow]) -> Path:
    """``<out>/check/check.md``: the runs in the sweep's order, their test numbers, and the
    rank correlations."""
    tests = {r["run"]: r for r in read_jsonl(out / CHECK_DIR / CHECK_FILE)}
    ranking = [run for run in choice["ranking"] if run in tests]
    scores = [rows[run].score for run in ranking]
    corrupted = [tests[run]["test_corruption_accuracy"] for run in ranking]
    rho = spearman(scores, corrupted)
    rho_clean = spearman(
        [rows[run].val_accuracy for run in ranking],
        [tests[run]["test_clean_accuracy"] for run in ranking],
    )
    by_test = sorted(ranking, key=lambda run: -tests[run]["test_corruption_accuracy"])
    test_rank = {run: i for i, run in enumerate(by_test, 1)}

    def shown(value: float | None) -> str:
        return "undefined (fewer than 3 runs, or no spread)" if value is None else f"{value:+.3f}"

    lines = [
        "# Does the sweep's validation score rank runs as the test corruptions do?",
        "",
        "Computed once, after the sweep chose (its choice and ranking were already in "
        f"`{CHOICE_FILE}`; nothing here feeds back into them). Test corruption accuracy: the "
        "15 benchmark corruptions x 5 severities on the test images.",
        "",
        f"- runs compared: {len(ranking)} of {len(choice['ranking'])}",
        f"- Spearman rank correlation, validation score (cbar + extras) vs test corruption "
        f"accuracy: **{shown(rho)}**",
        f"- Spearman rank correlation, clean validation vs clean test accuracy: {shown(rho_clean)}",
        f"- the sweep's choice: {choice['chosen']} (test rank "
        f"{test_rank.get(choice['chosen'], '-')} of {len(ranking)})",
        "",
        "| val rank | test rank | run | val score (%) | test corruption acc (%) | "
        "val clean acc (%) | test clean acc (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(ranking, 1):
        r, t = rows[run], tests[run]
        cells = [str(i), str(test_rank[run]), run, format_number("pct", r.score),
                 format_number("pct", t["test_corruption_accuracy"]),
                 format_number("pct", r.val_accuracy),
                 format_number("pct", t["test_clean_accuracy"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return atomic_write_text(out / CHECK_DIR / "check.md", "\n".join(lines) + "\n")
