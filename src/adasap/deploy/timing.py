"""Timing forward passes: runs taking turns, one model, several models, the machine.

PyTorch runs take turns at each repeat, so that a change in machine load hits all of them alike;
:class:`TimingSettings` says how latency budgets time (see :mod:`adasap.deploy.budget`);
:mod:`adasap.deploy.comparison` times dense beside pruned.
"""

from __future__ import annotations

import copy
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

from adasap.deploy.onnx import onnx_session, resolve_model, write_onnx
from adasap.devices import resolve_device
from adasap.errors import UserError, quote

BACKENDS = ("torch", "onnxruntime")
# a latency batch beyond this is no deployment setting, and its input alone could fill memory
MAX_BATCH_SIZE = 4096


def _no_sync() -> None:
    pass


def time_interleaved(
    runs: Sequence[Callable[[], object]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] = _no_sync,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Milliseconds of each of ``repeats`` calls of every run, after ``warmup`` calls.

    The runs take turns, one call each per round (A B A B ...), so that a change in machine
    load hits all of them alike and the ratio of their latencies stays fair on a shared
    machine; ``times[k][i]`` is run ``k`` in round ``i``. ``clock`` gives seconds.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            for run in runs:
                run()
        sync()
        times: list[list[float]] = [[] for _ in runs]
        for _ in range(repeats):
            for run, out in zip(runs, times, strict=True):
                start = clock()
                run()
                sync()  # CUDA runs asynchronously: stop the clock once its kernels are done
                out.append((clock() - start) * 1e3)
    return times


def device_sync(backend: str, device: torch.device) -> Callable[[], None]:
    # onnxruntime copies its outputs to the host, which waits for the device by itself.
    if backend == "torch" and device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return _no_sync


def forward_runner(
    model: nn.Module,
    shape: Sequence[int],
    backend: str,
    device: torch.device,
    onnx_path: Path | None = None,
    inputs: dict[tuple[int, ...], Tensor] | None = None,
    images: Tensor | None = None,
) -> Callable[[int], Callable[[], object]]:
    """For a batch size, a call that runs one forward pass of ``model`` on ``backend``.

    PyTorch runs a copy in eval mode, channels_last on the CPU, the layout adasap trains in
    (oneDNN's fastest for convolutions; PyTorch's own convolution, which it picks at batch 1
    for small inputs, is fast in it only with channel counts in multiples of 8: see
    docs/deployment.md); onnxruntime runs an export written to ``onnx_path``. Calls given the
    same ``inputs`` dict share their input tensors (for layers, which never write to them).
    The input is random unless ``images`` (``N x *shape``) are given: :func:`image_batch`.
    """
    if backend == "onnxruntime":
        if onnx_path is None:
            raise ValueError("timing onnxruntime needs onnx_path to export the model to")
        session = onnx_session(write_onnx(model, onnx_path, tuple(shape)), device.type)
        (graph_input,) = session.get_inputs()

        def onnx_at(batch: int) -> Callable[[], object]:
            feed = {graph_input.name: image_batch(images, batch, shape).numpy()}
            return lambda: session.run(None, feed)

        return onnx_at
    channels_last = device.type == "cpu" and len(shape) == 3
    timed = copy.deepcopy(model).eval().to(device)
    if channels_last:
        timed = timed.to(memory_format=torch.channels_last)

    def torch_at(batch: int) -> Callable[[], object]:
        key = (batch, *shape)
        x = inputs.get(key) if inputs is not None else None
        if x is None:
            x = image_batch(images, batch, shape).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if inputs is not None:
                inputs[key] = x
        return lambda: timed(x)

    return torch_at


def image_batch(images: Tensor | None, batch: int, shape: Sequence[int]) -> Tensor:
    """A float32 CPU batch of ``batch`` inputs of ``shape``: the first of ``images``, repeated
    in turn when there are fewer, or uniform random ones without ``images``.

    A classifier's time does not depend on its input's values, a detector's does: its
    post-processing (top-k, NMS) grows with the boxes above the score threshold, many more
    on noise than on a real image for some models (docs/detection.md).
    """
    if images is None:
        return torch.rand(batch, *shape)
    if images.ndim != len(shape) + 1 or tuple(images.shape[1:]) != tuple(shape) or not len(images):
        raise UserError(
            f"timing images of shape {tuple(images.shape)} do not fit inputs of shape "
            f"{tuple(shape)}: pass N x {' x '.join(map(str, shape))} images"
        )
    picks = torch.arange(batch) % len(images)
    return images.detach().cpu().float()[picks].contiguous()


@dataclass(frozen=True)
class LatencyResult:
    """Latency of one forward pass at one batch size: median and p10/p90 over the repeats."""

    backend: str
    device: str
    batch_size: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    @classmethod
    def from_times(
        cls, times: Sequence[float], backend: str, device: str, batch_size: int
    ) -> LatencyResult:
        p10, median, p90 = np.percentile(times, [10, 50, 90])
        return cls(backend, device, batch_size, float(median), float(p10), float(p90), len(times))

    @property
    def images_per_second(self) -> float:
        return self.batch_size * 1e3 / self.median_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": self.images_per_second}


def check_timing(backend: str, batch_sizes: Sequence[int], warmup: int, repeats: int) -> None:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {quote(backend)}: choose one of {', '.join(BACKENDS)}")
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

    Timing happens on ``device`` at ``batch_size``, whatever device the model trains on. Each
    layer's table grid has ``points`` channel counts per prunable axis; every measurement
    makes ``warmup`` untimed and ``repeats`` timed passes. ``cache_dir`` holds the tables
    (default :func:`adasap.deploy.table.default_cache_dir`).
    """

    batch_size: int = 1
    device: str = "cpu"
    points: int = 6
    warmup: int = 3
    repeats: int = 15
    cache_dir: str | Path | None = None

    def __post_init__(self) -> None:
        check_timing("torch", (self.batch_size,), self.warmup, self.repeats)
        if self.points < 2:
            raise UserError(f"a latency grid needs >= 2 points per axis, got {self.points}")


DEFAULT_TIMING = TimingSettings()


def model_times(
    models: Sequence[nn.Module],
    shape: Sequence[int],
    *,
    batch_sizes: Sequence[int],
    backend: str,
    device: str,
    warmup: int,
    repeats: int,
    images: Tensor | None = None,
) -> list[list[list[float]]]:
    """Per model and batch size, the milliseconds of each timed pass.

    PyTorch models take turns at each repeat (``times[m][b][i]`` of every model ``m`` come from
    one round ``i``); onnxruntime sessions are timed one after the other. Inputs are random,
    or real ``images`` (:func:`image_batch`).
    """
    check_timing(backend, batch_sizes, warmup, repeats)
    dev = resolve_device(device)
    times: list[list[list[float]]] = [[] for _ in models]
    with tempfile.TemporaryDirectory(prefix="adasap-latency-") as tmp:
        forwards = [
            forward_runner(model, shape, backend, dev, Path(tmp) / f"model{k}.onnx", images=images)
            for k, model in enumerate(models)
        ]
        for batch in batch_sizes:
            runs = [at(batch) for at in forwards]
            if backend == "onnxruntime":
                # Each session spins its own threads for a while after a run: taking turns,
                # they would steal the cores from each other. One session at a time instead.
                measured = [time_interleaved([run], warmup, repeats)[0] for run in runs]
            else:
                measured = time_interleaved(runs, warmup, repeats, device_sync(backend, dev))
            for out, t in zip(times, measured, strict=True):
                out.append(t)
    return times


def time_models(
    models: Sequence[nn.Module],
    shape: Sequence[int],
    *,
    batch_sizes: Sequence[int],
    backend: str,
    device: str,
    warmup: int,
    repeats: int,
) -> list[list[LatencyResult]]:
    """Per model, a result per batch size; PyTorch models take turns at each batch size."""
    times = model_times(
        models,
        shape,
        batch_sizes=batch_sizes,
        backend=backend,
        device=device,
        warmup=warmup,
        repeats=repeats,
    )
    where = str(resolve_device(device))
    return [
        [
            LatencyResult.from_times(t, backend, where, batch)
            for t, batch in zip(per_batch, batch_sizes, strict=True)
        ]
        for per_batch in times
    ]


def measure_latency(
    model: nn.Module | str | Path,
    input_shape: Sequence[int] | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    backend: str = "torch",
    device: str = "cpu",
    warmup: int = 5,
    repeats: int = 20,
) -> list[LatencyResult]:
    """Latency of one forward pass at each batch size, after ``warmup`` untimed passes.

    ``model`` may be a saved model directory; its architecture then gives ``input_shape``
    (``(C, H, W)`` per sample). A copy is timed, so the model is left as it is: PyTorch eager
    (``"torch"``) on the CPU or CUDA, or onnxruntime (``"onnxruntime"``) on an ONNX export.
    """
    image_size = None if input_shape is None else tuple(input_shape[1:])
    model, shape, _ = resolve_model(model, image_size)
    (results,) = time_models(
        [model],
        shape,
        batch_sizes=batch_sizes,
        backend=backend,
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
