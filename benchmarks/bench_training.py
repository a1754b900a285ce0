"""Training throughput side by side: SGD vs SAM vs AdaSAP, channels_last vs contiguous.

Prints images/s per configuration and the ratios that matter: the cost of a sharpness-aware
step over SGD (the method's ~2x), AdaSAP's overhead over SAM (its per-neuron radii), and the
channels_last speed-up on the CPU.

    .venv/bin/python benchmarks/bench_training.py [--steps 20] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from adasap.method.pruner import Pruner
from adasap.method.schedule import PhaseSchedule
from adasap.models.builders import build_model


def images_per_second(method: str, channels_last: bool, steps: int, batch_size: int) -> float:
    """Training steps of ``method`` (sgd, sam or adasap in its warm-up) through the Pruner."""
    torch.manual_seed(0)
    model = build_model(
        "resnet20", num_classes=10, in_channels=1, image_size=28, mean=(0.5,), std=(0.25,)
    )
    x = torch.rand(batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (batch_size,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    schedule = PhaseSchedule(steps + 3, 0, 0, removals=0)
    pruner = Pruner(model, x[:2], schedule, method=method, keep=1.0,
                    optimizer_kwargs={"lr": 0.05, "momentum": 0.9})  # fmt: skip
    loss = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    for _ in range(3):  # warm-up
        pruner.step(loss)
    start = time.perf_counter()
    for _ in range(steps):
        pruner.step(loss)
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    speed = {
        (kind, layout): images_per_second(kind, layout == "channels_last", args.steps,
                                          args.batch_size)
        for kind in ("sgd", "sam", "adasap")
        for layout in ("contiguous", "channels_last")
    }  # fmt: skip
    table = Table(title=f"ResNet-20, 28 px, batch {args.batch_size}, {torch.get_num_threads()} "
                        "threads: training images/s")  # fmt: skip
    table.add_column("optimizer")
    table.add_column("contiguous", justify="right")
    table.add_column("channels_last", justify="right")
    table.add_column("channels_last speed-up", justify="right")
    for kind in ("sgd", "sam", "adasap"):
        a, b = speed[(kind, "contiguous")], speed[(kind, "channels_last")]
        table.add_row(kind, f"{a:.0f}", f"{b:.0f}", f"{b / a:.2f}x")
    console = Console()
    console.print(table)
    best = "channels_last"
    console.print(
        f"SAM step cost over SGD: {speed[('sgd', best)] / speed[('sam', best)]:.2f}x (expected ~2x)"
    )
    console.print(
        f"AdaSAP step cost over SAM: {speed[('sam', best)] / speed[('adasap', best)]:.2f}x "
        "(the per-neuron radii's overhead)"
    )


if __name__ == "__main__":
    main()
