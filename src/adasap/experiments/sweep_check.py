"""After a sweep has chosen: does its validation score rank the runs as the test corruptions do?

:func:`check_sweep` takes a finished sweep (:mod:`adasap.experiments.sweep`), whose ranking and
choice are already in ``<out>/choice.json``, evaluates every run's saved model on the test set
under the 15 benchmark corruptions (and clean), and writes ``<out>/check/``: one line per run
in ``check.jsonl`` (resumable), each run's corruption report, and ``check.md`` with Spearman rank
correlations over the runs: of the sweep's validation ranking (the order it chose by) with the
test corruption accuracy and with the clean test accuracy, and of each validation number with
its test counterpart. It is computed once, after the fact: the sweep module never imports this
one and never reads ``check/``, so the choice cannot depend on test numbers
(tests/test_sweep_check.py).
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
    rows = {r["run"]: SweepRow.from_dict(r) for r in read_jsonl(out / SWEEP_FILE)}
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


def ranking_correlations(
    ranking: Sequence[str], rows: dict[str, SweepRow], tests: dict[str, dict[str, Any]]
) -> dict[str, float | None]:
    """Spearman rank correlations over the runs of ``ranking`` (the sweep's order, best first):
    of that order with the test corruption and clean accuracies (``ranking_corrupted``,
    ``ranking_clean``; +1: the sweep ranked the runs exactly as the test set does), and of the
    validation corrupted score and clean accuracy with their test counterparts (``corrupted``,
    ``clean``: whether each validation number predicts its test number)."""
    standing = list(range(len(ranking), 0, -1))  # higher is better, as for the accuracies
    corrupted = [tests[run]["test_corruption_accuracy"] for run in ranking]
    clean = [tests[run]["test_clean_accuracy"] for run in ranking]
    return {
        "ranking_corrupted": spearman(standing, corrupted),
        "ranking_clean": spearman(standing, clean),
        "corrupted": spearman([rows[run].corrupted_score for run in ranking], corrupted),
        "clean": spearman([rows[run].val_accuracy for run in ranking], clean),
    }


def _test_ranks(ranking: Sequence[str], accuracy: dict[str, float]) -> dict[str, int]:
    return {run: i for i, run in enumerate(sorted(ranking, key=lambda run: -accuracy[run]), 1)}


def write_check_report(out: Path, choice: dict[str, Any], rows: dict[str, SweepRow]) -> Path:
    """``<out>/check/check.md``: the runs in the sweep's order, their test numbers and ranks,
    and the rank correlations (:func:`ranking_correlations`)."""
    tests = {r["run"]: r for r in read_jsonl(out / CHECK_DIR / CHECK_FILE)}
    ranking = [run for run in choice["ranking"] if run in tests]
    rho = ranking_correlations(ranking, rows, tests)
    corrupted_rank = _test_ranks(
        ranking, {run: tests[run]["test_corruption_accuracy"] for run in ranking}
    )
    clean_rank = _test_ranks(ranking, {run: tests[run]["test_clean_accuracy"] for run in ranking})
    chosen = choice["chosen"]

    def shown(value: float | None) -> str:
        return "undefined (fewer than 3 runs, or no spread)" if value is None else f"{value:+.3f}"

    lines = [
        "# Does the sweep's validation ranking order runs as the test set does?",
        "",
        "Computed once, after the sweep chose (its choice and ranking were already in "
        f"`{CHOICE_FILE}`; nothing here feeds back into them). Test corruption accuracy: the "
        "15 benchmark corruptions x 5 severities on the test images.",
        "",
        f"- runs compared: {len(ranking)} of {len(choice['ranking'])}",
        "- Spearman rank correlation, the sweep's validation ranking vs test corruption "
        f"accuracy: **{shown(rho['ranking_corrupted'])}**",
        "- Spearman rank correlation, the sweep's validation ranking vs clean test accuracy: "
        f"**{shown(rho['ranking_clean'])}**",
        "- Spearman rank correlation, validation corrupted score (cbar + extras) vs test "
        f"corruption accuracy: {shown(rho['corrupted'])}",
        "- Spearman rank correlation, clean validation vs clean test accuracy: "
        f"{shown(rho['clean'])}",
        f"- the sweep's choice: {chosen} (test rank {corrupted_rank.get(chosen, '-')} of "
        f"{len(ranking)} on corruption accuracy, {clean_rank.get(chosen, '-')} on clean)",
        "",
        "| val rank | test corruption rank | test clean rank | run | val corrupted score (%) | "
        "test corruption acc (%) | val clean acc (%) | test clean acc (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(ranking, 1):
        r, t = rows[run], tests[run]
        cells = [str(i), str(corrupted_rank[run]), str(clean_rank[run]), run,
                 format_number("pct", r.corrupted_score),
                 format_number("pct", t["test_corruption_accuracy"]),
                 format_number("pct", r.val_accuracy),
                 format_number("pct", t["test_clean_accuracy"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return atomic_write_text(out / CHECK_DIR / "check.md", "\n".join(lines) + "\n")
