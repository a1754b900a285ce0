"""The sweep's selection: runs within 0.3 clean points of their sgd reference first, by
corrupted score; the report and choice.json that show it; re-ranking a finished folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from adasap.experiments import sweep
from adasap.experiments.results import append_jsonl
from adasap.experiments.sweep import (
    CHOICE_FILE,
    SWEEP_FILE,
    SweepRow,
    rank,
    run_sweep,
    sgd_reference,
    sweep_report,
)
from adasap.experiments.sweep_presets import SWEEP_PRESETS

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results" / "sweeps"


def record(run: str, method: str, clean: float, corrupted: float, **settings) -> dict:
    """A sweep.jsonl line; cbar and extras both at ``corrupted``, so that is its score."""
    return dict(run=run, method=method, settings=settings, val_accuracy=clean,
                val_extra_accuracy=corrupted, val_cbar_accuracy=corrupted, val_images=1000,
                per_corruption={}, params=1000, keep_achieved=0.5, seconds=60.0)  # fmt: skip


def rows(*records: dict) -> list[SweepRow]:
    return [SweepRow.from_dict(r) for r in records]


def order(ranked) -> list[str]:
    return [r.row.run for r in ranked]


def test_a_run_more_robust_but_half_a_point_below_sgd_ranks_after_one_within():
    ranked = rank(rows(
        record("robust", "adasap", clean=0.895, corrupted=0.70),  # 0.5 below sgd
        record("close", "adasap", clean=0.898, corrupted=0.66),  # 0.2 below
        record("sgd", "sgd", clean=0.900, corrupted=0.64),
        record("worse", "sam", clean=0.880, corrupted=0.65),  # 2 below
    ))  # fmt: skip
    assert order(ranked) == ["close", "sgd", "robust", "worse"]
    assert [r.passes for r in ranked] == [True, True, False, False]
    assert ranked[2].clean_gap == pytest.approx(-0.005)
    assert {r.reference.run for r in ranked} == {"sgd"}  # type: ignore[union-attr]


def test_the_bar_is_exactly_0_3_points():
    # 0.897 - 0.9 is -0.0030000000000000027 in floats: exactly 0.3 points still passes
    ranked = rank(rows(
        record("at", "adasap", clean=0.897, corrupted=0.70),
        record("beyond", "adasap", clean=0.896, corrupted=0.80),
        record("sgd", "sgd", clean=0.900, corrupted=0.60),
    ))  # fmt: skip
    assert order(ranked) == ["at", "sgd", "beyond"]


def test_ties_go_to_clean_accuracy_then_to_the_file_order():
    ranked = rank(rows(
        record("first", "adasap", clean=0.899, corrupted=0.70),
        record("cleaner", "adasap", clean=0.905, corrupted=0.70),
        record("second", "sam", clean=0.899, corrupted=0.70),
        record("sgd", "sgd", clean=0.900, corrupted=0.60),
    ))  # fmt: skip
    assert order(ranked) == ["cleaner", "first", "second", "sgd"]


def test_each_run_is_held_to_the_best_sgd_run_pruned_alike():
    sgd = rows(
        record("sgd-m", "sgd", clean=0.88, corrupted=0.6, criterion="magnitude"),
        record("sgd-t", "sgd", clean=0.90, corrupted=0.6, criterion="taylor"),
        record("sgd-t-15", "sgd", clean=0.91, corrupted=0.6, criterion="taylor", epochs=15),
        record("sgd-t-kd", "sgd", clean=0.89, corrupted=0.6, criterion="taylor", distill=0.5),
    )
    ref = {r.run: r for r in sgd}

    def reference(**settings) -> str | None:
        found = sgd_reference(SweepRow.from_dict(record("x", "adasap", 0.9, 0.7, **settings)), sgd)
        return None if found is None else found.run

    assert reference(criterion="magnitude", rho=0.1) == "sgd-m"  # another criterion: its own
    # the recipe keys do not pick the reference: sgd's best recipe at the criterion does
    assert reference(criterion="taylor", rho=0.1) == "sgd-t-15"
    assert reference(criterion="taylor", epochs=5) == "sgd-t-15"
    assert reference(criterion="taylor", distill=0.5) == "sgd-t-15"
    assert reference(criterion="other") == "sgd-t-15"  # none pruned alike: the best sgd run
    assert reference() == "sgd-t-15"
    assert sgd_reference(ref["sgd-t-kd"], sgd) is ref["sgd-t-15"]  # sgd too is held to its best
    assert sgd_reference(ref["sgd-m"], sgd) is ref["sgd-m"]


def test_a_recipe_that_costs_sgd_clean_accuracy_does_not_lower_the_bar():
    # distillation that costs sgd 1.5 points: adasap distilled alike is still 1.5 below plain sgd
    ranked = rank(rows(
        record("sgd", "sgd", clean=0.898, corrupted=0.74),
        record("sgd-kd", "sgd", clean=0.876, corrupted=0.73, distill_weight=0.9),
        record("adasap", "adasap", clean=0.883, corrupted=0.755),
        record("adasap-kd", "adasap", clean=0.876, corrupted=0.75, distill_weight=0.9),
    ))  # fmt: skip
    assert order(ranked) == ["sgd", "adasap", "adasap-kd", "sgd-kd"]
    assert {r.reference.run for r in ranked} == {"sgd"}  # type: ignore[union-attr]
    assert [r.passes for r in ranked] == [True, False, False, False]


def test_a_sweep_without_sgd_ranks_by_corrupted_score_alone(tmp_path):
    records = [record("a", "adasap", clean=0.80, corrupted=0.70),
               record("b", "sam", clean=0.95, corrupted=0.60)]  # fmt: skip
    ranked = rank(rows(*records))
    assert order(ranked) == ["a", "b"]
    assert [(r.reference, r.passes, r.clean_gap) for r in ranked] == [(None, None, None)] * 2
    for r in records:
        append_jsonl(tmp_path / SWEEP_FILE, r)
    table = sweep_report(tmp_path).read_text()
    assert "This sweep has no sgd run: no run is held to the clean constraint." in table
    assert "| 70.00 | 70.00 | 70.00 | 80.00 | - | - |" in table
    assert json.loads((tmp_path / CHOICE_FILE).read_text())["passes"] is None


def test_rows_written_before_still_load_and_rank(tmp_path):
    old = record("old", "adasap", clean=0.90, corrupted=0.70, rho="old")
    del old["val_cbar_accuracy"]  # before the cbar family was scored
    newer = {**record("new", "sgd", clean=0.91, corrupted=0.60), "history": [{"epoch": 1}]}
    for r in (old, newer):
        append_jsonl(tmp_path / SWEEP_FILE, r)
    table = sweep_report(tmp_path).read_text()
    ranked = [line for line in table.splitlines() if line.startswith("| 1 ") or "| 2 " in line]
    # old: 1 point below sgd, so after it although more robust; its score is its extras'
    assert ranked[0].startswith("| 1 | sgd | - | 60.00 | 60.00 | 60.00 | 91.00 | +0.00 | yes |")
    assert ranked[1].startswith("| 2 | adasap | old | 70.00 | - | 70.00 | 90.00 | -1.00 | no |")


def test_report_and_choice_show_both_scores_and_the_constraint(tmp_path):
    for r in (record("adasap-0.1", "adasap", clean=0.898, corrupted=0.66, rho_max=0.1),
              record("adasap-0.5", "adasap", clean=0.890, corrupted=0.72, rho_max=0.5),
              record("sgd", "sgd", clean=0.900, corrupted=0.64)):  # fmt: skip
        append_jsonl(tmp_path / SWEEP_FILE, r)
    table = sweep_report(tmp_path).read_text().splitlines()
    header = next(line for line in table if line.startswith("| rank"))
    assert header == (
        "| rank | method | rho_max | val corrupted score (%) | val cbar acc (%) | "
        "val extra corruption acc (%) | val clean acc (%) | clean vs sgd (points) | "
        "clean within 0.3 of sgd | size kept | train time (min) |"
    )
    assert (
        "| 1 | adasap | 0.1 | 66.00 | 66.00 | 66.00 | 89.80 | -0.20 | yes | 0.500 | 1.0 |" in table
    )
    assert "| 2 | sgd | - | 64.00 | 64.00 | 64.00 | 90.00 | +0.00 | yes | 0.500 | 1.0 |" in table
    assert (
        "| 3 | adasap | 0.5 | 72.00 | 72.00 | 72.00 | 89.00 | -1.00 | no | 0.500 | 1.0 |" in table
    )
    choice = json.loads((tmp_path / CHOICE_FILE).read_text())
    assert choice["chosen"] == "adasap-0.1" and choice["settings"] == {"rho_max": 0.1}
    assert choice["passes"] is True and choice["reference"] == "sgd"
    assert choice["clean_gap"] == pytest.approx(-0.002)
    assert choice["ranking"] == ["adasap-0.1", "sgd", "adasap-0.5"]
    assert choice["best_by_method"] == {"adasap": "adasap-0.1", "sgd": "sgd"}
    assert [(r["run"], r["passes"]) for r in choice["runs"]] == [
        ("adasap-0.1", True), ("sgd", True), ("adasap-0.5", False)
    ]  # fmt: skip
    assert choice["clean_tolerance"] == 0.003 and "0.3 points" in choice["rule"]


# a folder whose sweep is still running (rows committed as they finish) has no choice yet
FINISHED = sorted(p.name for p in COMMITTED.iterdir() if (p / CHOICE_FILE).is_file())


@pytest.mark.parametrize("name", FINISHED)
def test_a_finished_sweep_is_re_ranked_by_rerunning_its_command(name, tmp_path, monkeypatch):
    """`adasap sweep --preset NAME --out FOLDER` on a committed, finished folder runs nothing
    and rewrites its report and choice from sweep.jsonl under the current ranking."""

    def no_runs(*args, **kwargs):
        raise AssertionError("a finished sweep ran a run again")

    monkeypatch.setattr(sweep, "sweep_cell", no_runs)
    out = tmp_path / name
    shutil.copytree(COMMITTED / name, out)
    results = (out / SWEEP_FILE).read_bytes()
    preset = SWEEP_PRESETS[name]
    run_sweep(preset.base, preset.grid, out, console=Console(quiet=True))
    assert (out / SWEEP_FILE).read_bytes() == results
    choice = json.loads((out / CHOICE_FILE).read_text())
    runs = [json.loads(line)["run"] for line in results.splitlines()]
    assert sorted(choice["ranking"]) == sorted(runs) and len(choice["runs"]) == len(runs)
    has_sgd = any(run.startswith("sgd") for run in runs)
    assert (choice["reference"] is not None) == has_sgd
    assert "clean within 0.3 of sgd" in (out / "sweep.md").read_text()
