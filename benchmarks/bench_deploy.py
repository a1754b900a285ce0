"""Pruned beside dense in each deployment runtime: how much of the MACs saved is time saved.

Each model (random weights: its time does not depend on them) is pruned in one shot to keep
half its MACs (L2 magnitude, normalised per group), once with any channel counts (round to 1)
and once with the multiple the runtime's kernels want (round to auto:
``adasap.alignment.channel_alignment``), then dense and pruned are timed side by side in
each runtime at batch 1 and 32 (taking turns where the runtime allows:
``adasap.deploy.comparison.compare_latency``). Each row gives the MACs ratio and the time
ratio (pruned / dense, the time's with its 95% interval), the efficiency (MACs ratio / time
ratio: 1 when the time falls as much as the MACs) and, in ``ort-int8``, the speed of INT8
against fp32 ONNX Runtime (dense and pruned; timed in separate sessions).

    .venv/bin/python benchmarks/bench_deploy.py --json deploy.json --markdown deploy.md
    .venv/bin/python benchmarks/bench_deploy.py --quick      # ResNet-20, a few repeats
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from adasap.alignment import channel_alignment
from adasap.deploy.latency import LatencyRatio, compare_latency, machine_info
from adasap.deploy.runtimes import RUNTIMES
from adasap.io import atomic_write_json, atomic_write_text
from adasap.method.importance import magnitude_scores, normalize_scores
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size, remove_neurons, select_neurons, size_predictor
from adasap.models.builders import build_model, find_classifier


class ModelSpec(NamedTuple):
    image_size: int
    channels: int
    classes: int


# ResNet-20 as the demo trains it (Fashion-MNIST: 28 px, one channel); ImageNet networks
MODELS = {
    "resnet20": ModelSpec(28, 1, 10),
    "resnet18": ModelSpec(224, 3, 1000),
    "resnet50": ModelSpec(224, 3, 1000),
    "mobilenet_v2": ModelSpec(224, 3, 1000),
    "efficientnet_b0": ModelSpec(224, 3, 1000),
}
INT8_BASELINE = {"ort-int8": "ort", "openvino-int8": "openvino"}
COLUMNS = (
    "model", "runtime", "round to", "batch", "dense ms", "pruned ms", "MACs ratio",
    "time ratio", "efficiency", "INT8 vs fp32",
)  # fmt: skip


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = build_model(
        name,
        num_classes=spec.classes,
        in_channels=spec.channels,
        image_size=spec.image_size,
        mean=(0.5,) * spec.channels,
        std=(0.25,) * spec.channels,
    )
    return model.eval(), torch.rand(1, spec.channels, spec.image_size, spec.image_size)


def pruned(name: str, keep: float, round_to: int) -> tuple[nn.Module, float]:
    """``name`` pruned in one shot to ``keep`` x its MACs, and its MACs ratio to the dense."""
    model, example = build(name)
    layout = NeuronLayout(model, example, [find_classifier(model, MODELS[name].classes)])
    dense = measure_size(model, example)
    scores = normalize_scores(magnitude_scores(layout), layout)
    predict = size_predictor(layout, dense, "macs")
    chosen = select_neurons(layout, scores, keep * dense.macs, predict, "macs", round_to=round_to)
    remove_neurons(layout, chosen)
    return model, measure_size(model, example).macs / dense.macs


def runnable(names: list[str]) -> list[str]:
    """The runtimes asked for that can run here (OpenVINO is an optional package)."""
    return [name for name in names if RUNTIMES.get(name)().missing() is None]


def time_model(name: str, args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    """Dense beside each pruned variant of ``name`` in every runtime: one row per runtime,
    rounding and batch size."""
    dense, example = build(name)
    roundings = {runtime: (1, channel_alignment(runtime)) for runtime in args.runtimes}
    variants = {r: pruned(name, args.keep, r) for r in sorted(set().union(*roundings.values()))}
    rows = []
    for runtime in args.runtimes:
        models = {str(r): variants[r][0] for r in roundings[runtime]}
        comparison = compare_latency(
            dense,
            models,
            tuple(example.shape[1:]),
            batch_sizes=args.batch_sizes,
            runtimes=(runtime,),
            warmup=args.warmup,
            repeats=args.repeats,
        )
        for r in comparison.rows:
            round_to = int(r["model"])
            macs_ratio = variants[round_to][1]
            rows.append(
                {
                    **r,
                    "model": name,
                    "image_size": MODELS[name].image_size,
                    "round_to": round_to,
                    "auto": round_to == roundings[runtime][1],
                    "macs_ratio": macs_ratio,
                    "efficiency": macs_ratio / r["ratio"],
                }
            )
        console.print(f"{name}: timed in {runtime}")
    return rows


def add_int8_speed(rows: list[dict[str, Any]]) -> None:
    """INT8 rows get their speed against the fp32 runtime's same models: fp32 ms / INT8 ms."""
    fp32 = {(r["model"], r["runtime"], r["round_to"], r["batch_size"]): r for r in rows}
    for row in rows:
        base = fp32.get(
            (row["model"], INT8_BASELINE.get(row["runtime"]), row["round_to"], row["batch_size"])
        )
        if base is not None:
            row["int8_speedup_dense"] = base["dense_ms"] / row["dense_ms"]
            row["int8_speedup_pruned"] = base["pruned_ms"] / row["pruned_ms"]


def cells(row: dict[str, Any]) -> list[str]:
    """A row's table cells, in the order of :data:`COLUMNS`."""
    ratio = LatencyRatio(row["ratio"], row["ratio_low"], row["ratio_high"], row["rounds"])
    int8 = ""
    if "int8_speedup_dense" in row:
        int8 = f"{row['int8_speedup_dense']:.2f}x / {row['int8_speedup_pruned']:.2f}x"
    return [
        f"{row['model']} ({row['image_size']} px)",
        row["runtime"],
        f"{row['round_to']} (auto)" if row["auto"] else str(row["round_to"]),
        str(row["batch_size"]),
        f"{row['dense_ms']:.3g}",
        f"{row['pruned_ms']:.3g}",
        f"{row['macs_ratio']:.3f}",
        str(ratio),
        "noisy" if ratio.noisy else f"{row['efficiency']:.2f}",
        int8,
    ]


CAPTION = (
    "ratios are pruned / dense; time ratio: median of the per-round ratios (95% interval), "
    "'noisy' when too wide to trust; efficiency: MACs ratio / time ratio; INT8 vs fp32: "
    "fp32 ms / INT8 ms of the dense / pruned model"
)


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        f"Machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    return "\n".join([*lines, "", CAPTION, ""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--runtimes", nargs="+", default=list(RUNTIMES.names()), choices=list(RUNTIMES.names())
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of MACs to keep")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per model")
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only, 6 rounds")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.warmup, args.repeats = ["resnet20"], 1, 6
    args.runtimes = runnable(args.runtimes)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    console = Console(width=160)
    machine = machine_info()
    console.print(f"{machine['cpu']}, {machine['cpus']} CPUs, {machine['threads']} threads")
    # other processes on the cores scatter every timing: report the load with the numbers
    load_before = os.getloadavg()
    rows = [row for name in args.models for row in time_model(name, args, console)]
    add_int8_speed(rows)
    table = Table(
        title=f"Pruned to keep {args.keep:.0%} of the MACs, beside dense", caption=CAPTION
    )
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("model", "runtime") else "right")
    for row in rows:
        table.add_row(*cells(row))
    console.print(table)
    record = {
        "machine": machine,
        "rows": rows,
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    console.print(
        f"load average (1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}"
    )
    if args.json is not None:
        atomic_write_json(args.json, record)
    if args.markdown is not None:
        atomic_write_text(args.markdown, markdown(rows, machine))
    return record


if __name__ == "__main__":
    main()
