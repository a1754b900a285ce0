"""Latency per channel count in each deployment runtime: where it steps, and the alignment.

A pruned layer whose channel count is not a multiple of its runtime's channel block runs on a
slower path, so a model with half the MACs can be slower than the dense one. This benchmark
times a 3x3 convolution (C -> C, with its BatchNorm), a 1x1 convolution (the same) and a
linear layer (C -> C) for channel counts C from 1 to 128, at a few input sizes, at batch 1 and
a throughput batch, in each runtime adasap deploys to (``adasap.deploy.runtimes``: PyTorch
fp32 channels_last, onnxruntime, its INT8, OpenVINO where installed) and in PyTorch under
bf16 autocast (where the CPU computes bf16 natively). Per series it prints the time per count,
the counts where the time drops although a channel was added, the block whose multiples those
drops fall on, and how far rounding the counts up to a block's multiples is free (costs no
time). Beside each runtime, what ``round_to: auto`` keeps there
(``adasap.alignment.channel_alignment``, whose table rests on these numbers).

    .venv/bin/python benchmarks/bench_channels.py --json channels.json   # long: tens of minutes
    .venv/bin/python benchmarks/bench_channels.py --runtimes ort --sizes 14 --batches 1
    .venv/bin/python benchmarks/bench_channels.py --quick                 # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from adasap.alignment import channel_alignment, cpu_instruction_set
from adasap.deploy.runtimes import RUNTIMES
from adasap.deploy.table import LayerSpec, time_layers
from adasap.deploy.timing import TimingSettings, machine_info
from adasap.devices import cpu_has_native_bf16
from adasap.io import atomic_write_json

LAYERS = {
    "conv3x3": dict(kind="conv", kernel_size=(3, 3), padding=(1, 1), batchnorm=True),
    "conv1x1": dict(kind="conv", kernel_size=(1, 1), padding=(0, 0), batchnorm=True),
    "linear": dict(kind="linear", batchnorm=False),
}
BF16 = "torch-bf16"  # PyTorch eager under bf16 autocast: no runtime of its own
# A time below this fraction of the previous count's is a drop: more channels, less time.
DROP = 0.95
BLOCKS = (2, 4, 8, 16, 32)  # the alignments looked for
MIN_SCORE = 0.5  # drops at a block's multiples beyond its half's odd multiples, to count
QUICK = dict(
    runtimes=["torch", "ort"], layers=["conv3x3", "linear"], sizes=[7], batches=[1],
    max_channels=9, stride=1, warmup=1, repeats=2,
)  # fmt: skip


class Bf16Autocast(nn.Module):
    """A layer under bfloat16 autocast on the CPU (oneDNN's bf16 kernels), deployed as torch."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x)


def channel_counts(max_channels: int, stride: int) -> list[int]:
    """Every count up to 32, then each multiple of ``stride`` and the count just below it (a
    drop is seen between the two)."""
    below = range(1, min(32, max_channels) + 1)
    above = (c for m in range(32 + stride, max_channels + 1, stride) for c in (m - 1, m))
    return sorted({*below, *above})


def drops(counts: list[int], ms: list[float]) -> list[int]:
    """The counts whose time is clearly below that of the count just before."""
    at = dict(zip(counts, ms, strict=True))
    return [c for c in counts if c - 1 in at and at[c] < DROP * at[c - 1]]


def drop_alignment(counts: list[int], ms: list[float]) -> int:
    """The block whose multiples the time drops at (:func:`drops`): among :data:`BLOCKS`, the
    one whose multiples drop most often beyond the odd multiples of its half (a block twice
    the true one scores nothing: the true one's odd multiples drop too; ties go to the finer
    block); 1 when no block's multiples drop beyond them at least half the time."""
    dropped, measured = set(drops(counts, ms)), set(counts)
    pairs = [c for c in counts if c - 1 in measured]
    scores = {}
    for block in BLOCKS:
        on = [c in dropped for c in pairs if c % block == 0]
        half = [c in dropped for c in pairs if c % block == block // 2]
        if len(on) >= 2 and half:
            scores[block] = sum(on) / len(on) - sum(half) / len(half)
    best = max(scores, key=lambda b: (scores[b], -b), default=1)
    return best if scores.get(best, 0.0) >= MIN_SCORE else 1


def rounding_cost(counts: list[int], ms: list[float], block: int) -> float | None:
    """The time of the counts rounded up to multiples of ``block`` over their own time (summed
    over the counts off the multiples whose rounded count was measured): below 1, keeping up to
    ``block`` - 1 more channels saves time; None when no count can be compared."""
    at = dict(zip(counts, ms, strict=True))
    rounded = {c: -(-c // block) * block for c in counts if c % block}
    compared = [c for c, up in rounded.items() if up in at]
    if not compared:
        return None
    return sum(at[rounded[c]] for c in compared) / sum(at[c] for c in compared)


def free_rounding(counts: list[int], ms: list[float]) -> int:
    """The largest block of :data:`BLOCKS` to whose multiples rounding the counts up costs no
    time (:func:`rounding_cost` at most 1): the coarsest ``round_to`` that keeps channels for
    free; 1 when every rounding costs."""
    free = [b for b in BLOCKS if (rounding_cost(counts, ms, b) or math.inf) <= 1]
    return max(free, default=1)


def runnable(names: list[str]) -> list[str]:
    """The runtimes of ``names`` that run here (bf16 where the CPU computes it natively)."""
    if BF16 in names and not cpu_has_native_bf16():
        print(f"{BF16}: this CPU emulates bfloat16, skipped")
    kept = [n for n in names if n != BF16 or cpu_has_native_bf16()]
    for name in [n for n in kept if n != BF16]:
        reason = RUNTIMES.get(name)().missing()
        if reason is not None:
            print(f"{name}: cannot run here ({reason}), skipped")
            kept.remove(name)
    return kept


def measure_series(
    variant: str, layer: str, size: int | None, batch: int, counts: list[int], args: Any
) -> dict[str, Any]:
    """One layer's time per channel count in one runtime, at one input size and batch."""
    models = []
    for c in counts:
        spec = LayerSpec(
            in_channels=c,
            out_channels=c,
            prune_in=True,
            prune_out=True,
            bias=False,
            input_size=(size or 1, size or 1),
            **LAYERS[layer],
        )
        model = spec.build(c, c)
        models.append((Bf16Autocast(model) if variant == BF16 else model, spec.input_shape(c, c)))
    runtime = "torch" if variant == BF16 else variant
    timing = TimingSettings(
        batch_size=batch, warmup=args.warmup, repeats=args.repeats, runtime=runtime
    )
    ms = [float(np.median(t)) for t in time_layers(models, timing)]
    return {
        "runtime": variant,
        "layer": layer,
        "size": size,
        "batch": batch,
        "counts": counts,
        "ms": ms,
        "drops": drops(counts, ms),
        "drop_alignment": drop_alignment(counts, ms),
        "rounding_cost": {str(b): rounding_cost(counts, ms, b) for b in BLOCKS},
        "free_rounding": free_rounding(counts, ms),
    }


def print_series(series: dict[str, Any]) -> None:
    where = f"{series['size']}px" if series["size"] else "-"
    print(
        f"{series['runtime']:<13} {series['layer']:<8} {where:>5} batch {series['batch']:<3} "
        f"drops at multiples of {series['drop_alignment']}: {series['drops']}"
    )
    costs = [f"{b}: {c:.2f}" for b, c in series["rounding_cost"].items() if c is not None]
    print(
        f"    time rounded up to multiples of {', '.join(costs)} (x own): free up to "
        f"{series['free_rounding']}"
    )
    us = [f"{c}:{t * 1e3:.0f}" for c, t in zip(series["counts"], series["ms"], strict=True)]
    for start in range(0, len(us), 16):
        print("    " + " ".join(us[start : start + 16]) + (" us" if start + 16 >= len(us) else ""))


def _most_seen(values: list[int]) -> dict[str, Any]:
    seen = Counter(values)
    # JSON keys are strings: the blocks as well
    return {"seen": {str(b): seen[b] for b in sorted(seen)}, "most": max(seen, key=seen.get)}


def summary(all_series: list[dict[str, Any]], console: Console) -> dict[str, Any]:
    """Per runtime: the blocks most series show, and what ``round_to: auto`` keeps there."""
    table = Table(title=f"Channel alignment per runtime ({cpu_instruction_set()} CPU)")
    columns = ("runtime", "drops at multiples of", "rounding up free to", "round_to auto")
    for column in columns:
        table.add_column(column, justify="left" if column == "runtime" else "right")
    result = {}
    for variant in dict.fromkeys(s["runtime"] for s in all_series):
        own = [s for s in all_series if s["runtime"] == variant]
        result[variant] = {
            "drop_alignment": _most_seen([s["drop_alignment"] for s in own]),
            "free_rounding": _most_seen([s["free_rounding"] for s in own]),
            "auto": None if variant == BF16 else channel_alignment(variant),
        }
        cells = [
            f"{r['most']} (seen {', '.join(f'{b}: {n}' for b, n in r['seen'].items())})"
            for r in (result[variant]["drop_alignment"], result[variant]["free_rounding"])
        ]
        auto = result[variant]["auto"]
        table.add_row(variant, *cells, "-" if auto is None else str(auto))
    console.print(table)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    variants = [*RUNTIMES.names(), BF16]
    parser.add_argument("--runtimes", nargs="+", default=variants, choices=variants)
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=[7, 14, 28, 56], help="convolutions' input side"
    )
    parser.add_argument(
        "--batches", nargs="+", type=int, default=[1, 16], help="latency and throughput batch"
    )
    parser.add_argument("--max-channels", type=int, default=128)
    parser.add_argument(
        "--stride", type=int, default=8, help="above 32 channels: multiples of this, and below"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if args.max_channels < 2 or args.stride < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("need --max-channels >= 2, --stride >= 1, --repeats >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    console = Console(width=120)
    machine = machine_info()
    console.print(
        f"{machine['cpu']} ({cpu_instruction_set()}), {machine['threads']} torch threads, "
        f"torch {machine['torch']}"
    )
    load_before = os.getloadavg()  # other processes inflate and scatter every timing
    counts = channel_counts(args.max_channels, args.stride)
    all_series = []
    for variant in runnable(args.runtimes):
        for layer in args.layers:
            for size in [None] if layer == "linear" else args.sizes:
                for batch in args.batches:
                    series = measure_series(variant, layer, size, batch, counts, args)
                    print_series(series)
                    all_series.append(series)
    record = {
        "machine": machine,
        "instruction_set": cpu_instruction_set(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "series": all_series,
        "summary": summary(all_series, console),
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    if args.json is not None:
        atomic_write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
