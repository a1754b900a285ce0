"""Inference latency: timing models, dense beside pruned, and pruning to a latency budget.

Latency-budget pruning (AdaSAP_L) follows HALP (Shen et al., 2022): a table holds the
measured latency of every prunable layer over a grid of (input, output) channel counts on this
machine; the model's latency after a removal is predicted as the sum of its layers' table
entries (bilinear in the kept channel counts) plus the rest of the model, anchored on its
measured latency (see :func:`latency_predictor`); neurons are ranked by importance per
millisecond they save, and :func:`adasap.pruning.select_neurons` removes the lowest-ranked
ones until the prediction meets the budget.

Wiring ``PruneSettings.keep_kind == "latency"`` into an iterative pipeline::

    budget = latency_budget(layout, example_inputs, keep)  # once, on the dense model
    target = budget.dense_ms - (budget.dense_ms - budget.target_ms) * step / steps
    chosen = budget.select(layout, scores, target, min_channels)  # at each pruning step
    remove_neurons(layout, chosen)  # then rebuild the layout as for any other target

``budget.select`` calls ``select_neurons(layout, latency_ranking(layout, scores, table),
target, latency_predictor(layout, table, budget.current_ms), "ms", min_channels)`` and keeps
``budget.current_ms`` (the predicted latency of the pruned model) for the next step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import tempfile
import time
import warnings
from bisect import bisect_right
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
from adasap.errors import UserError
from adasap.io import atomic_write_json, cache_root
from adasap.method.importance import magnitude_scores, normalize_scores
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import UnreachableTarget, remove_neurons, select_neurons, sliced_axes
from adasap.models.builders import build_model
from adasap.training.loop import resolve_device

BACKENDS = ("torch", "onnxruntime")
TABLE_FORMAT = "adasap-latency-table"
TABLE_VERSION = 1
# Groups whose removal saves less than this get ranked as if they saved this much (no 1/0).
_MIN_SAVING_MS = 1e-6
# A spread p90 / p10 above this means other processes disturb the timings.
_NOISY = 1.5


# --------------------------------------------------------------------------- timing


def _no_sync() -> None:
    pass


def _interleaved(
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


def _sync(backend: str, device: torch.device) -> Callable[[], None]:
    # onnxruntime copies its outputs to the host, which waits for the device by itself.
    if backend == "torch" and device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return _no_sync


def _forward(
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


def _check_timing(backend: str, batch_sizes: Sequence[int], warmup: int, repeats: int) -> None:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UserError(f"batch sizes must be >= 1, got {list(batch_sizes)}: e.g. 1 64")
    if warmup < 0 or repeats < 1:
        raise UserError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")


def _time_models(
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
    _check_timing(backend, batch_sizes, warmup, repeats)
    dev = resolve_device(device)
    results: list[list[LatencyResult]] = [[] for _ in models]
    with tempfile.TemporaryDirectory(prefix="adasap-latency-") as tmp:
        forwards = [
            _forward(model, shape, backend, dev, Path(tmp) / f"model{k}.onnx")
            for k, model in enumerate(models)
        ]
        for batch in batch_sizes:
            runs = [at(batch) for at in forwards]
            if backend == "onnxruntime":
                # Each session spins its own threads for a while after a run: taking turns,
                # they would steal the cores from each other. One session at a time instead.
                times = [_interleaved([run], warmup, repeats)[0] for run in runs]
            else:
                times = _interleaved(runs, warmup, repeats, _sync(backend, dev))
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
    (results,) = _time_models(
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
    them alike; onnxruntime sessions are timed one after the other (see :func:`_time_models`).
    """
    models = dict(pruned) if isinstance(pruned, Mapping) else {"pruned": pruned}
    rows = []
    for backend in backends:
        base, *others = _time_models(
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


# --------------------------------------------------------------------------- latency table


@dataclass(frozen=True)
class LayerSpec:
    """A prunable layer as the table times it: a conv (with its BatchNorm) or a linear layer.

    ``prune_in`` / ``prune_out`` say which channel counts the layout can change; a depthwise
    conv has one count (its input follows its output).
    """

    kind: str
    in_channels: int
    out_channels: int
    prune_in: bool
    prune_out: bool
    bias: bool
    batchnorm: bool
    kernel_size: tuple[int, ...] = (1, 1)
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] | str = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    depthwise: bool = False
    input_size: tuple[int, int] = (1, 1)

    def key(self, points: int) -> str:
        return json.dumps({**asdict(self), "points": points}, sort_keys=True)

    def build(self, cin: int, cout: int) -> nn.Module:
        if self.kind == "linear":
            layer: nn.Module = nn.Linear(cin, cout, bias=self.bias)
            norm: nn.Module = nn.BatchNorm1d(cout)
        else:
            layer = nn.Conv2d(
                cout if self.depthwise else cin,
                cout,
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                groups=cout if self.depthwise else 1,
                bias=self.bias,
            )
            norm = nn.BatchNorm2d(cout)
        return nn.Sequential(layer, norm) if self.batchnorm else layer

    def input_shape(self, cin: int, cout: int) -> tuple[int, ...]:
        """The per-sample input of the layer with ``cin`` inputs and ``cout`` outputs."""
        if self.kind == "linear":
            return (cin,)
        return (cout if self.depthwise else cin, *self.input_size)

    def grid(self, points: int) -> tuple[list[int], list[int]]:
        """Channel counts to time: ``points`` spread over 1..full on each prunable axis."""

        def spread(size: int, pruned: bool) -> list[int]:
            if not pruned:
                return [size]
            return sorted({max(1, round(size * k / (points - 1))) for k in range(points)})

        return spread(self.in_channels, self.prune_in), spread(self.out_channels, self.prune_out)


def _bracket(grid: Sequence[int], x: float) -> tuple[int, int, float]:
    """Neighbouring grid indices around ``x`` and the weight of the upper one."""
    if len(grid) == 1:
        return 0, 0, 0.0
    i = min(max(bisect_right(grid, x) - 1, 0), len(grid) - 2)
    weight = (x - grid[i]) / (grid[i + 1] - grid[i])
    return i, i + 1, min(max(weight, 0.0), 1.0)


@dataclass(frozen=True)
class LayerGrid:
    """``ms[i][j]``: latency at ``ins[i]`` input and ``outs[j]`` output channels.

    Made non-decreasing along both axes when measured (timing noise must not make a smaller
    layer look slower), so interpolated predictions never grow when channels are removed.
    """

    ins: list[int]
    outs: list[int]
    ms: list[list[float]]

    def at(self, cin: float, cout: float) -> float:
        """Bilinear interpolation, clamped to the grid."""
        i0, i1, s = _bracket(self.ins, cin)
        j0, j1, t = _bracket(self.outs, cout)
        m = self.ms
        low = (1 - t) * m[i0][j0] + t * m[i0][j1]
        high = (1 - t) * m[i1][j0] + t * m[i1][j1]
        return (1 - s) * low + s * high


def _map_size(pixels: int, height: int, width: int) -> tuple[int, int]:
    """Height and width of a feature map with ``pixels`` positions and the input's aspect."""
    h = max(1, round(math.sqrt(pixels * height / width)))
    return h, max(1, round(pixels / h))


def layer_specs(layout: NeuronLayout, input_shape: Sequence[int]) -> dict[str, LayerSpec]:
    """The conv and linear layers whose channels the layout prunes, by module name.

    A conv's input size is its output size (``layout.output_pixels``) times its stride. Grouped
    (not depthwise) and transposed convs are left to the constant part of the prediction.
    """
    pruned = {(id(p), dim) for p, dim, _ in sliced_axes(layout).values()}
    _, height, width = input_shape
    specs = {}
    for name, module in layout.model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        prune_out = (id(module.weight), 0) in pruned
        prune_in = (id(module.weight), 1) in pruned
        node = layout.graph.module2node.get(module)
        common = dict(
            bias=module.bias is not None,
            batchnorm=node is not None
            and any(isinstance(n.module, nn.modules.batchnorm._BatchNorm) for n in node.outputs),
        )
        if isinstance(module, nn.Linear):
            if prune_in or prune_out:
                specs[name] = LayerSpec(
                    "linear", module.in_features, module.out_features, prune_in, prune_out, **common
                )
            continue
        depthwise = module.groups == module.in_channels == module.out_channels > 1
        if (module.groups > 1 and not depthwise) or not (prune_in or prune_out):
            continue
        out_h, out_w = _map_size(layout.output_pixels[module], height, width)
        specs[name] = LayerSpec(
            "conv",
            module.in_channels,
            module.out_channels,
            prune_in and not depthwise,
            prune_out,
            kernel_size=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation),
            depthwise=depthwise,
            input_size=(out_h * module.stride[0], out_w * module.stride[1]),
            **common,
        )
    return specs


def default_cache_dir() -> Path:
    """``$ADASAP_CACHE/latency``, by default ``~/.cache/adasap/latency``."""
    return cache_root() / "latency"


def _cache_file(
    cache_dir: str | Path | None, machine: dict[str, Any], input_shape: Sequence[int], batch: int
) -> Path:
    digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:12]
    shape = "x".join(map(str, input_shape))
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{digest}-{shape}-b{batch}.json"


def _read_cache(path: Path, machine: dict[str, Any], batch: int) -> dict[str, LayerGrid]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if (
            data.get("format") != TABLE_FORMAT
            or data.get("version") != TABLE_VERSION
            or data.get("machine") != machine
            or data.get("batch_size") != batch
        ):
            raise ValueError("written for another machine, batch size or format")
        return {key: LayerGrid(**grid) for key, grid in data["grids"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(f"latency cache {path} is unusable ({exc}); measuring again", stacklevel=3)
        return {}


def _measure_grid(
    spec: LayerSpec, points: int, batch: int, device: torch.device, warmup: int, repeats: int
) -> LayerGrid:
    ins, outs = spec.grid(points)
    shared: dict[tuple[int, ...], Tensor] = {}
    runs = [
        _forward(
            spec.build(cin, cout), spec.input_shape(cin, cout), "torch", device, inputs=shared
        )(batch)
        for cin in ins
        for cout in outs
    ]
    # All grid points take turns, so that a burst of load spoils one repeat of each point
    # (which the median ignores) rather than every repeat of one point.
    times = _interleaved(runs, warmup, repeats, _sync("torch", device))
    ms = np.median(np.array(times), axis=1).reshape(len(ins), len(outs))
    # Load only ever adds time: a point slower than a larger layer is noise, so each point
    # takes the minimum over the layers at least as large (suffix minimum on both axes).
    ms = np.minimum.accumulate(np.minimum.accumulate(ms[::-1, ::-1], axis=0), axis=1)[::-1, ::-1]
    return LayerGrid(ins, outs, ms.tolist())


@dataclass
class LatencyTable:
    """Measured latency of each prunable layer of a model over a grid of channel counts.

    ``grids`` is keyed by layer spec (shared by identical layers, and across models, through
    the on-disk cache); ``layers`` maps module names to their spec's key. Names survive
    pruning, so a table measured on the dense model serves every pruned version of it.
    """

    grids: dict[str, LayerGrid]
    layers: dict[str, str]
    machine: dict[str, Any]
    batch_size: int
    path: Path | None = None
    measured: int = 0  # grids timed by this call; the others came from the cache

    @classmethod
    def measure(
        cls,
        layout: NeuronLayout,
        example_inputs: Tensor,
        *,
        batch_size: int = 1,
        device: str = "cpu",
        points: int = 6,
        warmup: int = 3,
        repeats: int = 10,
        cache_dir: str | Path | None = None,
    ) -> LatencyTable:
        """Time every prunable layer of ``layout`` (cached per machine, input shape and batch).

        ``cache_dir`` defaults to :func:`default_cache_dir`; layers already in its file for
        this machine are not timed again.
        """
        _check_timing("torch", (batch_size,), warmup, repeats)
        if points < 2:
            raise UserError(f"a latency grid needs >= 2 points per axis, got {points}")
        input_shape = tuple(example_inputs.shape[1:])
        specs = layer_specs(layout, input_shape)
        machine = machine_info(device)
        path = _cache_file(cache_dir, machine, input_shape, batch_size)
        cached = _read_cache(path, machine, batch_size)
        dev = resolve_device(device)
        grids: dict[str, LayerGrid] = {}
        for spec in dict.fromkeys(specs.values()):
            key = spec.key(points)
            if key not in cached:
                cached[key] = _measure_grid(spec, points, batch_size, dev, warmup, repeats)
                grids[key] = cached[key]
        if grids:
            atomic_write_json(
                path,
                {
                    "format": TABLE_FORMAT,
                    "version": TABLE_VERSION,
                    "machine": machine,
                    "batch_size": batch_size,
                    "input_shape": list(input_shape),
                    "grids": {key: asdict(grid) for key, grid in cached.items()},
                },
            )
        layers = {name: spec.key(points) for name, spec in specs.items()}
        used = {key: cached[key] for key in layers.values()}
        return cls(used, layers, machine, batch_size, path, measured=len(grids))

    def layer_ms(self, name: str, cin: float, cout: float) -> float:
        return self.grids[self.layers[name]].at(cin, cout)


# --------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class _TabledLayer:
    """A table layer in a layout: its channel counts and the neurons that own its channels."""

    name: str
    in_size: int
    out_size: int
    in_ids: Tensor | None
    out_ids: Tensor | None


def _tabled_layers(layout: NeuronLayout, table: LatencyTable) -> list[_TabledLayer]:
    owners = {
        (id(p), dim): torch.cat(axis.neuron_of_channel)
        for p, dim, axis in sliced_axes(layout).values()
    }
    modules = dict(layout.model.named_modules())
    layers = []
    for name in table.layers:
        if name not in modules:
            raise UserError(
                f"the latency table has layer {name!r}, which this model lacks: measure the "
                "table on this model"
            )
        weight = modules[name].weight
        layers.append(
            _TabledLayer(
                name,
                weight.shape[1],
                weight.shape[0],
                owners.get((id(weight), 1)),
                owners.get((id(weight), 0)),
            )
        )
    return layers


def _layers_ms(layers: list[_TabledLayer], table: LatencyTable, removed: Tensor) -> float:
    total = 0.0
    for layer in layers:
        cin = layer.in_size - (int(removed[layer.in_ids].sum()) if layer.in_ids is not None else 0)
        cout = layer.out_size - (
            int(removed[layer.out_ids].sum()) if layer.out_ids is not None else 0
        )
        total += table.layer_ms(layer.name, cin, cout)
    return total


def latency_predictor(
    layout: NeuronLayout, table: LatencyTable, current_latency: float
) -> Callable[[Tensor], float]:
    """``removed mask -> predicted latency (ms)`` for :func:`select_neurons`.

    ``current_latency`` is the latency of ``layout.model`` as it is (measured, or predicted by
    the previous step), so the prediction for no removal equals it. The table's layers are
    summed at their kept channel counts; the rest of the model (``current_latency`` minus the
    layers: activations, additions, pooling) is part per-call overhead, which stays, and part
    per-element work, which shrinks with the layers. It is split in the proportion the table
    shows for the layers themselves, whose latency at one channel is their overhead: a constant
    alone overestimates pruned models with large feature maps (ResNet-50 at 224 px: -20%
    measured vs budget), a share alone underestimates overhead-bound ones (ResNet-20 at batch
    1: +10%). Should the layers, timed alone, add up to more than the whole model, they are
    scaled down to fit and the rest is zero.
    """
    layers = _tabled_layers(layout, table)
    full = _layers_ms(layers, table, torch.zeros(layout.num_neurons, dtype=torch.bool))
    if full <= 0:
        return lambda removed: current_latency
    scale = min(1.0, current_latency / full)
    rest = current_latency - scale * full
    fixed = _layers_ms(layers, table, torch.ones(layout.num_neurons, dtype=torch.bool)) / full

    def predict(removed: Tensor) -> float:
        share = _layers_ms(layers, table, removed) / full
        return (scale * full + rest * (1 - fixed)) * share + rest * fixed

    return predict


def latency_ranking(layout: NeuronLayout, scores: Tensor, table: LatencyTable) -> Tensor:
    """Importance per millisecond saved: the order in which to remove neurons for latency.

    HALP approximates its knapsack greedily by value per cost; here a neuron's cost is the
    latency its group saves per removed channel, taken over removing half the group (the
    table's slope at a single channel can be flat). Pass normalised scores, as for any target.
    """
    layers = _tabled_layers(layout, table)
    nothing = torch.zeros(layout.num_neurons, dtype=torch.bool)
    full = _layers_ms(layers, table, nothing)
    saving = torch.empty(len(layout.groups))
    for k, group in enumerate(layout.groups):
        count = max(1, group.size // 2)
        removed = nothing.clone()
        removed[group.offset : group.offset + count] = True
        saving[k] = (full - _layers_ms(layers, table, removed)) / count
    return scores / saving.clamp(min=_MIN_SAVING_MS)[layout.group_index()]


# --------------------------------------------------------------------------- budget


@dataclass
class LatencyBudget:
    """A latency target (``keep`` x the dense latency) and the running latency prediction."""

    table: LatencyTable
    keep: float
    dense_ms: float
    current_ms: float

    @property
    def target_ms(self) -> float:
        return self.keep * self.dense_ms

    def select(
        self,
        layout: NeuronLayout,
        scores: Tensor,
        target_ms: float | None = None,
        min_channels: int = 1,
        round_to: int = 1,
    ) -> Tensor:
        """The neurons to remove to reach ``target_ms`` (default: the final budget).

        ``min_channels`` and ``round_to`` are as in :func:`select_neurons`. Updates
        :attr:`current_ms` to the predicted latency once they are removed.
        """
        target = self.target_ms if target_ms is None else target_ms
        predict = latency_predictor(layout, self.table, self.current_ms)
        ranking = latency_ranking(layout, scores, self.table)
        try:
            chosen = select_neurons(layout, ranking, target, predict, "ms", min_channels, round_to)
        except UnreachableTarget as exc:
            raise UserError(
                f"a latency of {target:.3g} ms ({target / self.dense_ms:.0%} of the dense "
                f"{self.dense_ms:.3g} ms) cannot be reached without emptying a layer (the "
                f"floor is {exc.smallest:.3g} ms, {exc.smallest / self.dense_ms:.0%}): keep a "
                "larger fraction of the latency"
            ) from exc
        removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
        removed[chosen] = True
        self.current_ms = predict(removed)
        return chosen


def _check_keep(keep: float) -> None:
    if not 0 < keep <= 1:
        raise UserError(
            f"latency budget must be a fraction in (0, 1], got {keep}: e.g. 0.5 keeps half "
            "the dense latency"
        )


def latency_budget(
    layout: NeuronLayout,
    example_inputs: Tensor,
    keep: float,
    *,
    batch_size: int = 1,
    device: str = "cpu",
    table: LatencyTable | None = None,
    points: int = 6,
    warmup: int = 3,
    repeats: int = 15,
    cache_dir: str | Path | None = None,
) -> LatencyBudget:
    """Measure the dense model (and its latency table, unless given) and set the budget.

    Timing happens on ``device`` at ``batch_size`` whatever device the model trains on.
    """
    _check_keep(keep)
    if table is None:
        table = LatencyTable.measure(
            layout,
            example_inputs,
            batch_size=batch_size,
            device=device,
            points=points,
            warmup=warmup,
            repeats=repeats,
            cache_dir=cache_dir,
        )
    (dense,) = measure_latency(
        layout.model,
        tuple(example_inputs.shape[1:]),
        batch_sizes=(table.batch_size,),
        device=device,
        warmup=warmup,
        repeats=repeats,
    )
    if dense.p90_ms > _NOISY * dense.p10_ms:
        warnings.warn(
            f"latency on this machine is noisy (p10 {dense.p10_ms:.3g} ms, p90 "
            f"{dense.p90_ms:.3g} ms): other processes compete for it, so the budget may be "
            "missed; time on an idle machine or raise repeats",
            stacklevel=2,
        )
    return LatencyBudget(table, keep, dense.median_ms, dense.median_ms)


@dataclass(frozen=True)
class LatencyPruneReport:
    """Budget, predicted and measured latency of a model pruned to a latency budget.

    All relative to ``dense_ms``, the dense model timed beside the pruned one at the end.
    """

    dense_ms: float
    budget_ms: float
    predicted_ms: float
    measured_ms: float
    batch_size: int
    removed: int
    pruning_history: list[list[Any]]

    @property
    def error(self) -> float:
        """Measured over budget, minus one: 0.05 means 5% slower than the budget."""
        return self.measured_ms / self.budget_ms - 1

    def within(self, tolerance: float = 0.1) -> bool:
        return abs(self.error) <= tolerance

    def to_dict(self) -> dict[str, Any]:
        values = {k: v for k, v in asdict(self).items() if k != "pruning_history"}
        return {**values, "error": self.error}

    def __str__(self) -> str:
        return (
            f"latency at batch {self.batch_size}: dense {self.dense_ms:.3f} ms, budget "
            f"{self.budget_ms:.3f} ms, predicted {self.predicted_ms:.3f} ms, measured "
            f"{self.measured_ms:.3f} ms ({self.error:+.1%} vs budget); "
            f"{self.removed} neurons removed"
        )


def default_scores(layout: NeuronLayout) -> Tensor:
    """L2 magnitude, normalised by each group's mean (the pipeline's default criterion)."""
    return normalize_scores(magnitude_scores(layout), layout)


def prune_to_latency(
    model: nn.Module,
    example_inputs: Tensor,
    keep_latency: float,
    *,
    scores_fn: Callable[[NeuronLayout], Tensor] = default_scores,
    ignored_layers: Sequence[nn.Module] | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    min_channels: int = 1,
    round_to: int = 1,
    table: LatencyTable | None = None,
    points: int = 6,
    warmup: int = 3,
    repeats: int = 15,
    cache_dir: str | Path | None = None,
) -> LatencyPruneReport:
    """Prune ``model`` in place, in one shot, to ``keep_latency`` x its measured latency.

    ``ignored_layers`` defaults to the last linear layer (the classifier). The report compares
    the pruned model's latency with the budget; both are timed again at the end, a copy of
    the dense model and the pruned one taking turns, so that the machine's drift since the
    first measurement does not count as error. Its ``pruning_history`` is what
    :func:`adasap.serialization.save_model` stores.
    """
    _check_keep(keep_latency)
    if ignored_layers is None:
        ignored_layers = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    dense = copy.deepcopy(model)
    layout = NeuronLayout(model, example_inputs, ignored_layers)
    budget = latency_budget(
        layout,
        example_inputs,
        keep_latency,
        batch_size=batch_size,
        device=device,
        table=table,
        points=points,
        warmup=warmup,
        repeats=repeats,
        cache_dir=cache_dir,
    )
    chosen = budget.select(layout, scores_fn(layout), min_channels=min_channels, round_to=round_to)
    remove_neurons(layout, chosen)
    (dense_now,), (pruned,) = _time_models(
        [dense, model],
        tuple(example_inputs.shape[1:]),
        batch_sizes=(budget.table.batch_size,),
        backend="torch",
        device=device,
        warmup=warmup,
        repeats=repeats,
    )
    return LatencyPruneReport(
        dense_ms=dense_now.median_ms,
        budget_ms=keep_latency * dense_now.median_ms,
        predicted_ms=budget.current_ms / budget.dense_ms * dense_now.median_ms,
        measured_ms=pruned.median_ms,
        batch_size=budget.table.batch_size,
        removed=len(chosen),
        pruning_history=layout.graph.pruning_history(),
    )
