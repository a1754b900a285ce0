"""The coverage benchmark: one model through its child process (rows, resume, markdown) and
a model that adasap refuses, in this process."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_coverage", BENCHMARKS / "bench_coverage.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_coverage"] = module
    spec.loader.exec_module(module)
    return module


def test_a_model_is_pruned_checked_and_resumed_in_a_child(tmp_path):
    bench = _bench()
    out, table = tmp_path / "rows.jsonl", tmp_path / "table.md"
    argv = ["--models", "resnet20", "--image-size", "16", "--batches", "1", "--timeout", "120"]
    argv += ["--out", str(out), "--markdown", str(table)]
    [row] = bench.main(argv)
    assert row["outcome"] == "ok", row
    assert row["model"] == "resnet20" and row["image_size"] == 16
    assert 0.44 <= row["kept"] <= 0.505 and row["onnx_max_diff"] < 1e-3
    assert row["pruned"]["channels"]["conv"][0] < row["pruned"]["channels"]["conv"][1]
    assert row["pruned"]["groups"] > 0 and 0 < row["peak_gb"] < 4 and row["seconds"] > 0
    assert 0 < row["prune_seconds"] < row["seconds"] and 0 < row["prune_peak_gb"] <= row["peak_gb"]
    assert "error" not in row
    assert [json.loads(line)["model"] for line in out.read_text().splitlines()] == ["resnet20"]
    assert "| resnet20 | 16 | ok |" in table.read_text()
    assert "1 reached the target" in table.read_text()
    assert bench.main(argv) == [row]  # resumed: read back, not run again
    assert len(out.read_text().splitlines()) == 1


def test_a_model_without_prunable_layers_is_a_clean_refusal():
    bench = _bench()
    args = bench.parse_args(["--models", "flat", "--image-size", "8"])
    row = bench.check("flat", args, build=lambda: nn.Sequential(nn.Flatten(), nn.Linear(192, 10)))
    assert row["outcome"] == "refused" and row["stage"] == "prune", row
    assert "no prunable layers" in row["error"] and "UNEXPECTED" not in row["error"]
    assert row["image_size"] == 8 and row["params"] == 1930 and "kept" not in row


def test_a_child_over_its_time_or_memory_limit_is_killed_and_recorded(tmp_path):
    bench = _bench()
    for limit, outcome in ((["--timeout", "1"], "timeout"), (["--memory-gb", "0.1"], "memory")):
        argv = ["--models", "resnet20", "--out", str(tmp_path / f"{outcome}.jsonl"), *limit]
        [row] = bench.main(argv)
        assert row["outcome"] == outcome and row["seconds"] < 30, row
        assert row["error"] in ("no result within 1 s", "RSS above 0.1 GB")


def test_a_size_whose_adaptive_pooling_cannot_export_is_not_chosen():
    bench = _bench()
    pooled_up = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    model = nn.Sequential(pooled_up, nn.Linear(16, 10))
    assert not bench._runs_exportably(model, 5)  # a 3x3 grid pooled to 2x2
    assert bench._runs_exportably(model, 6)
    with pytest.raises(AssertionError, match="not 10 logits"):
        bench._runs_exportably(nn.Sequential(pooled_up, nn.Linear(16, 3)), 6)
    # no size exports: the first that runs, where the export then refuses in one line
    dense, size, _, _ = bench._dense("pooled", 5, build=lambda: model)
    assert size == 5 and dense is not None


def test_batch_norm_statistics_are_re_estimated_and_the_momentum_kept():
    bench = _bench()
    conv, norm = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.3)
    model = bench._calibrated(nn.Sequential(conv, norm), 5)
    images = [torch.rand(8, 3, 5, 5, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with torch.no_grad():
        means = torch.stack([conv(x).mean(dim=(0, 2, 3)) for x in images])
    assert torch.allclose(norm.running_mean, means.mean(0), atol=1e-6)
    assert norm.momentum == 0.3 and not model.training


def test_a_macs_target_is_checked_against_the_measured_macs():
    bench = _bench()
    argv = ["--models", "resnet20", "--image-size", "16", "--batches", "1"]
    argv += ["--keep-kind", "macs", "--round-to", "4"]
    args = bench.parse_args(argv)
    row = bench.check("resnet20", args)
    assert row["outcome"] == "ok" and row["keep_kind"] == "macs", row
    row["seconds"] = row["check_seconds"]  # the parent adds the child's wall time
    assert 0.44 <= row["kept_macs"] <= 0.505 and bench.cells(row)[3] == f"{row['kept_macs']:.3f}"
    assert "keep 0.5 of the macs (round to 4" in bench.markdown([row], args)


def test_what_was_pruned_counts_attention_heads_beside_channels():
    bench = _bench()
    dense = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 4), "fc": nn.Linear(8, 6)})
    pruned = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 3)})
    summary = bench.what_was_pruned(dense, pruned, [["fc", False, [0]], ["attn:heads", True, [1]]])
    assert summary == {"channels": {"linear": [3, 6], "heads": [2, 4]}, "groups": 2}


def test_the_worker_checks_with_every_option_of_the_check():
    bench = _bench()
    argv = ["--models", "m", "--image-size", "16", "--keep", "0.3", "--keep-kind", "macs"]
    argv += ["--round-to", "4", "--tolerance", "0.1", "--criterion", "taylor", "--threads", "2"]
    args = bench.parse_args(argv)
    worker = bench.parse_args(bench.worker_argv("m", args, Path("row.json")))
    assert worker.worker == "m" and worker.row_file == Path("row.json")
    for option in bench.WORKER_OPTIONS:
        assert getattr(worker, option) == getattr(args, option), option
    # every option check() reads reaches the worker
    assert set(bench.WORKER_OPTIONS) >= {"keep_kind", "round_to", "criterion", "image_size"}
