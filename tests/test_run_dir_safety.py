"""Run directories and data safety: ``--overwrite`` deletes only a run adasap made inside
``--out``, a run's name is one folder name, runs started at once never share a directory, a
run in use is locked against a second ``--resume`` or ``--overwrite``, and export never
writes over the files it reads.

Every command-line case stops before training (a check or the lock fails first, or the dense
model is replaced by an error), so the file stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import adasap.experiments.run as run_module
from adasap.deploy.onnx import export_onnx
from adasap.deploy.serialization import save_model
from adasap.errors import UserError
from adasap.experiments.config import ExperimentConfig
from adasap.experiments.run import prepare_run_dir
from adasap.io import RUN_MARKER, hold_lock
from adasap.models.builders import build_model
from test_bad_input import SYNTHETIC, TINY, cli_fails, snapshot

NOW = "20260101-120000"  # the clock, frozen: every run starts in the same second


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ADASAP_DATA", raising=False)
    return tmp_path


def someones_files(folder: Path) -> Path:
    """A folder of files that adasap did not make."""
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "data").mkdir()
    (folder / "data" / "measurements.csv").write_text("1,2,3\n")
    return folder


def adasap_run(out: Path, name: str) -> Path:
    """A run directory made by adasap (marker and lock, released), with an earlier result."""
    with contextlib.ExitStack() as held:
        run_dir = prepare_run_dir(str(out), name, False, held, "label")
    (run_dir / "results.md").write_text("earlier results")
    (run_dir / "sgd").mkdir()
    (run_dir / "sgd" / "summary.json").write_text("{}")
    return run_dir


def tree(root: Path) -> dict:
    """``snapshot`` less the cache, which a command may fill before it fails."""
    return {k: v for k, v in snapshot(root).items() if not k.startswith("cache")}


# --------------------------------------------------------------------------- --overwrite


def test_overwrite_leaves_a_folder_adasap_did_not_make(isolated, capsys):
    out = isolated / "runs"
    victim = someones_files(out / "victim")
    before = tree(isolated)
    cli_fails(capsys, ["run", *TINY, "--out", str(out), "--name", "victim", "--overwrite"],
              f"{victim} was not made by adasap", RUN_MARKER, "another --name")  # fmt: skip
    assert tree(isolated) == before


def test_without_overwrite_a_foreign_folder_is_not_offered_for_overwriting(isolated, capsys):
    out = isolated / "runs"
    someones_files(out / "victim")
    before = tree(isolated)
    line = cli_fails(capsys, ["run", *TINY, "--out", str(out), "--name", "victim"],
                     "already exists and is not empty", "pass another --name")  # fmt: skip
    assert "pass --overwrite" not in line
    assert tree(isolated) == before


@pytest.mark.parametrize("name", [".", "..", "", "../elsewhere", "sub/victim", "ABSOLUTE"])
@pytest.mark.parametrize("command", ["run", "train"])
def test_a_name_that_is_not_one_folder_is_refused(isolated, capsys, command, name):
    out = isolated / "runs"
    # an absolute path inside this test's folder: a bug must not reach the machine's files
    name = str(isolated / "elsewhere") if name == "ABSOLUTE" else name
    adasap_run(out, "earlier")
    someones_files(out / "sub" / "victim")
    someones_files(isolated / "elsewhere")
    before = tree(isolated)
    flags = TINY if command == "run" else ["--dataset", "synthetic", "--no-progress"]
    cli_fails(capsys, [command, *flags, "--out", str(out), "--name", name, "--overwrite"],
              f"name {name!r} is not one plain folder name", "--name my-run")  # fmt: skip
    assert tree(isolated) == before


def test_a_yaml_name_cannot_reach_outside_out(isolated, capsys):
    elsewhere = someones_files(isolated / "elsewhere")
    config = isolated / "job.yaml"
    config.write_text("dataset: synthetic\nname: ../elsewhere\noverwrite: true\n")
    before = tree(isolated)
    cli_fails(capsys, ["run", str(config), *TINY, "--out", str(isolated / "runs")],
              "name '../elsewhere' is not one plain folder name")  # fmt: skip
    assert tree(isolated) == before
    assert (elsewhere / "thesis.tex").read_text() == "years of work"


def test_the_config_refuses_such_a_name():
    with pytest.raises(UserError, match=r"name '\.\.' is not one plain folder name"):
        ExperimentConfig(name="..").validate()


def test_overwrite_replaces_a_run_adasap_made(isolated):
    run_dir = adasap_run(isolated / "runs", "old")
    with contextlib.ExitStack() as held:
        assert prepare_run_dir(str(isolated / "runs"), "old", True, held, "label") == run_dir
        assert sorted(p.name for p in run_dir.iterdir()) == [RUN_MARKER, RUN_MARKER + ".lock"]
        assert json.loads((run_dir / RUN_MARKER).read_text())["pid"] == os.getpid()


def test_overwrite_does_not_follow_a_link_out_of_out(isolated):
    target = adasap_run(isolated / "elsewhere", "run")
    (isolated / "runs").mkdir()
    (isolated / "runs" / "link").symlink_to(target)
    before = tree(isolated)
    with contextlib.ExitStack() as held, pytest.raises(UserError, match=r"is a link to"):
        prepare_run_dir(str(isolated / "runs"), "link", True, held, "label")
    assert tree(isolated) == before


# --------------------------------------------------------------------------- naming


def stop_before_training(monkeypatch) -> list[str]:
    """The run fails where it would start training, after its directory is made; the names
    of the runs stopped so."""
    stopped: list[str] = []

    def stop(config, *args, **kwargs):
        stopped.append(config.name)
        raise UserError("stopped before training")

    monkeypatch.setattr(run_module, "dense_model", stop)
    return stopped


def test_runs_started_in_the_same_second_get_their_own_directories(isolated, capsys,
                                                                   monkeypatch):  # fmt: skip
    monkeypatch.setattr(time, "strftime", lambda *args: NOW)
    stopped = stop_before_training(monkeypatch)
    out = isolated / "runs"
    first = out / f"{NOW}-synthetic-resnet20"  # another run, started this second, in progress
    first.mkdir(parents=True)
    (first / RUN_MARKER).write_text("")
    (first / "results.md").write_text("the first run's")
    with contextlib.ExitStack() as held:
        held.callback(hold_lock(first / RUN_MARKER, "the first run", "wait").release)
        cli_fails(capsys, ["run", *TINY, "--out", str(out)], "stopped before training")
    second = out / f"{NOW}-synthetic-resnet20-2"
    assert stopped == [second.name]
    assert (first / "results.md").read_text() == "the first run's"
    # the failed run finished no method: it took its directory away again
    assert not second.exists()


def test_runs_named_at_the_same_moment_never_share_a_directory(isolated, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda *args: NOW)
    start = threading.Barrier(6)
    made: list[Path] = []
    with contextlib.ExitStack() as held:

        def claim() -> None:
            start.wait()
            made.append(prepare_run_dir(str(isolated / "runs"), None, False, held, "x"))

        threads = [threading.Thread(target=claim) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(p.name for p in made) == [f"{NOW}-x"] + [f"{NOW}-x-{n}" for n in range(2, 7)]


# --------------------------------------------------------------------------- the lock


def resumable_run(out: Path) -> Path:
    """A run directory that ``--resume`` accepts (tiny synthetic settings)."""
    run_dir = adasap_run(out, "run")
    config = ExperimentConfig(dataset="synthetic", train_limit=200, test_limit=50,
                              corruptions="none", progress=False,
                              out_dir=str(out), name="run")  # fmt: skip
    (run_dir / "config.json").write_text(json.dumps(config.to_flat()))
    return run_dir


def test_a_second_resume_of_a_run_in_use_is_refused(isolated, capsys):
    run_dir = resumable_run(isolated / "runs")
    hold = ("import sys, time; from adasap.io import hold_lock; "
            "lock = hold_lock(sys.argv[1], 'run', 'wait'); print('held', flush=True); "
            "time.sleep(120)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir / RUN_MARKER)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(isolated)
        cli_fails(capsys, ["run", "--resume", str(run_dir)],
                  f"{run_dir} is in use by another adasap process (pid {holder.pid})",
                  "wait for it")  # fmt: skip
        assert tree(isolated) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the operating system drops its lock
        holder.wait()
    hold_lock(run_dir / RUN_MARKER, "the run", "wait").release()  # not blocked forever


def test_overwrite_of_a_run_in_use_is_refused(isolated, capsys):
    run_dir = adasap_run(isolated / "runs", "busy")
    lock = hold_lock(run_dir / RUN_MARKER, "the run", "wait")
    try:
        before = tree(isolated)
        cli_fails(capsys, ["run", *TINY, "--out", str(isolated / "runs"), "--name", "busy",
                           "--overwrite"],
                  f"{run_dir} is in use by another adasap process (pid {os.getpid()})",
                  "wait for it, or pass another --name")  # fmt: skip
        assert tree(isolated) == before
    finally:
        lock.release()


# --------------------------------------------------------------------------- export


@pytest.fixture
def saved_run(isolated) -> Path:
    run_dir = isolated / "run"
    torch.manual_seed(0)
    save_model(run_dir / "sgd", build_model(**SYNTHETIC), SYNTHETIC)
    (run_dir / "config.json").write_text(json.dumps({"dataset": "synthetic"}))
    (run_dir / "results.md").write_text("results")
    return run_dir


@pytest.mark.parametrize("source", ["run", "model"])
@pytest.mark.parametrize(
    "target", ["sgd/model.safetensors", "sgd/model.json", "config.json", "results.md"]
)
def test_export_never_writes_over_the_model_or_its_run(saved_run, capsys, source, target):
    path = saved_run if source == "run" else saved_run / "sgd"
    before = snapshot(saved_run)
    cli_fails(capsys, ["export", str(path), "--onnx", str(saved_run / target)],
              "which the export would replace", "--onnx sgd.onnx")  # fmt: skip
    assert snapshot(saved_run) == before


def test_export_into_the_run_as_a_new_onnx_file(saved_run):
    for _ in range(2):  # and again, over the earlier export
        report = export_onnx(saved_run / "sgd", saved_run / "sgd.onnx", check=False)
        assert report.path == saved_run / "sgd.onnx" and report.file_bytes > 0
