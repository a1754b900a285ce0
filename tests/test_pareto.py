"""`adasap pareto`: each method's Pareto front of clean vs corrupted validation accuracy over
the settings of sweeps that share a base (issue #30)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adasap.cli.app import main
from adasap.experiments.pareto import pareto_front, sweep_points, write_pareto
from adasap.experiments.results import PRESET_FILE, append_jsonl
from adasap.experiments.sweep import SWEEP_FILE, SweepRow
from test_sweep_ranking import record


def sweep_folder(path: Path, base: dict, *records: dict) -> Path:
    path.mkdir(parents=True)
    (path / PRESET_FILE).write_text(json.dumps({"sweep": {"base": base, "runs": []}}))
    for r in records:
        append_jsonl(path / SWEEP_FILE, r)
    return path


def test_the_front_holds_the_settings_no_other_beats_on_both_axes():
    rows = [SweepRow.from_dict(r) for r in (
        record("a", "adasap", clean=0.88, corrupted=0.75),
        record("b", "adasap", clean=0.89, corrupted=0.74),
        record("beaten", "adasap", clean=0.87, corrupted=0.74),  # a beats it on both
        record("tie-clean", "adasap", clean=0.88, corrupted=0.73),  # a: as clean, more robust
        record("c", "adasap", clean=0.90, corrupted=0.70),
    )]  # fmt: skip
    assert [r.run for r in pareto_front(rows)] == ["a", "b", "c"]
    assert [r.run for r in pareto_front(rows[:1] * 2)] == ["a", "a"]  # equal points both stay


def test_sweeps_of_one_base_merge_and_their_shared_sgd_run_counts_once(tmp_path):
    base = {"criterion": "taylor", "methods": ["sgd"]}
    one = sweep_folder(tmp_path / "one", base, record("sgd", "sgd", 0.90, 0.70),
                       record("adasap-1", "adasap", 0.88, 0.75, rho=1))  # fmt: skip
    two = sweep_folder(tmp_path / "two", {**base, "methods": ["adasap"]},
                       record("sgd", "sgd", 0.90, 0.70),
                       record("sgd-taylor", "sgd", 0.90, 0.70, criterion="taylor"),  # the same
                       record("adasap-2", "adasap", 0.89, 0.74, rho=2))  # fmt: skip
    points = sweep_points([one, two])
    assert {m: [r.run for r in rows] for m, rows in points.items()} == {
        "sgd": ["sgd"], "adasap": ["adasap-1", "adasap-2"]
    }  # fmt: skip
    png, table = write_pareto([one, two], tmp_path / "out" / "pareto.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    text = table.read_text()
    assert "The clean bar (best sgd minus 0.3 points) is 89.70%." in text
    assert "| adasap | adasap-1 | 88.00 | 75.00 |" in text
    assert "| adasap | adasap-2 | 89.00 | 74.00 |" in text


@pytest.mark.parametrize("case", ["other base", "not a sweep", "empty"])
def test_folders_that_do_not_compare_get_one_line(case, tmp_path, capsys):
    one = sweep_folder(tmp_path / "one", {"criterion": "taylor"}, record("s", "sgd", 0.9, 0.7))
    folders = {
        "other base": [one, sweep_folder(tmp_path / "two", {"criterion": "magnitude"})],
        "not a sweep": [one, tmp_path],
        "empty": [sweep_folder(tmp_path / "three", {"criterion": "taylor"})],
    }[case]
    out = tmp_path / "p.png"
    assert main(["pareto", *map(str, folders), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert {"other base": "another base", "not a sweep": "not a sweep folder",
            "empty": "no finished runs"}[case] in err  # fmt: skip
    assert not out.exists()
