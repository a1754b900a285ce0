"""Timing forward passes in a runtime: runs taking turns, one model, several models, the machine.

Models are deployed to a runtime (:mod:`adasap.deploy.runtimes`) and timed there; where the
runtime allows (PyTorch), they take turns at each repeat, so that a change in machine load hits
all of them alike. :class:`TimingSettings` says how latency budgets time (see
:mod:`adasap.deploy.budget`); :mod:`adasap.deploy.comparison` times dense beside pruned.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from adasap.deploy.onnx import resolve_model
from adasap.deploy.runtimes import DEFAULT_RUNTIME, RUNTIMES, get_runtime
from adasap.devices import resolve_device
from adasap.errors import UserError

# a latency batch beyond this is no deployment setting, and its input alone could fill memory
MAX_BATCH_SIZE = 4096


def time_interleaved(
    runs: Sequence[Callable[[], object]],
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Milliseconds of each of ``repeats`` calls of every run, after ``warmup`` calls.

    The runs take turns, one call each per round (A B A B ...), so that a change in machine
    load hits all of them alike and the ratio of their latencies stays fair on a shared
    machine; ``times[k][i]`` is run ``k`` in round ``i``. ``clock`` gives seconds. A run
    returns once its work is done (a CUDA run synchronises: :meth:`DeployedModel.runner`).
    """
    with torch.inference_mode():
        for _ in range(warmup):
            for run in runs:
                run()
        times: list[list[float]] = [[] for _ in runs]
        for _ in range(repeats):
            for run, out in zip(runs, times, strict=True):
                start = clock()
                run()
                out.append((clock() - start) * 1e3)
    return times


def time_runs(
    runs: Sequence[Callable[[], object]], warmup: int, repeats: int, *, interleaved: bool
) -> list[list[float]]:
    """:func:`time_interleaved` where the runtime lets the runs take turns
    (:attr:`Runtime.interleaved`), else the runs one after the other, each with its own
    warm-up: a session that keeps its threads spinning for a while after a run would,
    taking turns, steal the cores from the next one."""
    if interleaved:
        return time_interleaved(runs, warmup, repeats)
    return [time_interleaved([run], warmup, repeats)[0] for run in runs]


@dataclass(frozen=True)
class LatencyResult:
    """Latency of one forward pass at one batch size: median and p10/p90 over the repeats."""

    runtime: str
    device: str
    batch_size: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    @classmethod
    def from_times(
        cls, times: Sequence[float], runtime: str, device: str, batch_size: int
    ) -> LatencyResult:
        p10, median, p90 = np.percentile(times, [10, 50, 90])
        return cls(runtime, device, batch_size, float(median), float(p10), float(p90), len(times))

    @property
    def images_per_second(self) -> float:
        return self.batch_size * 1e3 / self.median_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": self.images_per_second}


def check_timing(runtime: str, batch_sizes: Sequence[int], warmup: int, repeats: int) -> None:
    RUNTIMES.get(runtime)  # an unknown name is a one-line error listing the runtimes
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UserError(f"batch sizes must be >= 1, got {list(batch_sizes)}: e.g. 1 64")
    if max(batch_sizes) > MAX_BATCH_SIZE:  # each batch is allocated at once, on the device
        raise UserError(
            f"batch sizes must be <= {MAX_BATCH_SIZE}, got {max(batch_sizes)}: e.g. 1 64"
        )
    if warmup < 0 or repeats < 1:
        raise UserError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")


@dataclass(frozen=True)
class TimingSettings:
    """How a latency budget is timed: its per-layer table and the whole model.

    Timing happens in ``runtime`` (:data:`~adasap.deploy.runtimes.RUNTIMES`) on ``device`` at
    ``batch_size``, whatever device the model trains on. Each layer's table grid has
    ``points`` channel counts per prunable axis; every measurement makes ``warmup`` untimed
    and ``repeats`` timed passes. ``cache_dir`` holds the tables (default
    :func:`adasap.deploy.table.default_cache_dir`).
    """

    batch_size: int = 1
    device: str = "cpu"
    points: int = 6
    warmup: int = 3
    repeats: int = 15
    cache_dir: str | Path | None = None
    runtime: str = DEFAULT_RUNTIME

    def __post_init__(self) -> None:
        check_timing(self.runtime, (self.batch_size,), self.warmup, self.repeats)
        if self.points < 2:
            raise UserError(f"a latency grid needs >= 2 points per axis, got {self.points}")


DEFAULT_TIMING = TimingSettings()


def model_times(
    models: Sequence[nn.Module],
    shape: Sequence[int],
    *,
    batch_sizes: Sequence[int],
    runtime: str,
    device: str,
    warmup: int,
    repeats: int,
    images: Tensor | None = None,
) -> list[list[list[float]]]:
    """Per model and batch size, the milliseconds of each timed pass in ``runtime``.

    In an interleaved runtime (PyTorch) the models take turns at each repeat
    (``times[m][b][i]`` of every model ``m`` come from one round ``i``); in the others they
    are timed one after the other. Inputs are random, or real ``images``
    (:func:`~adasap.deploy.runtimes.image_batch`).
    """
    check_timing(runtime, batch_sizes, warmup, repeats)
    deployer = get_runtime(runtime)
    where = resolve_device(device)
    times: list[list[list[float]]] = [[] for _ in models]
    with tempfile.TemporaryDirectory(prefix="adasap-latency-") as tmp:
        deployed = []
        for k, model in enumerate(models):
            workdir = Path(tmp) / f"model{k}"
            workdir.mkdir()
            deployed.append(
                deployer.deploy(model, shape, device=where, workdir=workdir, images=images)
            )
        for batch in batch_sizes:
            runs = [model.runner(batch) for model in deployed]
            measured = time_runs(runs, warmup, repeats, interleaved=deployer.interleaved)
            for out, t in zip(times, measured, strict=True):
                out.append(t)
    return times


def time_models(
    models: Sequence[nn.Module],
    shape: Sequence[int],
    *,
    batch_sizes: Sequence[int],
    runtime: str,
    device: str,
    warmup: int,
    repeats: int,
) -> list[list[LatencyResult]]:
    """Per model, a result per batch size (:func:`model_times`)."""
    times = model_times(
        models,
        shape,
        batch_sizes=batch_sizes,
        runtime=runtime,
        device=device,
        warmup=warmup,
        repeats=repeats,
    )
    where = str(resolve_device(device))
    return [
        [
            LatencyResult.from_times(t, runtime, where, batch)
            for t, batch in zip(per_batch, batch_sizes, strict=True)
        ]
        for per_batch in times
    ]


def measure_latency(
    model: nn.Module | str | Path,
    input_shape: Sequence[int] | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    runtime: str = DEFAULT_RUNTIME,
    device: str = "cpu",
    warmup: int = 5,
    repeats: int = 20,
) -> list[LatencyResult]:
    """Latency of one forward pass at each batch size in ``runtime``, after ``warmup``
    untimed passes.

    ``model`` may be a saved model directory; its architecture then gives ``input_shape``
    (``(C, H, W)`` per sample). A copy is deployed, so the model is left as it is.
    """
    image_size = None if input_shape is None else tuple(input_shape[1:])
    model, shape, _ = resolve_model(model, image_size)
    (results,) = time_models(
        [model],
        shape,
        batch_sizes=batch_sizes,
        runtime=runtime,
        device=device,
        warmup=warmup,
        repeats=repeats,
    )
    return results


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What latency depends on besides the model: platform, CPU, threads, torch, GPU."""
    dev = resolve_device(device)
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }
