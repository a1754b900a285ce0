"""The GPU and loader benchmarks run end to end with small settings on the CPU (their numbers
here mean nothing: docs/performance.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_times_every_method_and_writes_the_machine(tmp_path, capsys):
    bench = _script("bench_gpu")
    out = tmp_path / "gpu.json"
    results = bench.main([
        "--device", "cpu", "--image-size", "32", "--batch-size", "2", "--steps", "1",
        "--warmup", "0", "--amp", "off", "--layouts", "channels_last", "--json", str(out),
    ])  # fmt: skip
    assert [m.config.method for m in results] == ["sgd", "sam", "adasap"]
    assert all(m.images_per_second > 0 and m.peak_memory_gib is None for m in results)
    record = json.loads(out.read_text())
    assert record["machine"]["device"] == "cpu" and "torch" in record["machine"]
    assert [(r["method"], r["amp"], r["channels_last"]) for r in record["results"]] == [
        (method, "off", True) for method in ("sgd", "sam", "adasap")
    ]
    assert "x sgd" in capsys.readouterr().out


def test_bench_gpu_quick_mode_and_its_default_grid():
    bench = _script("bench_gpu")
    quick = bench.parse_args(["--quick"])
    assert (quick.amp, quick.layouts, quick.steps, quick.batch_size) == (
        ["bf16"],
        ["channels_last"],
        5,
        256,
    )
    full = bench.parse_args([])
    assert (full.device, full.batch_size, full.image_size) == ("cuda", 256, 224)
    assert full.amp == ["bf16", "fp16", "off"] and len(full.layouts) == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])


def test_bench_loader_measures_workers_and_cores_per_gpu(tmp_path):
    bench = _script("bench_loader")
    out = tmp_path / "loader.json"
    record = bench.main([
        "--images", "8", "--width", "50", "--height", "40", "--image-size", "16",
        "--batch-size", "4", "--workers", "0", "1", "--epochs", "1", "--device", "cpu",
        "--gpu-images-per-second", "1000", "--json", str(out),
    ])  # fmt: skip
    assert json.loads(out.read_text()) == record
    rates = record["images_per_second"]
    assert set(rates) == {"0", "1"} and all(rate > 0 for rate in rates.values())
    per_core = record["images_per_second_per_core"]
    assert record["cores_per_gpu"] == pytest.approx(1000 / per_core["1"])
    assert not record["gpu_images_per_second_is_an_estimate"]
