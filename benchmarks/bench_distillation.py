"""The cost of distillation from the dense model: training steps with and without the teacher.

Times ``Pruner.step`` on the demo model (ResNet-20 on 28 px, one channel, 10 classes) in a
distilled phase (fine-tuning), per method, with ``distill_weight`` 0 and 0.5, and the
teacher's inference-mode forward pass on its own. The teacher runs once per batch, so its cost
is one forward pass per step whatever the method: a larger share of a one-pass SGD step than of
a two-pass SAM/AdaSAP step. Configurations take turns in every round and the median round
counts, so a machine's load drifting over the run touches them alike.

    .venv/bin/python benchmarks/bench_distillation.py [--steps 10] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from adasap.method.pruner import Pruner
from adasap.method.schedule import PhaseSchedule
from adasap.models.builders import build_model


@dataclass(frozen=True)
class Row:
    method: str
    plain_ms: float  # per step, distill_weight 0
    distilled_ms: float  # per step, distill_weight 0.5
    teacher_ms: float  # the teacher's forward pass alone

    @property
    def overhead(self) -> float:
        return self.distilled_ms / self.plain_ms - 1


def _pruner(method: str, weight: float, batch: torch.Tensor, device: torch.device) -> Pruner:
    torch.manual_seed(0)
    model = build_model(
        "resnet20", num_classes=10, in_channels=1, image_size=28, mean=(0.5,), std=(0.25,)
    )
    model = model.to(device, memory_format=torch.channels_last)
    schedule = PhaseSchedule(0, 0, 10**6, removals=0)  # all fine-tuning: a distilled phase
    return Pruner(model, batch[:2], schedule, method=method, keep=1.0, distill_weight=weight,
                  optimizer_kwargs={"lr": 0.05, "momentum": 0.9})  # fmt: skip


def _timer(device: torch.device, work: Callable[[], object], steps: int) -> Callable[[], float]:
    """Milliseconds per call of ``work`` over ``steps`` calls (the GPU's queue drained)."""

    def time_it() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000 / steps

    return time_it


def _inference(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The teacher's forward pass as the Pruner runs it: in inference mode."""

    def forward() -> object:
        with torch.inference_mode():
            return model(x)

    return forward


def measure(
    methods: Sequence[str], steps: int, rounds: int, batch_size: int, device: torch.device
) -> list[Row]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 1, 28, 28, generator=g).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), generator=g).to(device)
    timers: dict[tuple[str, str], Callable[[], float]] = {}
    for method in methods:
        for name, weight in (("plain", 0.0), ("distilled", 0.5)):
            pruner = _pruner(method, weight, x, device)

            def closure(pruner: Pruner = pruner) -> torch.Tensor:
                logits = pruner.model(x)
                return pruner.distill_loss(logits, x, F.cross_entropy(logits, y))

            timers[method, name] = _timer(device, lambda p=pruner, c=closure: p.step(c), steps)
            if pruner.distillation is not None and ("teacher", "forward") not in timers:
                forward = _inference(pruner.distillation.teacher, x)
                timers["teacher", "forward"] = _timer(device, forward, steps)
    for time_it in timers.values():
        time_it()  # warm-up: allocations, kernel choice
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
    for _ in range(rounds):
        for key, time_it in timers.items():
            samples[key].append(time_it())
    median = {key: statistics.median(values) for key, values in samples.items()}
    teacher_ms = median["teacher", "forward"]
    return [
        Row(method, median[method, "plain"], median[method, "distilled"], teacher_ms)
        for method in methods
    ]


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["sgd", "sam", "adasap"])
    parser.add_argument("--steps", type=int, default=10, help="steps timed per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median counts")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = measure(args.methods, args.steps, args.rounds, args.batch_size, device)
    table = Table(title=f"distillation cost, ResNet-20 28 px, batch {args.batch_size}, {device}")
    for column in ("method", "ms/step", "distilled ms/step", "overhead", "teacher forward ms"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r.method,
            f"{r.plain_ms:.1f}",
            f"{r.distilled_ms:.1f}",
            f"{r.overhead:+.0%}",
            f"{r.teacher_ms:.1f}",
        )
    Console().print(table)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
