"""``adasap bench --task detection`` on many processes (--jobs, Ray): the serial run's rows."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from rich.console import Console

from adasap import cli
from adasap.experiments import detection_bench
from adasap.experiments.detection_bench import DETECTION_PRESETS, run_detection_bench
from adasap.experiments.grid import Parallel
from adasap.experiments.results import read_jsonl
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


def test_report_only_rewrites_the_report_without_running(serial, smoke, monkeypatch):
    monkeypatch.setattr(detection_bench, "detection_cell", None)  # any cell run would fail
    monkeypatch.setattr(detection_bench, "dense_cell", None)
    report = serial / detection_bench.REPORT_FILE
    report.unlink()
    run_detection_bench(smoke, serial, Console(quiet=True), report_only=True)
    assert "| adasap | 0.5 |" in report.read_text()


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
