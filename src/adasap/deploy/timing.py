"""Timing forward passes: one model, dense beside pruned, and every model of a run.

PyTorch runs take turns at each repeat, so that a change in machine load hits all of them alike;
:class:`TimingSettings` says how latency budgets time (see :mod:`adasap.deploy.budget`).
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from torch import Tensor, nn

from adasap.deploy.onnx import (
    INPUT_NAME,
    find_models,
    onnx_runs_on,
    onnx_session,
    resolve_model,
    write_onnx,
)
from adasap.deploy.serialization import load_model, read_description
from adasap.devices import resolve_device
from adasap.errors import UserError
from adasap.models.builders import build_model

BACKENDS = ("torch", "onnxruntime")


def _no_sync() -> None:
    pass


def time_interleaved(
    runs: Sequence[Callable[[], object]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] = _no_sync,
) -> list[list[float]]:
    """Milliseconds of each of ``repeats`` calls of every run, after ``warmup`` calls.

    The runs take turns, so that a change in machine load hits all of them alike and the
    ratio of their latencies stays fair on a shared machine.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            for run in runs:
                run()
        sync()
        times: list[list[float]] = [[] for _ in runs]
        for _ in range(repeats):
            for run, out in zip(runs, times, strict=True):
                start = time.perf_counter()
                run()
                sync()  # CUDA runs asynchronously: stop the clock once its kernels are done
                out.append((time.perf_counter() - start) * 1e3)
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
) -> Callable[[int], Callable[[], object]]:
    """For a batch size, a call that runs one forward pass of ``model`` on ``backend``.

    PyTorch runs a copy in eval mode, channels_last on the CPU (oneDNN's fastest layout for
    convolutions); onnxruntime runs an export written to ``onnx_path``. Calls given the same
    ``inputs`` dict share their input tensors (for layers, which never write to them).
    """
    if backend == "onnxruntime":
        if onnx_path is None:
            raise ValueError("timing onnxruntime needs onnx_path to export the model to")
        session = onnx_session(write_onnx(model, onnx_path, tuple(shape)), device.type)

        def onnx_at(batch: int) -> Callable[[], object]:
            feed = {INPUT_NAME: np.random.rand(batch, *shape).astype(np.float32)}
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
            x = torch.rand(batch, *shape, device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if inputs is not None:
                inputs[key] = x
        return lambda: timed(x)

    return torch_at


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
        raise UserError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UserError(f"batch sizes must be >= 1, got {list(batch_sizes)}: e.g. 1 64")
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
    check_timing(backend, batch_sizes, warmup, repeats)
    dev = resolve_device(device)
    results: list[list[LatencyResult]] = [[] for _ in models]
    with tempfile.TemporaryDirectory(prefix="adasap-latency-") as tmp:
        forwards = [
            forward_runner(model, shape, backend, dev, Path(tmp) / f"model{k}.onnx")
            for k, model in enumerate(models)
        ]
        for batch in batch_sizes:
            runs = [at(batch) for at in forwards]
            if backend == "onnxruntime":
                # Each session spins its own threads for a while after a run: taking turns,
                # they would steal the cores from each other. One session at a time instead.
                times = [time_interleaved([run], warmup, repeats)[0] for run in runs]
            else:
                times = time_interleaved(runs, warmup, repeats, device_sync(backend, dev))
            for out, t in zip(results, times, strict=True):
                out.append(LatencyResult.from_times(t, backend, str(dev), batch))
    return results


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
    model, shape = resolve_model(model, image_size)
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


@dataclass
class LatencyComparison:
    """Dense beside pruned latency, one row per (pruned model, backend, batch size)."""

    rows: list[dict[str, Any]]
    machine: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "rows": self.rows}

    def table(self, title: str = "Inference latency, dense vs pruned") -> Table:
        where = self.machine["device"]
        if where == "cpu":
            where = f"{self.machine['cpu']}, {self.machine['threads']} threads"
        table = Table(title=f"{title} ({where})")
        for column in ("model", "backend", "batch", "dense ms", "pruned ms", "speedup", "img/s"):
            table.add_column(column, justify="left" if column in ("model", "backend") else "right")
        for r in self.rows:
            table.add_row(
                r["model"],
                r["backend"],
                str(r["batch_size"]),
                f"{r['dense_ms']:.2f} ({r['dense_p10_ms']:.2f}-{r['dense_p90_ms']:.2f})",
                f"{r['pruned_ms']:.2f} ({r['pruned_p10_ms']:.2f}-{r['pruned_p90_ms']:.2f})",
                f"{r['speedup']:.2f}x",
                f"{r['pruned_images_per_second']:,.0f}",
            )
        table.caption = "median (p10-p90) per forward pass; img/s of the pruned model"
        return table


def compare_latency(
    dense: nn.Module,
    pruned: nn.Module | Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    backends: Sequence[str] = ("torch",),
    device: str = "cpu",
    warmup: int = 5,
    repeats: int = 20,
) -> LatencyComparison:
    """Time the dense model and each pruned one; speedup = dense / pruned.

    With PyTorch the models take turns at each repeat, so that a change in machine load hits
    them alike; onnxruntime sessions are timed one after the other (see :func:`time_models`).
    """
    models = dict(pruned) if isinstance(pruned, Mapping) else {"pruned": pruned}
    rows = []
    for backend in backends:
        base, *others = time_models(
            [dense, *models.values()],
            input_shape,
            batch_sizes=batch_sizes,
            backend=backend,
            device=device,
            warmup=warmup,
            repeats=repeats,
        )
        for name, results in zip(models, others, strict=True):
            for d, p in zip(base, results, strict=True):
                rows.append(
                    {
                        "model": name,
                        "backend": backend,
                        "device": d.device,
                        "batch_size": d.batch_size,
                        "dense_ms": d.median_ms,
                        "pruned_ms": p.median_ms,
                        "speedup": d.median_ms / p.median_ms,
                        "dense_p10_ms": d.p10_ms,
                        "dense_p90_ms": d.p90_ms,
                        "pruned_p10_ms": p.p10_ms,
                        "pruned_p90_ms": p.p90_ms,
                        "dense_images_per_second": d.images_per_second,
                        "pruned_images_per_second": p.images_per_second,
                    }
                )
    return LatencyComparison(rows, machine_info(device))


def run_latency(
    run_dir: str | Path,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    backends: Sequence[str] | None = None,
    device: str = "cpu",
    warmup: int = 5,
    repeats: int = 20,
) -> LatencyComparison:
    """Every pruned model of a run directory beside its dense architecture.

    ``backends`` defaults to PyTorch, and onnxruntime where it runs on ``device``. The dense
    model is rebuilt with fresh weights from the saved architecture: latency does not depend
    on the weight values, and the trained dense model lives in a cache the run does not point
    to.
    """
    if backends is None:
        backends = BACKENDS if onnx_runs_on(device) else ("torch",)
    models = find_models(run_dir)
    architecture = read_description(next(iter(models.values())))["architecture"]
    pruned = {name: load_model(path) for name, path in models.items()}
    size = int(architecture["image_size"])
    return compare_latency(
        build_model(**architecture),
        pruned,
        (int(architecture["in_channels"]), size, size),
        batch_sizes=batch_sizes,
        backends=backends,
        device=device,
        warmup=warmup,
        repeats=repeats,
    )
