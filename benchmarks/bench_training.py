"""Training throughput side by side: SGD vs SAM vs AdaSAP, memory layout, precision, compile.

Prints images/s per configuration and the ratios that matter: the cost of a sharpness-aware
step over SGD (the method's ~2x), AdaSAP's overhead over SAM (its per-neuron radii), the
channels_last speed-up on the CPU, bfloat16 autocast against float32 (``amp: bf16``), and
``torch.compile`` against eager (``--compile``; its compile time is printed separately, since
it is paid once per architecture, i.e. again after every removal).

    .venv/bin/python benchmarks/bench_training.py [--steps 20] [--batch-size 128] [--compile]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from adasap.method.pruner import Pruner
from adasap.method.schedule import PhaseSchedule
from adasap.models.builders import build_model


@dataclass(frozen=True)
class Config:
    method: str
    channels_last: bool = True
    bf16: bool = False
    compile: bool = False

    def label(self) -> str:
        return ", ".join(
            [
                self.method,
                "channels_last" if self.channels_last else "contiguous",
                "bf16" if self.bf16 else "fp32",
                *(["compiled"] if self.compile else []),
            ]
        )


def measure(config: Config, steps: int, batch_size: int) -> tuple[float, float]:
    """Images/s of training steps through the Pruner (warm-up phase), and the first step's s."""
    torch.manual_seed(0)
    model = build_model(
        "resnet20", num_classes=10, in_channels=1, image_size=28, mean=(0.5,), std=(0.25,)
    )
    x = torch.rand(batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (batch_size,))
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    schedule = PhaseSchedule(steps + 4, 0, 0, removals=0)
    pruner = Pruner(model, x[:2], schedule, method=config.method, keep=1.0,
                    optimizer_kwargs={"lr": 0.05, "momentum": 0.9})  # fmt: skip
    run = torch.compile(model) if config.compile else model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if config.bf16 else nullcontext()

    def loss() -> torch.Tensor:
        with autocast:
            logits = run(x)
        return torch.nn.functional.cross_entropy(logits.float(), y)

    start = time.perf_counter()
    pruner.step(loss)  # compiles (training and the frozen-statistics pass) when compiled
    first = time.perf_counter() - start
    for _ in range(3):
        pruner.step(loss)
    start = time.perf_counter()
    for _ in range(steps):
        pruner.step(loss)
    return steps * batch_size / (time.perf_counter() - start), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    configs = [
        Config(method, channels_last, bf16)
        for method in ("sgd", "sam", "adasap")
        for channels_last in (False, True)
        for bf16 in (False, True)
    ]
    if args.compile:
        configs += [
            Config(m, True, bf16, compile=True) for m in ("sgd", "sam") for bf16 in (False, True)
        ]
    speed, first = {}, {}
    for config in configs:
        speed[config], first[config] = measure(config, args.steps, args.batch_size)
    table = Table(
        title=f"ResNet-20, 28 px, batch {args.batch_size}, {torch.get_num_threads()} threads: "
        "training images/s"
    )
    for column in ("configuration", "images/s", "first step s", "vs sgd, channels_last, fp32"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    reference = speed[Config("sgd")]
    for config in configs:
        table.add_row(
            config.label(),
            f"{speed[config]:.0f}",
            f"{first[config]:.1f}",
            f"{speed[config] / reference:.2f}x",
        )
    console = Console(width=120)
    console.print(table)

    def ratio(a: Config, b: Config) -> str:
        return f"{speed[a] / speed[b]:.2f}x"

    console.print(f"SAM step cost over SGD: {ratio(Config('sgd'), Config('sam'))} (expected ~2x)")
    console.print(f"AdaSAP step cost over SAM: {ratio(Config('sam'), Config('adasap'))}")
    console.print(f"channels_last speed-up: {ratio(Config('sgd'), Config('sgd', False))}")
    console.print(f"bf16 autocast speed-up: {ratio(Config('sgd', bf16=True), Config('sgd'))}")
    if args.compile:
        gain = ratio(Config("sgd", compile=True), Config("sgd"))
        console.print(f"torch.compile speed-up per step (fp32): {gain}")


if __name__ == "__main__":
    main()
