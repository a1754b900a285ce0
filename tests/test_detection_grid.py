"""``adasap bench --task detection`` on many processes (--jobs, Ray): the serial run's rows."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from dataclasses import replace

import pytest
from rich.console import Console
from scipy import stats

from adasap import cli
from adasap.experiments import detection_bench
from adasap.experiments.detection_bench import (
    DETECTION_PRESETS,
    run_detection_bench,
    write_detection_report,
)
from adasap.experiments.grid import Parallel
from adasap.experiments.results import BenchRow, append_jsonl, read_jsonl
from test_data import write_fashion

TIMING = {"seconds", "cell_seconds"}  # what the clock decides


def rows_without_timing(out) -> list[dict]:
    rows = read_jsonl(out / detection_bench.RESULTS_FILE)
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def report_without_date(out) -> str:
    return "\n".join(
        line.split("report written")[0]
        for line in (out / detection_bench.REPORT_FILE).read_text().splitlines()
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset on a small fake Fashion-MNIST folder."""
    fashion = write_fashion(tmp_path_factory.mktemp("fashion"), 60, 30)
    preset = DETECTION_PRESETS["smoke"]
    return replace(preset, base={**preset.base, "data_dir": str(fashion)})


@pytest.fixture(scope="module")
def serial(smoke, tmp_path_factory):
    """The smoke grid one cell after another (one thread, as each of two processes has)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADASAP_CACHE", str(tmp_path_factory.mktemp("cache")))
        out = tmp_path_factory.mktemp("serial")
        run_detection_bench(smoke, out, Console(quiet=True))
        return out


def test_serial_rows_follow_the_grid_and_record_their_threads(serial):
    rows = read_jsonl(serial / detection_bench.RESULTS_FILE)
    assert [r["cell"] for r in rows] == [
        "sgd-keep0.5-seed0", "adasap-keep0.5-seed0", "sgd-keep0.5-seed1", "adasap-keep0.5-seed1",
    ]  # fmt: skip
    assert {r["threads"] for r in rows} == {1}
    assert "torch threads per cell: 1;" in (serial / detection_bench.REPORT_FILE).read_text()
    for row in rows:  # each cell's own copy of its row, beside its model
        saved = serial / "runs" / row["cell"]
        assert json.loads((saved / "row.json").read_text()) == row
        assert (saved / row["method"] / "model.json").is_file()


def test_report_only_rewrites_the_report_without_running(serial, smoke, monkeypatch):
    monkeypatch.setattr(detection_bench, "detection_cell", None)  # any cell run would fail
    monkeypatch.setattr(detection_bench, "refill_dense_cache", None)
    report = serial / detection_bench.REPORT_FILE
    report.unlink()
    run_detection_bench(smoke, serial, Console(quiet=True), report_only=True)
    assert "| adasap | magnitude | 0.5 | 2 |" in report.read_text()


def test_a_finished_cell_whose_row_missed_the_results_file_is_not_run_again(
    serial, smoke, tmp_path, monkeypatch
):
    """The grid stopped after a cell wrote its row.json but before its line reached
    results.jsonl: the rerun takes the row from there; without row.json the cell runs again."""
    out = tmp_path / "out"
    shutil.copytree(serial, out)
    lines = (out / detection_bench.RESULTS_FILE).read_text().splitlines(keepends=True)
    (out / detection_bench.RESULTS_FILE).write_text("".join(lines[:-1]))
    ran = []

    def dense_cell(preset, reference, console=None):
        ran.append(reference.id)

    def detection_cell(preset, cell, out, console=None):  # the serial run's row, at once
        ran.append(cell.id)
        return BenchRow.from_dict(json.loads((serial / "runs" / cell.id / "row.json").read_text()))

    monkeypatch.setattr(detection_bench, "refill_dense_cache", dense_cell)
    monkeypatch.setattr(detection_bench, "detection_cell", detection_cell)
    run_detection_bench(smoke, out, Console(quiet=True))
    assert ran == []
    assert read_jsonl(out / detection_bench.RESULTS_FILE) == read_jsonl(serial / "results.jsonl")
    (out / detection_bench.RESULTS_FILE).write_text("".join(lines[:-1]))
    (out / "runs" / "adasap-keep0.5-seed1" / "row.json").unlink()
    run_detection_bench(smoke, out, Console(quiet=True))
    assert ran == ["dense-seed1", "adasap-keep0.5-seed1"]
    assert read_jsonl(out / detection_bench.RESULTS_FILE) == read_jsonl(serial / "results.jsonl")


def detection_row(method: str, seed: int, p: float, mpc: float) -> BenchRow:
    return BenchRow(
        cell=f"{method}-keep0.5-seed{seed}", method=method, criterion="magnitude", keep=0.5,
        seed=seed, clean_accuracy=p, corruption_accuracy=mpc, relative_robustness=mpc / p,
        params=300_000, threads=1,
    )  # fmt: skip


def test_report_gives_the_paired_t_intervals_of_the_differences_from_sgd(tmp_path):
    made_up = {  # seed: (sgd P, sgd mPC), (adasap P, adasap mPC)
        0: ((0.50, 0.30), (0.52, 0.33)),
        1: ((0.48, 0.29), (0.47, 0.31)),
        2: ((0.51, 0.28), (0.55, 0.32)),
    }
    for seed, pairs in made_up.items():
        for method, (p, mpc) in zip(("sgd", "adasap"), pairs, strict=True):
            append_jsonl(tmp_path / "results.jsonl", detection_row(method, seed, p, mpc).to_dict())
    report = write_detection_report(tmp_path, DETECTION_PRESETS["smoke"]).read_text()
    expected = []
    for column in (0, 1):  # P, then mPC: per seed adasap minus sgd, in points
        deltas = [100 * (a[column] - s[column]) for s, a in made_up.values()]
        mean, sd = statistics.fmean(deltas), statistics.stdev(deltas)
        half = stats.t.ppf(0.975, len(deltas) - 1) * sd / math.sqrt(len(deltas))
        expected += [f"{mean:.2f} ± {sd:.2f}", f"[{mean - half:.2f}, {mean + half:.2f}]"]
        expected.append("**yes**" if mean - half > 0 or mean + half < 0 else "no")
    # P: +2, -1, +4 points, not resolved; mPC: +3, +2, +4, resolved (the interval excludes 0)
    assert expected[2] == "no" and expected[5] == "**yes**"
    section = report.split("## Differences vs sgd")[1]
    assert "| P delta (pts) | 95% interval | resolved | mPC delta (pts) |" in section
    (line,) = [x for x in section.splitlines() if x.startswith("| adasap |")]
    assert line == "| adasap | magnitude | 0.5 | 3 | " + " | ".join(expected) + " |"
    # the means over the seeds: sgd's P 49.67 ± 1.53, its rPC the mean of the seeds' mPC / P
    assert "| sgd | magnitude | 0.5 | 3 | 0.300M ± 0.000M | 49.67 ± 1.53 | 29.00 ± 1.00 |" in report


def test_cli_passes_jobs_and_checks_them(capsys):
    args = ["bench", "--task", "detection", "--preset", "smoke", "--jobs", "0"]
    assert cli.main(args) == 2
    assert "jobs must be a whole number of at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_jobs_give_the_serial_rows(serial, smoke, tmp_path, monkeypatch):
    """Two processes on an empty cache: each seed's dense detector trained once, the serial
    run's rows in the serial order, the same report."""
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    console = Console(record=True, width=200)
    out = tmp_path / "out"
    run_detection_bench(smoke, out, console, Parallel(jobs=2))
    assert rows_without_timing(out) == rows_without_timing(serial)
    assert report_without_date(out) == report_without_date(serial)
    assert len(list((tmp_path / "cache" / "dense").glob("*/model.json"))) == 2  # 2 seeds
    text = console.export_text()
    assert "2 cells in 2 processes of 1 thread" in text  # the dense phase
    assert "adasap-keep0.5-seed1: P " in text
    before = (out / detection_bench.RESULTS_FILE).read_text()  # a rerun finds all done
    run_detection_bench(smoke, out, Console(quiet=True), Parallel(jobs=2))
    assert (out / detection_bench.RESULTS_FILE).read_text() == before


@pytest.mark.slow
def test_ray_gives_the_serial_rows(serial, smoke, tmp_path, local_ray):
    console = Console(record=True, width=200)
    run_detection_bench(smoke, tmp_path / "out", console, Parallel(ray="auto"))
    assert rows_without_timing(tmp_path / "out") == rows_without_timing(serial)
    assert "1 CPU per cell" in console.export_text()
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").open()]
    assert {r["threads"] for r in rows} == {1}
