"""The after-the-fact check of a sweep: Spearman by hand, and a choice blind to test numbers."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from rich.console import Console

from adasap.errors import UserError
from adasap.experiments import sweep, sweep_check
from adasap.experiments.config import from_flat
from adasap.experiments.presets import PRESETS
from adasap.experiments.results import append_jsonl, read_jsonl
from adasap.experiments.sweep import CHOICE_FILE, SWEEP_FILE, run_sweep, sweep_report
from adasap.experiments.sweep_check import (
    CHECK_DIR,
    CHECK_FILE,
    check_sweep,
    ranking_correlations,
    spearman,
    write_check_report,
)
from adasap.experiments.sweep_presets import SWEEP_PRESETS
from adasap.robustness.corruptions import BENCHMARK_CORRUPTIONS


@pytest.mark.parametrize(
    "x, y, expected",
    [
        ([1, 2, 3, 4, 5], [10, 20, 30, 40, 50], 1.0),  # the same order
        ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], -1.0),  # reversed
        # d = -1, 1, -1, 1, 0: 1 - 6 * 4 / (5 * (25 - 1)) = 0.8
        ([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], 0.8),
        # a tie: ranks 1, 2.5, 2.5, 4 against 1..4, Pearson on ranks = 4.5 / sqrt(4.5 * 5)
        ([0.1, 0.2, 0.2, 0.3], [1, 2, 3, 4], 4.5 / (4.5 * 5) ** 0.5),
        ([1, 2], [1, 2], None),  # too few runs to rank
        ([1, 1, 1], [1, 2, 3], None),  # no spread on one side
    ],
)
def test_spearman_by_hand(x, y, expected):
    found = spearman(x, y)
    assert found == (None if expected is None else pytest.approx(expected, abs=1e-12))


def row(run: str, cbar: float, extra: float, clean: float, method: str = "adasap") -> dict:
    return dict(run=run, method=method, settings={"rho_max": run}, val_accuracy=clean,
                val_extra_accuracy=extra, val_cbar_accuracy=cbar, val_images=100,
                per_corruption={}, params=1000, keep_achieved=0.5, seconds=60.0)  # fmt: skip


def write_test_numbers(out: Path, run: str, clean: float, corrupted: float) -> None:
    record = {"run": run, "test_clean_accuracy": clean, "test_corruption_accuracy": corrupted}
    append_jsonl(out / CHECK_DIR / CHECK_FILE, record)


ROWS = [row("a", 0.70, 0.80, 0.90), row("b", 0.60, 0.70, 0.91), row("c", 0.65, 0.80, 0.80),
        row("d", 0.50, 0.60, 0.85)]  # fmt: skip  # val scores: a .75, c .725, b .65, d .55


def test_the_choice_is_made_before_and_blind_to_the_test_numbers(tmp_path):
    for record in ROWS:
        append_jsonl(tmp_path / SWEEP_FILE, record)
    sweep_report(tmp_path)
    choice = (tmp_path / CHOICE_FILE).read_bytes()
    table = (tmp_path / "sweep.md").read_bytes()
    assert json.loads(choice)["chosen"] == "a"
    assert json.loads(choice)["ranking"] == ["a", "c", "b", "d"]
    for accuracies in ([0.1, 0.2, 0.3, 0.4], [0.9, 0.1, 0.5, 0.3]):  # test numbers, any order
        (tmp_path / CHECK_DIR).mkdir(exist_ok=True)
        (tmp_path / CHECK_DIR / CHECK_FILE).unlink(missing_ok=True)
        for r, acc in zip(ROWS, accuracies, strict=True):
            write_test_numbers(tmp_path, r["run"], acc, acc)
        sweep_report(tmp_path)
        assert (tmp_path / CHOICE_FILE).read_bytes() == choice
        assert (tmp_path / "sweep.md").read_bytes() == table
    # and structurally: the sweep never imports the check nor names its folder
    source = Path(sweep.__file__).read_text()
    imported = {
        node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
    }
    assert "adasap.experiments.sweep_check" not in imported
    assert CHECK_DIR not in {
        n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)
    }


def test_a_folder_that_cannot_be_checked_is_a_one_line_error(tmp_path):
    for record in ROWS:
        append_jsonl(tmp_path / SWEEP_FILE, record)
    with pytest.raises(UserError, match="holds no choice.json"):
        check_sweep(tmp_path, Console(quiet=True))
    sweep_report(tmp_path)
    with pytest.raises(UserError, match="holds no bench.json"):
        check_sweep(tmp_path, Console(quiet=True))
    (tmp_path / "bench.json").write_text(json.dumps({"preset": {"name": "small"}}))
    with pytest.raises(UserError, match="is not a sweep's"):
        check_sweep(tmp_path, Console(quiet=True))
    flat = {k: v for k, v in from_flat(SWEEP_PRESETS["small"].base).to_flat().items()
            if k != "progress"}  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps({"sweep": {"base": flat, "runs": []}}))
    with pytest.raises(UserError, match="holds no saved model.*rerun that sweep into a new"):
        check_sweep(tmp_path, Console(quiet=True))  # a sweep from before models were kept


def test_check_report_ranks_by_test_and_correlates(tmp_path):
    for record in ROWS:
        append_jsonl(tmp_path / SWEEP_FILE, record)
    sweep_report(tmp_path)
    # test corruption accuracies: a .60, c .62, b .50, d .40 -> test order c, a, b, d
    for run, acc in (("a", 0.60), ("b", 0.50), ("c", 0.62), ("d", 0.40)):
        write_test_numbers(tmp_path, run, 0.8, acc)
    choice = json.loads((tmp_path / CHOICE_FILE).read_text())
    rows = {r["run"]: sweep.SweepRow(**r) for r in ROWS}
    text = write_check_report(tmp_path, choice, rows).read_text()
    # no sgd run: the ranking is by corrupted score, so both correlations are the same one:
    # val ranks a1 c2 b3 d4 vs test ranks a2 c1 b3 d4: d = 1, 1, 0, 0 -> 1 - 6 * 2 / 60 = 0.8
    assert "validation ranking vs test corruption accuracy: **+0.800**" in text
    assert "(cbar + extras) vs test corruption accuracy: +0.800" in text
    assert "validation ranking vs clean test accuracy: **undefined" in text  # constant test clean
    assert "clean validation vs clean test accuracy: undefined" in text
    assert "the sweep's choice: a (test rank 2 of 4 on corruption accuracy, 1 on clean)" in text
    assert "| 1 | 2 | 1 | a | 75.00 | 60.00 | 90.00 | 80.00 |" in text


# b, c and sgd are within 0.3 clean points of sgd, a and d are not: the sweep ranks b, c, sgd
# (by corrupted score), then a, d, although a and d have the best corrupted scores.
WITH_SGD = [row("sgd", 0.65, 0.65, 0.900, "sgd"), row("a", 0.80, 0.80, 0.895),
            row("b", 0.70, 0.70, 0.898), row("c", 0.66, 0.66, 0.899),
            row("d", 0.75, 0.75, 0.850)]  # fmt: skip
# test corruption: a .70, d .65, b .62, c .60, sgd .55 (the validation corrupted score's order)
# test clean: sgd .93, c .92, b .91, a .89, d .85 (the clean validation accuracy's order)
TEST = {"sgd": (0.93, 0.55), "a": (0.89, 0.70), "b": (0.91, 0.62), "c": (0.92, 0.60),
        "d": (0.85, 0.65)}  # fmt: skip


def test_check_correlates_the_sweeps_ranking_with_clean_and_corrupted_test_accuracy(tmp_path):
    for record in WITH_SGD:
        append_jsonl(tmp_path / SWEEP_FILE, record)
    sweep_report(tmp_path)
    choice = json.loads((tmp_path / CHOICE_FILE).read_text())
    assert choice["ranking"] == ["b", "c", "sgd", "a", "d"]
    for run, (clean, corrupted) in TEST.items():
        write_test_numbers(tmp_path, run, clean, corrupted)
    rows = {r["run"]: sweep.SweepRow.from_dict(r) for r in WITH_SGD}
    tests = {run: {"test_clean_accuracy": c, "test_corruption_accuracy": k}
             for run, (c, k) in TEST.items()}  # fmt: skip
    rho = ranking_correlations(choice["ranking"], rows, tests)
    # standing b5 c4 sgd3 a2 d1; test corruption ranks b3 c2 sgd1 a5 d4:
    # d = 2, 2, 2, -3, -3 -> 1 - 6 * 30 / (5 * 24) = -0.5
    assert rho["ranking_corrupted"] == pytest.approx(-0.5)
    # test clean ranks b3 c4 sgd5 a2 d1: d = 2, 0, -2, 0, 0 -> 1 - 6 * 8 / 120 = 0.6
    assert rho["ranking_clean"] == pytest.approx(0.6)
    # each validation number orders the runs exactly as its test counterpart
    assert rho["corrupted"] == pytest.approx(1.0) and rho["clean"] == pytest.approx(1.0)
    text = write_check_report(tmp_path, choice, rows).read_text()
    assert "validation ranking vs test corruption accuracy: **-0.500**" in text
    assert "validation ranking vs clean test accuracy: **+0.600**" in text
    assert "the sweep's choice: b (test rank 3 of 5 on corruption accuracy, 3 on clean)" in text
    assert "| 1 | 3 | 3 | b | 70.00 | 62.00 | 89.80 | 91.00 |" in text


def test_check_evaluates_saved_models_on_the_test_corruptions(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    base = {**PRESETS["smoke"].base, "train_limit": 300, "corruption_limit": 20,
            "dense_epochs": 1.0, "batch_size": 32, "progress": False}  # fmt: skip
    grid = {"methods": [["sgd", "adasap"]], "finetune_sharpness": ["asam"],
            "finetune_rho": [0.5]}  # fmt: skip
    out = tmp_path / "sweep"
    run_sweep(base, grid, out, console=Console(quiet=True))
    choice = (out / CHOICE_FILE).read_bytes()
    evaluated = []
    original = sweep_check.evaluate_model

    def recording(model, data, config, out_dir, label, official=None):
        evaluated.append((label, config.corruptions, len(data.test)))
        return original(model, data, config, out_dir, label, official)

    monkeypatch.setattr(sweep_check, "evaluate_model", recording)
    report = check_sweep(out, Console(quiet=True))
    runs = json.loads(choice)["ranking"]
    assert sorted(runs) == ["adasap-finetune_sharpness=asam-finetune_rho=0.5",
                            "sgd-finetune_sharpness=asam-finetune_rho=0.5"]  # fmt: skip
    assert [e[0] for e in evaluated] == runs and all(e[1] == "all" for e in evaluated)
    checked = read_jsonl(out / CHECK_DIR / CHECK_FILE)
    assert [c["run"] for c in checked] == runs
    for run in runs:  # the 15 benchmark corruptions on the test images, per run
        per = json.loads((out / CHECK_DIR / run / "corruptions.json").read_text())
        assert set(BENCHMARK_CORRUPTIONS) <= set(per["per_corruption"])
    assert "undefined" in report.read_text()  # two runs: too few to rank
    assert (out / CHOICE_FILE).read_bytes() == choice  # the check changed no choice
    evaluated.clear()
    check_sweep(out, Console(quiet=True))  # resumable: nothing evaluated twice
    assert evaluated == []
