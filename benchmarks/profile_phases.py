"""Where the time of each pruning phase goes: the network's own compute, and everything else.

Prunes the default job's dense model (or a YAML config's, as ``adasap run`` takes it) with
``sgd`` and ``adasap`` for ``--epochs`` epochs per phase, and times with wall clocks, per phase:

- data: drawing the training batches (augmentation, the memory-layout copy);
- forward, backward: the model's training forward passes and the backward passes;
- perturbation: SAM/AdaSAP moving to ``w + e`` and back;
- optimizer: the base optimizer's ``step``;
- scores, radii: Taylor accumulation and the per-neuron radius refresh (AdaSAP);
- removal: choosing neurons, removing them, retracing, rebuilding the optimizer;
- validation: the per-epoch accuracy on the validation split;
- other: the rest (loss, metrics, Python).

Times are exclusive (a forward pass inside a removal counts as forward). It also reports the
median step time in the 10 steps after each removal against the phase's median, which shows
the cost of oneDNN building kernels for the new shapes. Only meaningful on an idle machine.

    .venv/bin/python benchmarks/profile_phases.py [CONFIG.yaml] [--epochs 1] [--methods ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import Any
from unittest import mock

import torch
import torch.optim.optimizer as optimizer_hooks
from rich.console import Console
from rich.table import Table

from adasap.experiments.config import from_flat, load_yaml
from adasap.experiments.dense import dense_model, load_data
from adasap.method import optim
from adasap.method.pruner import Pruner
from adasap.method.schedule import PHASES
from adasap.training import loop, pipeline

CATEGORIES = (
    "data", "forward", "backward", "perturbation", "optimizer", "scores, radii", "removal",
    "validation", "other",
)  # fmt: skip


class Clock:
    """Exclusive wall time per (phase, category): entering a region pauses the enclosing one."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.phase = PHASES[0]
        self._stack: list[tuple[str, float]] = []
        self.steps: list[tuple[str, int, float]] = []  # phase, step index, seconds
        self.removal_steps: list[int] = []

    @contextmanager
    def region(self, category: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:
            outer, since = self._stack[-1]
            self.seconds[(self.phase, outer)] += now - since
        self._stack.append((category, now))
        try:
            yield
        finally:
            now = time.perf_counter()
            _, since = self._stack.pop()
            self.seconds[(self.phase, category)] += now - since
            if self._stack:
                self._stack[-1] = (self._stack[-1][0], now)

    def wrap(self, category: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.region(category):
                return function(*args, **kwargs)

        return timed


def instrument(clock: Clock, stack: ExitStack) -> None:
    """Patch the pipeline's pieces so that ``clock`` sees each kind of work."""

    real_step, real_remove, real_init = Pruner.step, Pruner.remove, Pruner.__init__

    def timed_step(pruner: Pruner, closure: Callable[..., Any]) -> torch.Tensor:
        clock.phase = pruner.phase
        start = time.perf_counter()
        with clock.region("other"):
            loss = real_step(pruner, closure)
        clock.steps.append((clock.phase, pruner.steps_done, time.perf_counter() - start))
        return loss

    def timed_remove(pruner: Pruner, *args: Any, **kwargs: Any) -> torch.Tensor:
        clock.removal_steps.append(pruner.steps_done)
        with clock.region("removal"):
            return real_remove(pruner, *args, **kwargs)

    def timed_source(*args: Any, **kwargs: Any) -> Any:
        source = real_source(*args, **kwargs)
        epoch = source.epoch

        def timed_epoch(*a: Any, **k: Any) -> Iterator[Any]:
            batches = epoch(*a, **k)
            while True:
                with clock.region("data"):
                    batch = next(batches, None)
                if batch is None:
                    return
                yield batch

        source.epoch = timed_epoch
        return source

    real_source = pipeline.training_source

    def forward_hooks(model: torch.nn.Module) -> None:
        regions: list[Any] = []

        def enter(module: torch.nn.Module, inputs: Any) -> None:
            if module.training:
                regions.append(clock.region("forward"))
                regions[-1].__enter__()

        def leave(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if module.training and regions:
                regions.pop().__exit__(None, None, None)

        model.register_forward_pre_hook(enter)
        model.register_forward_hook(leave)

    def init(pruner: Pruner, model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        real_init(pruner, model, *args, **kwargs)
        forward_hooks(model)

    stack.enter_context(mock.patch.object(Pruner, "__init__", init))
    stack.enter_context(mock.patch.object(Pruner, "step", timed_step))
    stack.enter_context(mock.patch.object(Pruner, "remove", timed_remove))
    stack.enter_context(
        mock.patch.object(
            Pruner,
            "_after_first_backward",
            clock.wrap("scores, radii", Pruner._after_first_backward),
        )
    )
    stack.enter_context(
        mock.patch.object(optim, "_backward", clock.wrap("backward", optim._backward))
    )
    for name in ("first_step", "restore"):
        real = getattr(optim.SAM, name)
        stack.enter_context(mock.patch.object(optim.SAM, name, clock.wrap("perturbation", real)))
    stack.enter_context(mock.patch.object(pipeline, "training_source", timed_source))
    stack.enter_context(
        mock.patch.object(
            loop, "evaluate_accuracy", clock.wrap("validation", loop.evaluate_accuracy)
        )
    )
    regions: list[Any] = []

    def before_optimizer(optimizer: Any, args: Any, kwargs: Any) -> None:
        regions.append(clock.region("optimizer"))
        regions[-1].__enter__()

    def after_optimizer(optimizer: Any, args: Any, kwargs: Any) -> None:
        regions.pop().__exit__(None, None, None)

    for handle in (
        optimizer_hooks.register_optimizer_step_pre_hook(before_optimizer),
        optimizer_hooks.register_optimizer_step_post_hook(after_optimizer),
    ):
        stack.callback(handle.remove)


def after_removals(clock: Clock) -> dict[str, float]:
    """Per phase: median step time in the 10 steps after a removal / the phase's median step."""
    ratios = {}
    for phase in PHASES:
        times = {step: seconds for p, step, seconds in clock.steps if p == phase}
        after = [times[s + k] for s in clock.removal_steps for k in range(1, 11) if s + k in times]
        if after and len(times) > 20:
            ratios[phase] = statistics.median(after) / statistics.median(times.values())
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML file of the job (default: the defaults)")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs per phase")
    parser.add_argument("--methods", nargs="+", default=["sgd", "adasap"])
    args = parser.parse_args()
    config = from_flat(load_yaml(args.config) if args.config else {}).validate()
    console = Console(width=140)
    data = load_data(config)
    dense, _ = dense_model(config, data, console)
    table = Table(
        title=f"{config.dataset}, {config.model}, {args.epochs} epoch(s) per phase: "
        "share of each phase's time"
    )
    for column in ("method", "phase", "seconds", *CATEGORIES, "after a removal"):
        table.add_column(column, justify="left" if column in ("method", "phase") else "right")
    for method in args.methods:
        clock = Clock()
        settings = replace(
            config.prune,
            method=method,
            warmup_epochs=args.epochs,
            prune_epochs=args.epochs,
            finetune_epochs=args.epochs,
        )
        with ExitStack() as stack:
            instrument(clock, stack)
            pipeline.prune(dense, data, settings=settings, progress=False)
        slowdown = after_removals(clock)
        for phase in PHASES:
            seconds = {c: clock.seconds.get((phase, c), 0.0) for c in CATEGORIES}
            total = sum(seconds.values())
            table.add_row(
                method,
                phase,
                f"{total:.1f}",
                *(f"{seconds[c] / total:.0%}" for c in CATEGORIES),
                f"{slowdown[phase]:.2f}x" if phase in slowdown else "-",
            )
    console.print(table)
    console.print(f"{torch.get_num_threads()} threads, amp {config.prune.amp}")


if __name__ == "__main__":
    main()
