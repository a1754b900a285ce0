import json
import re
import subprocess
import sys

import pytest

from adasap.cli import main

TINY = [
    "--dataset", "synthetic",
    "--model", "resnet20",
    "--dense-epochs", "1",
    "--warmup-epochs", "0.5",
    "--prune-epochs", "1",
    "--finetune-epochs", "0.5",
    "--prune-steps", "2",
    "--batch-size", "50",
    "--corruption-limit", "20",
    "--corruptions", "quick",
    "--no-progress",
]  # fmt: skip


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ADASAP_DATA", raising=False)
    return tmp_path


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "fmnist"], "unknown dataset 'fmnist'"),
        (["--model", "resnet7"], "unknown model 'resnet7'"),
        (["--methods", "sgd", "magic"], "unknown method 'magic'"),
        (["--criterion", "hessian"], "unknown criterion 'hessian'"),
        (["--keep", "0"], "keep fraction must be in (0, 1]"),
        (["--keep", "1.5"], "keep fraction must be in (0, 1]"),
        (
            ["--keep-kind", "flops"],
            "config key 'keep_kind' must be one of 'params', 'macs', 'latency', got 'flops'",
        ),
        (
            ["--corruptions", "some"],
            "config key 'corruptions' must be one of 'all', 'quick', 'none', got 'some'",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run_dir(isolated, capsys, args, message):
    out = isolated / "runs"
    code, _, err = run_cli(["run", *TINY, *args, "--out", str(out)], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_data_dir_without_files_names_them(isolated, capsys):
    empty = isolated / "empty"
    empty.mkdir()
    args = ["run", "--dataset", "fashion-mnist", "--data-dir", str(empty),
            "--out", str(isolated / "runs")]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert "train-images-idx3-ubyte" in err and str(empty) in err
    assert not (isolated / "runs").exists()


def test_unwritable_output_directory(isolated, capsys):
    blocker = isolated / "file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(["run", *TINY, "--out", str(blocker / "runs")], capsys)
    assert code == 2
    assert "cannot write to" in err and "--out" in err


def test_existing_run_directory_needs_overwrite(isolated, capsys):
    existing = isolated / "runs" / "mine"
    existing.mkdir(parents=True)
    (existing / "results.md").write_text("earlier results")
    code, _, err = run_cli(
        ["run", *TINY, "--out", str(isolated / "runs"), "--name", "mine"], capsys
    )
    assert code == 2 and "--overwrite" in err
    assert (existing / "results.md").read_text() == "earlier results"


def test_bad_input_has_no_traceback_in_a_real_process(isolated):
    result = subprocess.run(
        [sys.executable, "-m", "adasap", "run", "--keep", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip() == "error: keep fraction must be in (0, 1], got 2.0: e.g. --keep 0.5"
    )


def test_run_end_to_end_writes_table_and_models(isolated, capsys, monkeypatch):
    from adasap.alignment import channel_alignment
    from adasap.experiments import speed

    monkeypatch.setattr(speed, "LATENCY_ROUNDS", 6)  # the columns are checked, not the timing
    monkeypatch.setattr(speed, "LATENCY_WARMUP", 1)
    monkeypatch.setattr(speed, "THROUGHPUT_ROUNDS", 6)
    out = isolated / "runs"
    code, stdout, err = run_cli(["run", *TINY, "--out", str(out), "--name", "demo"], capsys)
    assert code == 0, err
    run_dir = out / "demo"
    results = json.loads((run_dir / "results.json").read_text())
    methods = [row["method"] for row in results["rows"]]
    assert methods == ["dense", "sgd", "adasap"]
    assert results["runtime"] == "ort" and results["int8"] == []
    dense, *pruned = results["rows"]
    assert dense["runtime"] == "ort" and dense["macs_ratio"] == 1.0
    assert dense["time_b1"]["ms"] > 0 and dense["time_b64"]["ms"] > 0
    assert "ratio" not in dense["time_b1"] and dense["efficiency_b64"] is None
    # round_to auto: what it became, in the rows and in the run's own config
    rounding = channel_alignment("ort")
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["round_to"] == results["config"]["round_to"] == rounding
    for row in pruned:
        assert row["round_to"] == rounding and row["runtime"] == "ort"
        assert row["macs_ratio"] == row["macs"] / dense["macs"]
        assert 0.4 <= row["macs_ratio"] <= 0.5  # keep 0.5 of the MACs, at or under
        for batch in (1, 64):
            timed = row[f"time_b{batch}"]
            assert timed["ratio_low"] <= timed["ratio"] <= timed["ratio_high"]
            assert isinstance(timed["noisy"], bool) and timed["rounds"] == 6
            assert row[f"efficiency_b{batch}"] == row["macs_ratio"] / timed["ratio"]
        assert 0.0 <= row["clean_accuracy"] <= 1.0
        assert 0.0 <= row["corruption_accuracy"] <= 1.0
        assert (run_dir / row["method"] / "model.safetensors").is_file()
        assert (run_dir / row["method"] / "metrics.jsonl").read_text().count("\n") == 3
    table = (run_dir / "results.md").read_text()
    assert "| method | params | MACs | clean | corrupted | extra | wall time |" in table
    assert "**Speed in ort, pruned/dense**" in table
    assert "| method | MACs | time b1 | time b64 | efficiency |" in table
    assert "adasap results" in stdout and "results.md" in stdout.replace("\n", "")
    assert "Speed in ort" in stdout
    minutes, seconds = re.search(r"total time: (\d+) min (\d\d) s", stdout).groups()
    assert abs(int(minutes) * 60 + int(seconds) - results["seconds"]) <= 1
    # adasap eval re-evaluates every model of the run, here with the official-set path off
    (run_dir / "sgd" / "corruptions.json").unlink()
    code, stdout, err = run_cli(["eval", str(run_dir), "--no-progress"],
                                capsys)  # fmt: skip
    assert code == 0, err
    assert (run_dir / "sgd" / "corruptions.json").is_file()
    assert "adasap eval" in stdout
    # ... and in ONNX Runtime: the same scores as PyTorch's, within fp32 rounding
    code, stdout, err = run_cli(["eval", str(run_dir), "--runtime", "ort", "--no-progress"],
                                capsys)  # fmt: skip
    assert code == 0, err
    assert "computed in ort" in stdout
    for method in methods:
        torch_report = json.loads((run_dir / method / "corruptions.json").read_text())
        ort_report = json.loads((run_dir / method / "ort" / "corruptions.json").read_text())
        for key in ("clean_accuracy", "corruption_accuracy", "extra_accuracy"):
            assert ort_report[key] == pytest.approx(torch_report[key], abs=0.02), (method, key)
    code, _, err = run_cli(["eval", str(isolated)], capsys)
    assert code == 2 and "holds no saved model" in err
    code, _, err = run_cli(["eval", str(run_dir), "--official", "cifar10-c"], capsys)
    assert code == 2 and "go together" in err
    # deployment commands on the run
    onnx = isolated / "sgd.onnx"
    code, stdout, err = run_cli(["export", str(run_dir), "--method", "sgd", "--onnx", str(onnx)],
                                capsys)  # fmt: skip
    assert code == 0 and onnx.is_file() and "passed" in stdout, err
    blocked = isolated / "file" / "x.onnx"
    (isolated / "file").write_text("not a folder")
    code, _, err = run_cli(["export", str(run_dir), "--method", "sgd", "--onnx", str(blocked)],
                           capsys)  # fmt: skip
    assert code == 2 and err.startswith("error: ")
    code, _, err = run_cli(["export", str(run_dir), "--onnx", str(onnx)], capsys)
    assert code == 2 and "--method" in err
    code, stdout, err = run_cli(["latency", str(run_dir), "--batch-sizes", "1", "--repeats", "2",
                                 "--runtime", "torch"], capsys)  # fmt: skip
    assert code == 0, err
    assert "Speed in torch" in stdout
    rows = json.loads((run_dir / "latency.json").read_text())["rows"]
    assert {(r["model"], r["runtime"]) for r in rows} == {("sgd", "torch"), ("adasap", "torch")}
    by_model = {r["method"]: r for r in results["rows"]}
    for r in rows:  # MACs ratio and efficiency, as in the run's speed table
        assert r["macs_ratio"] == pytest.approx(by_model[r["model"]]["macs_ratio"])
        assert r["efficiency"] == pytest.approx(r["macs_ratio"] / r["ratio"])
    # the dense model is cached: a second run reuses it
    code, stdout, _ = run_cli(["run", *TINY, "--out", str(out), "--name", "again",
                               "--methods", "sgd"], capsys)  # fmt: skip
    assert code == 0 and "reusing" in stdout


def test_yaml_config_with_flag_override(isolated, capsys):
    config = isolated / "exp.yaml"
    config.write_text("methods: [sgd]\nkeep: 0.7\ndense_epochs: 1\ncorruptions: none\n")
    out = isolated / "runs"
    args = ["run", str(config), *TINY, "--corruptions", "none", "--keep", "0.6",
            "--out", str(out), "--name", "yaml"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    saved = json.loads((out / "yaml" / "config.json").read_text())
    assert saved["keep"] == 0.6 and saved["methods"] == ["sgd"]
    # the saved config reproduces the run
    assert "keep: 0.6" in (out / "yaml" / "config.yaml").read_text()


def test_yaml_config_with_unknown_key(isolated, capsys):
    config = isolated / "exp.yaml"
    config.write_text("kep: 0.5\n")
    code, _, err = run_cli(["run", str(config), "--out", str(isolated / "runs")], capsys)
    assert code == 2 and "unknown config key(s) 'kep'" in err
    assert not (isolated / "runs").exists()


def test_interrupted_run_resumes_to_identical_models(isolated, capsys, monkeypatch):
    import contextlib

    import adasap.training.pipeline as pipeline

    out = isolated / "runs"
    base = ["run", *TINY, "--corruptions", "none", "--out", str(out)]
    assert run_cli([*base, "--name", "straight"], capsys)[0] == 0

    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 40  # the dense model is cached: this stops inside `adasap`

    @contextlib.contextmanager
    def fake_stop_requests():
        yield should_stop

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "stop_requests", fake_stop_requests)
        code, _, err = run_cli([*base, "--name", "split"], capsys)
    assert code == 130 and f"adasap run --resume {out / 'split'}" in err
    assert (out / "split" / "sgd" / "summary.json").is_file()
    assert (out / "split" / "adasap" / "checkpoint.pt").is_file()

    code, _, err = run_cli(["run", "--resume", str(out / "split"), "--keep", "0.3"], capsys)
    assert code == 2 and "drop keep" in err
    # a work budget changes no result: a resume may raise it
    resume = ["run", "--resume", str(out / "split"), "--trace-seconds", "600"]
    code, stdout, err = run_cli(resume, capsys)
    assert code == 0, err
    assert "finished earlier" in stdout
    for method in ("sgd", "adasap"):
        a = (out / "straight" / method / "model.safetensors").read_bytes()
        b = (out / "split" / method / "model.safetensors").read_bytes()
        assert a == b, method
    assert not (out / "split" / "adasap" / "checkpoint.pt").exists()


def test_train_writes_a_loadable_dense_model(isolated, capsys):
    from adasap.deploy.serialization import load_model

    args = ["train", "--dataset", "synthetic", "--dense-epochs", "1", "--batch-size", "50",
            "--no-progress", "--out", str(isolated / "runs"), "--name", "dense"]  # fmt: skip
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "test accuracy" in stdout
    model = load_model(isolated / "runs" / "dense" / "dense")
    assert sum(p.numel() for p in model.parameters()) > 200_000


def test_config_is_validated_once_per_run(isolated, capsys, monkeypatch):
    from adasap.errors import UserError
    from adasap.experiments.classification_job import ClassificationJob
    from adasap.experiments.config import ExperimentConfig

    calls = []
    original = ExperimentConfig.validate

    def counted(self):
        calls.append(self.prune.keep)
        return original(self)

    def stop(job, config):
        raise UserError("stopped after validation")

    monkeypatch.setattr(ExperimentConfig, "validate", counted)
    monkeypatch.setattr(ClassificationJob, "load_data", stop)
    config = isolated / "exp.yaml"
    config.write_text("keep: 0.7\n")
    args = ["run", str(config), *TINY, "--keep", "0.6", "--out", str(isolated / "runs")]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "stopped after validation" in err
    assert calls == [0.6]
