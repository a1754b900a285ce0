"""Training steps of pruned ResNet-20s against the dense one, by layout, precision and passes.

Issue #26 asks that a pruned training step in the default mode (bfloat16 autocast on a CPU
with native bf16, channels_last, batch 128) cost at most 1.25 x (MACs kept x the dense step).
This script prunes a ResNet-20 (28 px, 1 channel, 10 classes) in one shot to ``--keep`` of
its MACs (magnitude scores, through ``Pruner.remove``) once per ``--round-to``, and times
training steps through the ``Pruner`` (``sgd``: one pass; ``adasap``: two) of the dense and
every pruned model in each precision and layout:

- ``channels_last`` / ``contiguous``: the whole model in one layout (the oneDNN guard's layers
  compute contiguously either way);
- ``mixed``: channels_last, but every convolution with a channel count that is not a multiple
  of ``--alignment`` (16, the AVX-512 channel block) computes in the contiguous layout, its
  output returned in channels_last (a per-layer rule; docs/performance.md measured it slower).

Every configuration takes one step per round, in a shuffled order, so that load which comes
and goes hits all alike; a ratio is the median of the per-round ratios with its 95% interval
(``adasap.deploy.ratio``). ``--clock cpu`` times the process's CPU time instead of the wall
clock: with ``--threads 1`` it ignores other processes on a shared machine (with more threads
it also counts OpenMP's spinning). ``--layers`` adds, for the default mode, each layer's
convolution, BatchNorm and ReLU (forward and backward, timed alone) against the dense layer
at the same place: the layers that stay slow.

    .venv/bin/python benchmarks/bench_pruned_training.py               # ~4 min on 2 idle cores
    .venv/bin/python benchmarks/bench_pruned_training.py --threads 1 --clock cpu --layers
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from adasap.deploy.ratio import LatencyRatio
from adasap.io import atomic_write_json
from adasap.method.onednn_guard import compute_contiguously
from adasap.method.pruner import Pruner
from adasap.method.schedule import PhaseSchedule
from adasap.models.builders import build_model

GOAL = 1.25  # step / (MACs kept x dense step), issue #26
IMAGE = 28
Step = Callable[[], None]


class Setting(NamedTuple):
    precision: str  # bf16 | fp32
    layout: str  # channels_last | contiguous | mixed
    passes: int  # 1 (sgd) | 2 (adasap)

    def label(self) -> str:
        return (
            f"{self.precision}, {self.layout}, {self.passes} pass{'es' if self.passes > 1 else ''}"
        )


def build() -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        "resnet20", num_classes=10, in_channels=1, image_size=IMAGE, mean=(0.5,), std=(0.25,)
    )


def models(keep: float, round_tos: list[int]) -> dict[str, tuple[nn.Module, float]]:
    """``name -> (model, MACs kept)``: the dense model and one pruned per ``round_to``."""
    example = torch.rand(2, 1, IMAGE, IMAGE)
    found = {"dense": (build(), 1.0)}
    for round_to in round_tos:
        model = build()
        pruner = Pruner(model, example, PhaseSchedule(0, 1, 0), keep=keep, keep_kind="macs",
                        criterion="magnitude", round_to=round_to)  # fmt: skip
        dense_macs = pruner.size.macs
        pruner.remove(1.0)
        found[f"round_to {round_to}"] = (model, pruner.size.macs / dense_macs)
    return found


def convs(model: nn.Module) -> list[tuple[nn.Conv2d, int]]:
    """Every convolution with the side of its input, in the order they run."""
    found: list[tuple[nn.Conv2d, int]] = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: found.append((m, args[0].shape[-1])))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    model.eval()(torch.rand(1, 1, IMAGE, IMAGE))
    for hook in hooks:
        hook.remove()
    return found


def in_layout(model: nn.Module, layout: str, alignment: int) -> nn.Module:
    model = copy.deepcopy(model).train()
    last = layout != "contiguous"
    model.to(memory_format=torch.channels_last if last else torch.contiguous_format)
    if layout == "mixed":
        for conv, _ in convs(model):
            if conv.in_channels % alignment or conv.out_channels % alignment:
                compute_contiguously(conv)
        model.train()
    return model


def stepper(model: nn.Module, setting: Setting, batch_size: int) -> Step:
    """One training step through a Pruner (warm-up phase, no removals)."""
    memory_format = (
        torch.contiguous_format if setting.layout == "contiguous" else torch.channels_last
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 1, IMAGE, IMAGE, generator=generator)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch_size,), generator=generator)
    method = "sgd" if setting.passes == 1 else "adasap"
    pruner = Pruner(model, x[:2], PhaseSchedule(10**6, 0, 0, removals=0), method=method,
                    keep=1.0, optimizer_kwargs={"lr": 0.01, "momentum": 0.9})  # fmt: skip
    bf16 = setting.precision == "bf16"

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        return F.cross_entropy(logits.float(), y)

    return lambda: pruner.step(loss)


class OtherLoad:
    """The share of the CPUs that other processes used between ``start`` and ``share`` (Linux
    /proc/stat; None elsewhere): how busy the machine was while it timed."""

    @staticmethod
    def _ticks() -> tuple[int, int] | None:
        try:
            cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13]
        except (OSError, ValueError, IndexError):
            return None
        idle = cpu[3] + cpu[4]
        return sum(cpu) - idle - sum(int(v) for v in own), sum(cpu)

    def start(self) -> None:
        self.begin = self._ticks()

    def share(self) -> float | None:
        end = self._ticks()
        if self.begin is None or end is None or end[1] == self.begin[1]:
            return None
        return (end[0] - self.begin[0]) / (end[1] - self.begin[1])


def time_rounds(steps: dict[Any, Step], rounds: int, clock: Callable[[], float]) -> dict:
    """Times per key: one step of every key per round, in a new shuffled order each round."""
    for step in steps.values():  # oneDNN builds its kernels, autocast and the optimizer settle
        step()
        step()
    times: dict[Any, list[float]] = {key: [] for key in steps}
    order = list(steps)
    for index in range(rounds):
        random.Random(index).shuffle(order)
        for key in order:
            start = clock()
            steps[key]()
            times[key].append(clock() - start)
    return times


def interval(r: LatencyRatio, scale: float = 1.0) -> str:
    return f"{r.ratio / scale:.2f} ({r.low / scale:.2f}-{r.high / scale:.2f})"


def step_table(settings: list[Setting], found: dict, times: dict, console: Console) -> list:
    table = Table(title="Training step of the pruned model against the dense one")
    for column in ("setting", "model", "MACs kept", "step ms", "x dense", "x (MACs x dense)"):
        table.add_column(column, justify="left" if column in ("setting", "model") else "right")
    rows = []
    for setting in settings:
        dense = times[(setting, "dense")]
        for name, (_, macs) in found.items():
            own = times[(setting, name)]
            ratio = LatencyRatio.from_times(dense, own)
            row = {**setting._asdict(), "model": name, "macs_kept": macs,
                   "step_ms": 1000 * statistics.median(own), "ratio": ratio.ratio,
                   "ratio_low": ratio.low, "ratio_high": ratio.high}  # fmt: skip
            rows.append(row)
            table.add_row(setting.label(), name, f"{macs:.1%}", f"{row['step_ms']:.0f}",
                          interval(ratio), interval(ratio, macs))  # fmt: skip
    console.print(table)
    return rows


def layout_table(settings: list[Setting], found: dict, times: dict, console: Console) -> None:
    """Each layout's step against channels_last's, model by model: which layout is fastest."""
    table = Table(title="Step time against the same model in channels_last (below 1: faster)")
    for column in ("precision, passes", "model", "contiguous", "mixed"):
        table.add_column(column, justify="left" if column != "contiguous" else "right")
    for setting in settings:
        if setting.layout != "channels_last":
            continue
        for name in found:
            cells = []
            for layout in ("contiguous", "mixed"):
                other = setting._replace(layout=layout)
                if (other, name) in times:
                    ratio = LatencyRatio.from_times(times[(setting, name)], times[(other, name)])
                    cells.append(interval(ratio))
                else:
                    cells.append("-")
            table.add_row(f"{setting.precision}, {setting.passes}", name, *cells)
    console.print(table)


def layer_steps(conv: nn.Conv2d, side: int, batch_size: int) -> tuple[Step, Step]:
    """(conv alone, conv + BatchNorm + ReLU), forward and backward, bf16, channels_last."""
    conv = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    norm = nn.BatchNorm2d(conv.out_channels)
    x = torch.randn(batch_size, conv.in_channels, side, side, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(conv.in_channels > 1)

    def run(block: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = F.relu(norm(conv(x))) if block else conv(x)
        out.backward(torch.ones_like(out))

    return (lambda: run(False)), (lambda: run(True))


def layer_table(found: dict, args: argparse.Namespace, console: Console) -> None:
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    shapes = {name: convs(model) for name, (model, _) in found.items()}
    steps = {}
    for name, layers in shapes.items():
        for index, (conv, side) in enumerate(layers):
            conv_only, block = layer_steps(conv, side, args.batch_size)
            steps[(name, index, "conv")], steps[(name, index, "block")] = conv_only, block
    times = time_rounds(steps, args.rounds, clock)
    ms = {key: 1000 * statistics.median(value) for key, value in times.items()}
    for name in found:
        if name == "dense":
            continue
        table = Table(title=f"{name}: each layer (bf16, channels_last) against the dense layer")
        for column in ("layer", "in, out, k, stride, side", "conv ms", "BN+ReLU ms",
                       "x dense", "MACs x dense", "time / MACs"):  # fmt: skip
            table.add_column(column, justify="right")
        for index, ((conv, side), (dense, _)) in enumerate(
            zip(shapes[name], shapes["dense"], strict=True)
        ):
            own, base = ms[(name, index, "block")], ms[("dense", index, "block")]
            macs = conv.weight.numel() / dense.weight.numel()  # same place: same output side
            share = own / base
            conv_ms = ms[(name, index, "conv")]
            shape = f"{conv.in_channels}, {conv.out_channels}, {conv.kernel_size[0]}, "
            table.add_row(str(index), f"{shape}{conv.stride[0]}, {side}", f"{conv_ms:.2f}",
                          f"{own - conv_ms:.2f}", f"{share:.2f}", f"{macs:.2f}",
                          f"{share / macs:.2f}")  # fmt: skip
        console.print(table)


def goal_lines(rows: list[dict[str, Any]], console: Console) -> None:
    """The goal, for each pruned model in the default mode: met when the whole interval is."""
    for row in rows:
        if (row["precision"], row["layout"]) != ("bf16", "channels_last") or row[
            "model"
        ] == "dense":
            continue
        cost, low, high = (row[k] / row["macs_kept"] for k in ("ratio", "ratio_low", "ratio_high"))
        verdict = "met" if high <= GOAL else "not met" if low > GOAL else "undecided"
        console.print(f"default mode, {row['passes']} pass(es), {row['model']}: step = {cost:.2f}"
                      f" x (MACs kept x dense step), goal <= {GOAL}: {verdict}")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of the MACs kept")
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--precisions", nargs="+", choices=("bf16", "fp32"),
                        default=["bf16", "fp32"])  # fmt: skip
    parser.add_argument("--layouts", nargs="+", choices=("channels_last", "contiguous", "mixed"),
                        default=["channels_last", "contiguous", "mixed"])  # fmt: skip
    parser.add_argument("--passes", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    parser.add_argument("--alignment", type=int, default=16, help="the mixed layout's rule")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--layers", action="store_true", help="also time each layer alone")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch_size < 2 or not 0 < args.keep <= 1:
        parser.error("need --rounds >= 1, --batch-size >= 2 and 0 < --keep <= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=140)
    found = models(args.keep, args.round_to)
    settings = [Setting(p, layout, n) for n in args.passes for p in args.precisions
                for layout in args.layouts]  # fmt: skip
    steps = {(s, name): stepper(in_layout(model, s.layout, args.alignment), s, args.batch_size)
             for s in settings for name, (model, _) in found.items()}  # fmt: skip
    load = OtherLoad()
    load.start()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = time_rounds(steps, args.rounds, clock)
    busy = load.share()
    rows = step_table(settings, found, times, console)
    if len(args.layouts) > 1 and "channels_last" in args.layouts:
        layout_table(settings, found, times, console)
    goal_lines(rows, console)
    console.print(
        f"{args.threads} thread(s), {args.clock} clock, {args.rounds} rounds; other processes "
        f"used {'?' if busy is None else f'{busy:.0%}'} of the CPUs meanwhile"
    )
    if args.layers:
        layer_table(found, args, console)
    if args.json:
        atomic_write_json(args.json, {"threads": args.threads, "clock": args.clock,
                                      "other_load": busy, "rows": rows})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
