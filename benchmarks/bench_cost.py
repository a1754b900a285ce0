"""The cost of sharpness-aware pruning against plain pruning, and what the cheaper steps save.

In one process, on the default job's data and dense model (``adasap run``'s defaults, or a
YAML config as ``adasap run`` takes), prunes with sgd, sam, adasap and adasap with each
cheaper sharpness-aware option (docs/performance.md), and prints per variant: wall time per
phase (warm-up, removal, fine-tuning; the per-epoch validation included) and in all, the
ratio of the total to sgd's, passes per step (the closure's calls, forward and backward, in
batches: a sub-batch ascent counts its fraction), and clean and corrupted test accuracy at
the end. Timing is only meaningful on an otherwise idle machine.

    .venv/bin/python benchmarks/bench_cost.py [CONFIG.yaml] [--variants sgd adasap ...]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table

from adasap.experiments.config import ExperimentConfig, from_flat, load_yaml
from adasap.experiments.dense import dense_model, load_data
from adasap.experiments.run import evaluate_model
from adasap.method.pruner import Pruner
from adasap.method.schedule import PHASES
from adasap.training import pipeline

# name -> (method, pruner settings that make it cheaper)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {}),
    "sam": ("sam", {}),
    "adasap": ("adasap", {}),
    "adasap-rst": ("adasap", {"sam_probability": 0.5}),
    "adasap-rst-scheduled": ("adasap", {"sam_probability": 0.8, "sam_probability_end": 0.2}),
    "adasap-looksam": ("adasap", {"sam_every": 5}),
    "adasap-sub-batch": ("adasap", {"ascent_fraction": 0.25}),
}


class CountingPruner(Pruner):
    """A Pruner that counts its closure's calls, in batches (a sub-batch counts its fraction)."""

    batches = 0.0

    def step(self, closure: Callable[..., Any]) -> torch.Tensor:
        def counted(*args: Any, **kwargs: Any) -> Any:
            CountingPruner.batches += kwargs.get("fraction", 1.0)
            return closure(*args, **kwargs)

        return super().step(counted)


def measure(name: str, dense: torch.nn.Module, data, config: ExperimentConfig, out: Path) -> dict:
    method, options = VARIANTS[name]
    settings = replace(config.prune, method=method, pruner=replace(config.prune.pruner, **options))
    records: list[dict[str, Any]] = []
    CountingPruner.batches = 0.0
    with mock.patch.object(pipeline, "Pruner", CountingPruner):
        result = pipeline.prune(dense, data, settings=settings, log=records.append)
    phase_seconds, before = {}, 0.0
    for phase in PHASES:
        ends = [r["seconds"] for r in records if r["phase"] == phase]
        if ends:
            phase_seconds[phase], before = ends[-1] - before, ends[-1]
    steps = records[-1]["step"]
    row = evaluate_model(result.model.cpu(), data, config, out, name)
    return {
        "name": name,
        "phases": phase_seconds,
        "seconds": result.seconds,
        "passes": CountingPruner.batches / steps,
        "clean": row.clean_accuracy,
        "corrupted": row.corruption_accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML file of the job (default: the defaults)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", help="where the corruption reports go (default: a temp dir)")
    args = parser.parse_args()
    config = from_flat(load_yaml(args.config) if args.config else {}).validate()
    console = Console()
    data = load_data(config)
    dense, _ = dense_model(config, data, console)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out or scratch)
        results = [measure(name, dense, data, config, out) for name in args.variants]
    baseline = next((r["seconds"] for r in results if r["name"] == "sgd"), None)
    table = Table(title=f"{config.dataset}, {config.model}, keep {config.prune.keep}: cost")
    for column in ("variant", *PHASES, "total s", "x sgd", "passes/step", "clean", "corrupted"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in results:
        table.add_row(
            r["name"],
            *(f"{r['phases'].get(phase, 0.0):.1f}" for phase in PHASES),
            f"{r['seconds']:.1f}",
            f"{r['seconds'] / baseline:.2f}" if baseline else "-",
            f"{r['passes']:.2f}",
            f"{r['clean']:.4f}",
            "-" if r["corrupted"] is None else f"{r['corrupted']:.4f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
