"""``adasap run --int8``: every model quantized to INT8 in ONNX Runtime, its scores computed on
the quantized model, its file and its time against the dense fp32 model; ``adasap eval
--runtime ort-int8`` and ``adasap export --int8`` on the same run."""

from __future__ import annotations

import json

import pytest

from adasap.cli import main
from adasap.experiments import speed

TINY = [
    "--dataset", "synthetic",
    "--train-limit", "300",
    "--test-limit", "100",
    "--corruption-limit", "20",
    "--corruptions", "quick",
    "--methods", "sgd",
    "--dense-epochs", "2",
    "--warmup-epochs", "0.5",
    "--prune-epochs", "1",
    "--finetune-epochs", "1",
    "--prune-steps", "2",
    "--batch-size", "50",
    "--no-progress",
]  # fmt: skip


@pytest.mark.slow
def test_int8_rows_are_scored_and_timed_on_the_quantized_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(speed, "LATENCY_ROUNDS", 6)  # the rows are checked, not the timing
    monkeypatch.setattr(speed, "LATENCY_WARMUP", 1)
    monkeypatch.setattr(speed, "THROUGHPUT_ROUNDS", 6)
    run_dir = tmp_path / "runs" / "q"
    code = main(["run", *TINY, "--int8", "--out", str(tmp_path / "runs"), "--name", "q"])
    out = capsys.readouterr().out
    assert code == 0
    assert "INT8 (ONNX Runtime, static quantization)" in out and "sgd int8" in out
    results = json.loads((run_dir / "results.json").read_text())
    fp32 = {row["method"]: row for row in results["rows"]}
    int8 = {row["method"]: row for row in results["int8"]}
    assert list(int8) == ["dense", "sgd"]
    for method, row in int8.items():
        files = run_dir / method / "ort-int8"
        assert row["runtime"] == "ort-int8"
        assert row["file_bytes"] == (files / "model.int8.onnx").stat().st_size
        # 8-bit weights, not 32 (a small graph keeps more of its size in per-channel scales)
        assert row["file_bytes"] < (files / "model.onnx").stat().st_size / 2
        # computed by ONNX Runtime on the quantized model, reports beside it
        report = json.loads((files / "corruptions.json").read_text())
        assert report["corruption_accuracy"] == row["corruption_accuracy"]
        assert row["clean_accuracy"] == pytest.approx(fp32[method]["clean_accuracy"], abs=0.1)
        assert (row["params"], row["macs"]) == (fp32[method]["params"], fp32[method]["macs"])
        # timed against the dense fp32 model in ONNX Runtime, its ratio with an interval
        for batch in (1, 64):
            timed = row[f"time_b{batch}"]
            assert timed["ratio_low"] <= timed["ratio"] <= timed["ratio_high"]
            assert timed["rounds"] == 6 and isinstance(timed["noisy"], bool)
    assert int8["sgd"]["macs_ratio"] == fp32["sgd"]["macs_ratio"]
    table = (run_dir / "results.md").read_text()
    assert "| method | file | clean | corrupted | extra |" in table
    assert "| dense int8 | 1.00x |" in table

    # eval in the INT8 runtime calibrates as the run did: the same scores
    code = main(["eval", str(run_dir), "--runtime", "ort-int8", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    again = json.loads((run_dir / "sgd" / "ort-int8" / "corruptions.json").read_text())
    assert again["corruption_accuracy"] == int8["sgd"]["corruption_accuracy"]

    # export --int8: the run's INT8 file, checked against PyTorch, report printed
    target = tmp_path / "sgd.int8.onnx"
    code = main(["export", str(run_dir), "--method", "sgd", "--int8", "--onnx", str(target)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "passed" in printed.out and str(target) in printed.out
    assert target.stat().st_size == int8["sgd"]["file_bytes"]
