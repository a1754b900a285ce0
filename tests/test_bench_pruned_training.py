"""benchmarks/bench_pruned_training.py: its layouts decide per layer as documented, and it runs
end to end with small settings (its numbers here mean nothing: docs/performance.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pruned_training.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_pruned_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its NamedTuple looks its module up
    spec.loader.exec_module(module)
    return module


def _contiguous(conv: nn.Conv2d) -> bool:
    return bool(conv._forward_pre_hooks)


def test_the_mixed_layout_computes_exactly_the_unaligned_convolutions_contiguously():
    bench = _bench()
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),  # 1 input channel: unaligned
        nn.Conv2d(16, 32, 3, padding=1),  # aligned both ways
        nn.Conv2d(32, 24, 3, padding=1),  # 24 outputs
        nn.Conv2d(24, 32, 1, stride=2),  # 24 inputs (and >= 16: not the oneDNN guard's)
    )
    mixed = bench.in_layout(model, "mixed", alignment=16)
    assert [_contiguous(c) for c in mixed] == [True, False, True, True]
    assert mixed[1].weight.is_contiguous(memory_format=torch.channels_last)
    assert [_contiguous(c) for c in bench.in_layout(model, "mixed", alignment=8)] == [
        True, False, False, False,
    ]  # fmt: skip
    whole = bench.in_layout(model, "contiguous", alignment=16)
    assert not any(_contiguous(c) for c in whole)
    assert all(c.weight.is_contiguous() for c in whole) and not any(_contiguous(c) for c in model)


def test_it_times_every_model_beside_the_dense_one(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "rows.json"
    rows = bench.main([
        "--round-to", "16", "--precisions", "bf16", "--layouts", "channels_last", "mixed",
        "--passes", "1", "--rounds", "1", "--batch-size", "4", "--threads", "1",
        "--clock", "cpu", "--layers", "--json", str(out),
    ])  # fmt: skip
    assert [(r["layout"], r["model"]) for r in rows] == [
        (layout, model)
        for layout in ("channels_last", "mixed")
        for model in ("dense", "round_to 16")
    ]
    dense, pruned = rows[0], rows[1]
    assert dense["ratio"] == 1.0 and pruned["ratio"] > 0 and 0.3 < pruned["macs_kept"] < 0.7
    assert json.loads(out.read_text())["rows"] == rows
    printed = capsys.readouterr().out
    assert "default mode, 1 pass(es), round_to 16" in printed and "each layer" in printed
