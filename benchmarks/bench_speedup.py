"""Measured speedup of pruned over dense models on this machine, side by side in one run.

Part 1 prunes each model to keep 50% of its MACs (L2 magnitude scores, normalised per group;
no training: latency does not depend on the weights), once with any channel counts and once
with counts rounded to multiples of 16 (``--round-to``), and times dense beside both pruned
models at batch 1 and 64 with PyTorch eager and onnxruntime on the CPU. Each speedup is
printed next to the goal 0.8 x (dense MACs / pruned MACs).

Part 2 prunes to a latency budget (AdaSAP_L's HALP-style predictor) and compares the measured
latency of the pruned model with the budget (goal: within 10%).

    .venv/bin/python benchmarks/bench_speedup.py                       # several minutes
    .venv/bin/python benchmarks/bench_speedup.py --models resnet20 --latency-checks resnet20@1:0.7
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from adasap.deploy.latency import (
    TimingSettings,
    compare_latency,
    machine_info,
    prune_to_latency,
)
from adasap.errors import UserError
from adasap.io import atomic_write_json
from adasap.method.importance import magnitude_scores, normalize_scores
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size, remove_neurons, select_neurons, size_predictor
from adasap.models.builders import build_model, find_classifier

# name -> (image size, classes): CIFAR ResNet-20 at 32 px, ImageNet networks at 224 px.
MODELS = {"resnet20": (32, 10), "resnet50": (224, 1000), "mobilenet_v2": (224, 1000)}
GOAL_FACTOR = 0.8
LATENCY_CHECKS = ("resnet20@1:0.5", "resnet20@1:0.7", "resnet20@64:0.5", "resnet50@1:0.5")


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    size, classes = MODELS[name]
    torch.manual_seed(0)
    model = build_model(
        name, num_classes=classes, in_channels=3, image_size=size, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    return model.eval(), torch.rand(1, 3, size, size)


def prune_macs(model: torch.nn.Module, example: torch.Tensor, keep: float, round_to: int) -> None:
    """Remove the lowest-magnitude neurons until ``keep`` x the MACs remain (in place)."""
    classes = model(example).shape[1]
    layout = NeuronLayout(model, example, [find_classifier(model, classes)])
    dense = measure_size(model, example)
    scores = normalize_scores(magnitude_scores(layout), layout)
    predict = size_predictor(layout, dense, "macs")
    chosen = select_neurons(layout, scores, keep * dense.macs, predict, "macs", round_to=round_to)
    remove_neurons(layout, chosen)


def speedups(args: argparse.Namespace, console: Console) -> list[dict]:
    table = Table(title=f"Pruned to keep {args.keep:.0%} of MACs: measured speedup vs goal")
    columns = ("model", "px", "round to", "MACs kept", "backend", "batch", "dense ms", "pruned ms")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "backend") else "right")
    for column in ("speedup", "goal", "met"):
        table.add_column(column, justify="right")
    rows = []
    for name in args.models:
        dense, example = build(name)
        pruned, macs_ratio = {}, {}
        dense_macs = measure_size(dense, example).macs
        for round_to in args.round_to:
            model, _ = build(name)
            prune_macs(model, example, args.keep, round_to)
            pruned[str(round_to)] = model
            macs_ratio[str(round_to)] = dense_macs / measure_size(model, example).macs
        comparison = compare_latency(
            dense,
            pruned,
            tuple(example.shape[1:]),
            batch_sizes=args.batch_sizes,
            backends=args.backends,
            warmup=args.warmup,
            repeats=args.repeats,
        )
        for r in comparison.rows:
            ratio = macs_ratio[r["model"]]
            goal = GOAL_FACTOR * ratio
            row = {
                **r,
                "model": name,
                "round_to": int(r["model"]),
                "image_size": example.shape[-1],
                "macs_ratio": ratio,
                "goal": goal,
            }
            rows.append(row)
            table.add_row(
                name,
                str(example.shape[-1]),
                r["model"],
                f"{1 / ratio:.1%}",
                r["backend"],
                str(r["batch_size"]),
                f"{r['dense_ms']:.2f}",
                f"{r['pruned_ms']:.2f}",
                f"{r['speedup']:.2f}x",
                f"{goal:.2f}x",
                "yes" if r["speedup"] >= goal else "no",
            )
        console.print(f"{name}: timed")
    console.print(table)
    return rows


def latency_check(text: str) -> tuple[str, int, float]:
    """``model@batch:keep``, e.g. ``resnet20@1:0.5``."""
    try:
        name, rest = text.split("@")
        batch, keep = rest.split(":")
        if name not in MODELS:
            raise ValueError(f"unknown model {name}")
        return name, int(batch), float(keep)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: use model@batch:keep ({exc})") from None


def latency_budgets(args: argparse.Namespace, console: Console) -> list[dict]:
    table = Table(title="Pruned to a latency budget (PyTorch eager, CPU)")
    for column in ("model", "batch", "keep", "dense ms", "budget ms", "predicted ms"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for column in ("measured ms", "error", "within 10%"):
        table.add_column(column, justify="right")
    rows = []
    for name, batch, keep in args.latency_checks:
        model, example = build(name)
        try:
            report = prune_to_latency(
                model,
                example,
                keep,
                ignored_layers=[find_classifier(model, model(example).shape[1])],
                timing=TimingSettings(
                    batch_size=batch,
                    warmup=args.warmup,
                    repeats=max(args.repeats, 10),
                    cache_dir=args.cache_dir,
                ),
            )
        except UserError as exc:  # a budget below the latency floor of the layers' overhead
            rows.append({"model": name, "batch_size": batch, "keep": keep, "unreachable": str(exc)})
            table.add_row(name, str(batch), f"{keep:.0%}", "", "", "", "", "", "unreachable")
            console.print(f"{name} at batch {batch}, keep {keep:.0%}: {exc}")
            continue
        rows.append({"model": name, "keep": keep, **report.to_dict()})
        table.add_row(
            name,
            str(batch),
            f"{keep:.0%}",
            f"{report.dense_ms:.3f}",
            f"{report.budget_ms:.3f}",
            f"{report.predicted_ms:.3f}",
            f"{report.measured_ms:.3f}",
            f"{report.error:+.1%}",
            "yes" if report.within(0.1) else "no",
        )
    console.print(table)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of MACs to keep")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument(
        "--round-to",
        nargs="+",
        type=int,
        default=[1, 16],
        help="channel-count multiples to prune with, each a model of its own (default: 1 16)",
    )
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--latency-checks",
        nargs="*",
        type=latency_check,
        default=[latency_check(c) for c in LATENCY_CHECKS],
        metavar="MODEL@BATCH:KEEP",
        help=f"latency-budget runs (default: {' '.join(LATENCY_CHECKS)})",
    )
    parser.add_argument("--cache-dir", default=None, help="latency tables (default: ~/.cache)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    console = Console(width=120)
    machine = machine_info()
    console.print(
        f"{machine['cpu']}, {machine['cpus']} CPUs, {machine['threads']} torch threads, "
        f"torch {machine['torch']}"
    )
    # Other processes on the cores inflate and scatter every timing: report the load with them.
    load_before = os.getloadavg()
    results = {
        "machine": machine,
        "speedup": speedups(args, console),
        "latency_budget": latency_budgets(args, console),
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    console.print(
        f"load average (1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}"
    )
    if args.json is not None:
        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
