"""The grid on many processes: cells at once (--jobs, Ray) give the serial grid's results."""

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

import adasap.experiments.bench as bench
import adasap.experiments.dense as experiment
import adasap.experiments.grid as grid
from adasap.cli import main
from adasap.errors import UserError
from adasap.experiments.bench import run_bench
from adasap.experiments.dense import dense_model, load_data
from adasap.experiments.grid import Parallel, fair_threads, run_cells
from adasap.experiments.presets import PRESETS
from adasap.experiments.results import RESULTS_FILE, read_jsonl
from adasap.experiments.sweep import run_sweep
from adasap.training.checkpoint import RunInterrupted

TINY = dict(train_limit=300, corruption_limit=20, dense_epochs=1.0, batch_size=32, progress=False)
# what the clock decides: the rest of a row is the same however the cells run
TIMING = {
    "latency_ms", "latency_p10_ms", "latency_p90_ms", "seconds", "cell_seconds",
    "latency_ratio", "latency_ratio_low", "latency_ratio_high", "latency_noisy",
}  # fmt: skip
TIMING_COLUMNS = {"CPU latency b1 (ms)", "latency / dense", "train time (min)", "train time (s)"}


def tiny_smoke():
    smoke = PRESETS["smoke"].with_base(**TINY)
    return replace(smoke, sharpness_batches=1, hessian_iterations=2, latency_repeats=3)


def quiet():
    return Console(quiet=True)


def without_timing(report: str) -> str:
    """The report with the cells of its timing columns blanked."""
    lines, blank = [], set()
    for line in report.splitlines():
        cells = line.split(" | ")
        if line.startswith("| method"):
            blank = {i for i, c in enumerate(cells) if c.strip("| ") in TIMING_COLUMNS}
        elif not line.startswith("|"):
            blank = set()
        lines.append(" | ".join("t" if i in blank else c for i, c in enumerate(cells)))
    return "\n".join(lines)


def rows_without_timing(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(out / RESULTS_FILE)]


def report(out):
    return without_timing((out / "report" / "report.md").read_text())


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The tiny smoke benchmark run one cell after another (one thread, as the cells below)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADASAP_CACHE", str(tmp_path_factory.mktemp("cache")))
        out = tmp_path_factory.mktemp("serial")
        run_bench(tiny_smoke(), out, console=quiet())
        return out


# --------------------------------------------------------------------------- in one process


def test_parallel_settings_are_checked():
    for jobs in (0, -1, 1.5, True):
        with pytest.raises(UserError, match="jobs must be a whole number"):
            Parallel(jobs=jobs).validate()
    with pytest.raises(UserError, match="Ray address is empty"):
        Parallel(ray=" ").validate()
    assert Parallel().serial and Parallel(jobs=1).serial
    assert not Parallel(jobs=2).serial and not Parallel(ray="auto").serial


def test_threads_are_split_fairly():
    assert fair_threads(4, cores=16) == 4
    assert fair_threads(3, cores=16) == 5
    assert fair_threads(8, cores=2) == 1


def test_bad_flags_fail_in_one_line(capsys, tmp_path):
    assert main(["bench", "--preset", "smoke", "--jobs", "0", "--out", str(tmp_path)]) == 2
    assert "jobs must be a whole number of at least 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_local_workers_take_the_visible_gpus_in_turn_and_ctrl_c_stops_busy_ones(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert grid._visible_gpus() == ["2", "5"]
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    previous, threads, seen = signal.getsignal(signal.SIGINT), torch.get_num_threads(), []
    followed = []
    monkeypatch.setattr(grid, "_follow_parent", followed.append)
    try:
        for _ in range(3):
            grid._start_worker(threads, ["2", "5"], counter, 4242)
            seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
        interrupt = signal.getsignal(signal.SIGINT)
        monkeypatch.setattr(grid, "_interrupted", threading.Event())
        interrupt(signal.SIGINT, None)  # an idle worker: no exception, but no new cell either
        assert grid._interrupted.is_set()
        monkeypatch.setattr(grid, "_busy", True)
        with pytest.raises(KeyboardInterrupt):
            interrupt(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == ["2", "5", "2"] and followed == [4242] * 3


def finished(value=None, error=None):
    future = Future()
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
    return future


def test_outcomes_come_in_grid_order_whatever_order_cells_finish_in():
    tasks = [(name, ()) for name in "abc"]
    futures = [Future(), finished(error=UserError("diverged")), finished(3)]
    outcomes = grid._in_order(tasks, futures, quiet(), str, lambda f: f.cancel())
    futures[0].set_result(1)
    names, values = zip(*outcomes, strict=True)
    assert names == ("a", "b", "c")
    assert values[0] == 1 and isinstance(values[1], UserError) and values[2] == 3


def test_a_bug_in_one_cell_stops_the_grid_after_the_running_cells():
    tasks = [(name, ()) for name in "abc"]
    waiting, running = Future(), Future()
    running.set_running_or_notify_cancel()  # cannot be cancelled: the grid waits for it
    running.set_result(2)
    futures = [finished(error=ValueError("a bug")), running, waiting]
    with pytest.raises(ValueError, match="a bug"):
        list(grid._in_order(tasks, futures, quiet(), str, lambda f: f.cancel()))
    assert waiting.cancelled()


def test_ctrl_c_in_the_parent_stops_the_grid_as_an_interrupted_run():
    class Interrupted(Future):
        def exception(self, timeout=None):  # Ctrl-C arrives while the parent waits
            raise KeyboardInterrupt

    future = Interrupted()
    future.set_result(1)
    with pytest.raises(RunInterrupted):
        list(grid._in_order([("a", ())], [future], quiet(), str, lambda f: f.cancel()))


def test_a_serial_grid_runs_here_and_keeps_user_errors():
    def cell(x, console=None):
        if x == 2:
            raise UserError("diverged")
        return x

    outcomes = list(run_cells(cell, [("1", (1,)), ("2", (2,))], Parallel(), quiet(), str))
    assert outcomes[0] == ("1", 1) and isinstance(outcomes[1][1], UserError)


def test_after_ctrl_c_a_worker_starts_none_of_its_queued_cells(monkeypatch):
    """The pool queues a cell per worker ahead, which the parent cannot cancel: after Ctrl-C
    it must not start, or the parent would wait for it to run to its end."""
    monkeypatch.setattr(grid, "_interrupted", threading.Event())

    def training_cell():
        raise RunInterrupted(None)  # its own handler took Ctrl-C and saved a checkpoint

    with pytest.raises(RunInterrupted):
        grid._in_worker(training_cell, ())
    started = []
    with pytest.raises(KeyboardInterrupt):
        grid._in_worker(started.append, (1,))
    assert started == []


class Exited(Exception):
    pass


def test_a_worker_whose_parent_is_gone_stops_its_cell_and_starts_no_other(monkeypatch):
    events = []

    def deliver(pid, signum):
        events.append(signum)  # as Ctrl-C: a training cell saves its checkpoint and stops

    def exit_process(code):
        events.append(("exit", code))
        raise Exited

    monkeypatch.setattr(grid, "_busy", True)
    monkeypatch.setattr(grid, "_orphaned", threading.Event())
    monkeypatch.setattr(grid, "STOP_GRACE_SECONDS", 0.0)
    monkeypatch.setattr(grid.os, "getppid", lambda: 1)  # adopted by init: the parent died
    monkeypatch.setattr(grid.os, "kill", deliver)
    monkeypatch.setattr(grid.os, "_exit", exit_process)
    with pytest.raises(Exited):
        grid._follow_parent(parent=4242)
    assert events == [signal.SIGINT, ("exit", 1)]
    # a cell still queued does not start
    started = []
    with pytest.raises(Exited):
        grid._in_worker(started.append, (1,))
    assert started == [] and events[-1] == ("exit", 1)


def test_damaged_dense_cache_is_trained_again(tmp_path, monkeypatch):
    config = tiny_smoke().config(PRESETS["smoke"].cells()[0])
    config = replace(config, cache_dir=str(tmp_path))
    data = load_data(config)
    first, _ = dense_model(config, data, quiet())
    (weights,) = (tmp_path / "dense").glob("*/model.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])  # a crash or a full disk cut it short
    trained = []
    original = experiment.train
    monkeypatch.setattr(experiment, "train", lambda *a, **k: trained.append(1) or original(*a, **k))
    console = Console(record=True, width=200)
    again, _ = dense_model(config, data, console)
    assert trained == [1] and "dense cache unusable" in console.export_text()
    # the same recipe trains the same weights
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b.cpu())
    dense_model(config, data, quiet())
    assert trained == [1]


def test_a_resume_without_the_dense_cache_trains_the_dense_model_first(
    serial, tmp_path, monkeypatch
):
    """The output folder on a machine without the dense cache: the finished seed's dense model
    is trained again before any pruned cell, and the pruned rows come out the same."""
    out = tmp_path / "out"
    shutil.copytree(serial, out)
    shutil.rmtree(out / "runs")
    dense_row = (serial / RESULTS_FILE).read_text().splitlines(keepends=True)[0]
    (out / RESULTS_FILE).write_text(dense_row)
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "new-machine"))
    calls = []
    for name in ("refill_dense_cache", "pruned_row"):
        original = getattr(bench, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(bench, name, recorded)
    console = Console(record=True, width=200)
    run_bench(tiny_smoke(), out, console=console)
    assert calls == ["refill_dense_cache", "pruned_row", "pruned_row"]
    assert "dense models missing from the cache: dense-seed0" in console.export_text()
    assert rows_without_timing(out) == rows_without_timing(serial)


def test_a_seed_never_mixes_two_dense_models(serial, tmp_path, monkeypatch):
    """Every row of a seed records the dense model's weights; a dense model trained again
    differently (other hardware) is refused for the seed's remaining cells."""
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    rows = read_jsonl(serial / RESULTS_FILE)
    out = tmp_path / "out"
    shutil.copytree(serial, out)
    shutil.rmtree(out / "runs")
    dense_row = {**rows[0], "dense_sha256": "f" * 64}  # as if from another machine
    (out / RESULTS_FILE).write_text(json.dumps(dense_row) + "\n")
    with pytest.raises(UserError, match="dense model of seed 0 in the cache .* not the one"):
        run_bench(tiny_smoke(), out, console=quiet())
    assert len(read_jsonl(out / RESULTS_FILE)) == 1
    # the model trained again here is the serial run's, which all its rows name
    (description,) = (tmp_path / "cache" / "dense").glob("*/model.json")
    weights = json.loads(description.read_text())["weights_sha256"]
    assert {r["dense_sha256"] for r in rows} == {weights}


# --------------------------------------------------------------------------- many processes


@pytest.mark.slow
def test_jobs_give_the_serial_report(serial, tmp_path, monkeypatch):
    """Two processes (one thread each) on an empty cache: they train the dense model once,
    render the shared corrupted images once, and write the serial run's results."""
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    console = Console(record=True, width=200)
    run_bench(tiny_smoke(), tmp_path / "out", console=console, parallel=Parallel(jobs=2))
    out = tmp_path / "out"
    assert rows_without_timing(out) == rows_without_timing(serial)
    assert report(out) == report(serial)
    assert len(list((tmp_path / "cache" / "dense").glob("*/model.json"))) == 1
    text = console.export_text()
    assert "in 2 processes" in text and re.search(r"adasap-magnitude-keep0.5-seed0: clean", text)
    # every cell left its own row; a rerun finds them all done
    assert (out / "runs" / "sgd-magnitude-keep0.5-seed0" / "row.json").is_file()
    before = (out / RESULTS_FILE).read_text()
    run_bench(tiny_smoke(), out, console=quiet(), parallel=Parallel(jobs=2))
    assert (out / RESULTS_FILE).read_text() == before
    # on another machine (no dense cache) a worker trains the dense model again, the same one
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "new-machine"))
    shutil.rmtree(out / "runs")
    (out / RESULTS_FILE).write_text(before.splitlines(keepends=True)[0])
    console = Console(record=True, width=200)
    run_bench(tiny_smoke(), out, console=console, parallel=Parallel(jobs=2))
    assert rows_without_timing(out) == rows_without_timing(serial)
    assert "dense-seed0: dense model cached" in console.export_text()


def _live_children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` and that have not ended (zombies count as ended)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(parent) == pid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")
def test_workers_end_when_the_grid_process_is_killed(tmp_path):
    """Killed (not interrupted), the parent cannot stop its pool: the workers notice, stop
    their cells and exit instead of running the queued cells for no one."""
    env = {**os.environ, "ADASAP_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "adasap", "bench", "--preset", "smoke", "--jobs", "2"]
    parent = subprocess.Popen(
        [*command, "--out", str(tmp_path / "out")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline:  # the pruned cells' pool
            time.sleep(0.2)
            workers = [pid for pid in _live_children(parent.pid) if _is_worker(pid)]
        assert len(workers) == 2
        time.sleep(1.0)  # into their cells, or still importing: either way they must end
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


@pytest.mark.slow
def test_ray_gives_the_serial_report(serial, tmp_path, local_ray):
    console = Console(record=True, width=200)
    run_bench(tiny_smoke(), tmp_path / "out", console=console, parallel=Parallel(ray="auto"))
    assert rows_without_timing(tmp_path / "out") == rows_without_timing(serial)
    assert report(tmp_path / "out") == report(serial)
    assert "1 CPU per cell" in console.export_text()


@pytest.mark.slow
def test_sweep_with_jobs_gives_the_serial_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    base = {**tiny_smoke().base, "corruption_limit": None, "seed": 0}
    grid = {"methods": [["adasap"]], "rho_max": [0.1, 0.5]}
    run_sweep(base, grid, tmp_path / "serial", console=quiet())
    run_sweep(base, grid, tmp_path / "jobs", console=quiet(), parallel=Parallel(jobs=2))

    def scores(out):
        rows = read_jsonl(out / "sweep.jsonl")
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert scores(tmp_path / "jobs") == scores(tmp_path / "serial")
