"""The GPU and loader benchmarks run end to end with small settings on the CPU (their numbers
here mean nothing: docs/performance.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from adasap.alignment import channel_alignment

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


def test_bench_channels_times_each_count_and_finds_the_alignment(tmp_path):
    bench = _script("bench_channels")
    out = tmp_path / "channels.json"
    record = bench.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text())["summary"] == record["summary"]
    assert {s["runtime"] for s in record["series"]} == {"torch", "ort"}
    for series in record["series"]:
        assert series["counts"] == list(range(1, 10)) and all(t > 0 for t in series["ms"])
    assert record["summary"]["ort"]["auto"] in (4, 8, 16)
    # slower off the multiples of a block: the time drops at each of them
    counts = bench.channel_counts(128, 8)
    assert counts[:32] == list(range(1, 33)) and counts[32:36] == [39, 40, 47, 48]
    for block in (8, 16):
        ms = [float(c if c % block == 0 else 1.5 * c) for c in counts]
        assert bench.drop_alignment(counts, ms) == block
        assert bench.drops(counts, ms) == [c for c in counts if c % block == 0]
    assert bench.drop_alignment(counts, [float(c) for c in counts]) == 1  # no steps
    # padded to blocks of 16: a count costs its block's time, so rounding up to 16 is free
    padded = [float(-(-c // 16)) for c in counts]
    assert bench.free_rounding(counts, padded) == 16
    assert bench.rounding_cost(counts, padded, 32) > 1


def test_bench_deploy_quick_times_dense_beside_pruned_in_every_runtime(tmp_path):
    bench = _script("bench_deploy")
    out, md = tmp_path / "deploy.json", tmp_path / "deploy.md"
    record = bench.main(["--quick", "--runtimes", "torch", "ort", "ort-int8",
                         "--json", str(out), "--markdown", str(md)])  # fmt: skip
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(record["rows"]))
    rows = record["rows"]
    # ResNet-20, each runtime with any channel counts and its own multiple, at batch 1 and 32
    assert [(r["runtime"], r["round_to"], r["batch_size"]) for r in rows] == [
        (runtime, round_to, batch)
        for runtime in ("torch", "ort", "ort-int8")
        for round_to in (1, channel_alignment(runtime))
        for batch in (1, 32)
    ]
    for r in rows:
        assert 0.45 < r["macs_ratio"] <= 0.5 and r["rounds"] == 6
        assert r["efficiency"] == pytest.approx(r["macs_ratio"] / r["ratio"])
        assert ("int8_speedup_dense" in r) == (r["runtime"] == "ort-int8")
    assert md.read_text().count("| resnet20 (28 px) |") == len(rows)


def test_bench_deploy_sets_int8_against_the_fp32_runtime():
    bench = _script("bench_deploy")
    key = {"model": "resnet20", "round_to": 16, "batch_size": 1}
    rows = [
        {**key, "runtime": "ort", "dense_ms": 2.0, "pruned_ms": 1.0},
        {**key, "runtime": "ort-int8", "dense_ms": 0.5, "pruned_ms": 0.4},
        {**key, "runtime": "openvino-int8", "dense_ms": 0.5, "pruned_ms": 0.4},  # no fp32 row
    ]
    bench.add_int8_speed(rows)
    assert rows[1]["int8_speedup_dense"] == 4.0 and rows[1]["int8_speedup_pruned"] == 2.5
    assert "int8_speedup_dense" not in rows[0] and "int8_speedup_dense" not in rows[2]


def test_bench_layout_times_each_way_and_puts_torch_prunings_mapping_back(tmp_path):
    from torch_pruning.dependency import index_mapping

    from adasap.method.layer_pruners import map_concat

    bench = _script("bench_layout")
    out = tmp_path / "layout.json"
    rows = bench.main(["--model", "densenet121", "--image-size", "32", "--batch", "1",
                       "--repeats", "1", "--json", str(out)])  # fmt: skip
    assert [r["way"] for r in rows] == ["adasap", "tp-concat", "no-check"]
    assert len({(r["neurons"], r["groups"], r["left_whole"]) for r in rows}) == 1  # same layout
    assert rows[0]["groups"] == 120 and all(r["seconds"] > 0 for r in rows)
    assert index_mapping.update_concat_index_mapping is map_concat
    assert json.loads(out.read_text())["rows"] == rows
