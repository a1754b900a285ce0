"""The latency table: each prunable layer timed over a grid of (input, output) channel counts.

Layers are timed as standalone modules on their own input size, in the runtime the model will
be deployed to (:mod:`adasap.deploy.runtimes`), cached on disk per machine, runtime, input
shape and batch size (see :class:`LatencyTable`); :mod:`adasap.deploy.budget` predicts a
pruned model's latency from the table.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import warnings
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from adasap.alignment import channel_alignment
from adasap.deploy.runtimes import get_runtime
from adasap.deploy.timing import DEFAULT_TIMING, TimingSettings, machine_info, time_runs
from adasap.devices import resolve_device
from adasap.io import CacheMiss, cache_root, cached, read_checked_json, write_checked_json
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import sliced_axes

TABLE_FORMAT = "adasap-latency-table"
TABLE_VERSION = 2  # 2: timed in a runtime, grids on multiples of round_to


@dataclass(frozen=True)
class LayerSpec:
    """A prunable layer as the table times it: a conv (with its BatchNorm) or a linear layer.

    ``prune_in`` / ``prune_out`` say which channel counts the layout can change; a depthwise
    conv has one count (its input follows its output). A grouped conv's ``in_channels`` are
    those of one group (its weight's second axis, what a neuron of the layer it reads takes one
    of), its ``out_channels`` all of them (a neuron takes one from each of its ``groups``).
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
    groups: int = 1

    def key(self, points: int, round_to: int) -> str:
        return json.dumps({**asdict(self), "points": points, "round_to": round_to}, sort_keys=True)

    def build(self, cin: int, cout: int) -> nn.Module:
        if self.kind == "linear":
            layer: nn.Module = nn.Linear(cin, cout, bias=self.bias)
            norm: nn.Module = nn.BatchNorm1d(cout)
        else:
            layer = nn.Conv2d(
                self.input_shape(cin, cout)[0],
                cout,
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                groups=cout if self.depthwise else self.groups,
                bias=self.bias,
            )
            norm = nn.BatchNorm2d(cout)
        return nn.Sequential(layer, norm) if self.batchnorm else layer

    def input_shape(self, cin: int, cout: int) -> tuple[int, ...]:
        """The per-sample input of the layer with ``cin`` inputs and ``cout`` outputs."""
        if self.kind == "linear":
            return (cin,)
        return (cout if self.depthwise else cin * self.groups, *self.input_size)

    def grid(self, points: int, round_to: int = 1) -> tuple[list[int], list[int]]:
        """Channel counts to time on each prunable axis: 1, the full width, and between them
        up to ``points`` - 2 multiples of ``round_to`` spread evenly.

        A runtime's kernels work in blocks of channels, so latency steps up at each multiple
        of the block and the counts between are slow (benchmarks/bench_channels.py). Pruning
        with ``round_to`` keeps counts on the multiples: the grid times those, where a smooth
        fit through odd counts would take the slow steps for the trend. A grouped conv keeps
        its groups equal, its width a multiple of ``round_to`` (``adasap.method.grouped``): its
        outputs on multiples of both, from one per group up; its inputs per group on
        multiples of ``round_to / gcd(groups, round_to)``.
        """

        def spread(size: int, pruned: bool, step: int, least: int) -> list[int]:
            if not pruned:
                return [size]
            steps = (round(size * k / (points - 1) / step) for k in range(1, points - 1))
            return sorted({least, size, *(n * step for n in steps if least < n * step < size)})

        ins = spread(
            self.in_channels, self.prune_in, round_to // math.gcd(self.groups, round_to), 1
        )
        outs = spread(
            self.out_channels, self.prune_out, math.lcm(self.groups, round_to), self.groups
        )
        return ins, outs


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

    A conv's input size is its output size (``layout.output_pixels``) times its stride.
    Transposed convs are left to the constant part of the prediction.
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
        if not (prune_in or prune_out):
            continue
        groups = 1 if depthwise else module.groups
        out_h, out_w = _map_size(layout.output_pixels[module], height, width)
        specs[name] = LayerSpec(
            "conv",
            module.in_channels // groups,
            module.out_channels,
            prune_in and not depthwise,
            prune_out,
            kernel_size=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation),
            depthwise=depthwise,
            input_size=(out_h * module.stride[0], out_w * module.stride[1]),
            groups=groups,
            **common,
        )
    return specs


def default_cache_dir() -> Path:
    """``$ADASAP_CACHE/latency``, by default ``~/.cache/adasap/latency``."""
    return cache_root() / "latency"


def _cache_file(
    cache_dir: str | Path | None,
    machine: dict[str, Any],
    runtime: str,
    input_shape: Sequence[int],
    batch: int,
) -> Path:
    digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:12]
    shape = "x".join(map(str, input_shape))
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{digest}-{runtime}-{shape}-b{batch}.json"


def _read_cache(
    path: Path, machine: dict[str, Any], runtime: str, batch: int
) -> dict[str, LayerGrid]:
    """The grids of a cache file; :class:`CacheMiss` when it is absent or unusable."""
    data = read_checked_json(path)
    if (
        data.get("format") != TABLE_FORMAT
        or data.get("version") != TABLE_VERSION
        or data.get("machine") != machine
        or data.get("runtime") != runtime
        or data.get("batch_size") != batch
    ):
        raise CacheMiss("written for another machine, runtime, batch size or format")
    try:
        return {key: LayerGrid(**grid) for key, grid in data["grids"].items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise CacheMiss(f"bad grids ({exc})") from exc


def time_layers(
    layers: Sequence[tuple[nn.Module, Sequence[int]]], timing: TimingSettings
) -> list[list[float]]:
    """Milliseconds of each timed pass of every ``(layer, its per-sample input shape)``
    deployed to ``timing.runtime`` on ``timing.device``, at ``timing.batch_size``.

    As :func:`~adasap.deploy.timing.model_times`, which takes one input shape for all its
    models: where the runtime allows (PyTorch) the layers take turns, so that a burst of load
    spoils one repeat of each (which a median ignores) rather than every repeat of one; an
    onnxruntime or OpenVINO session keeps its threads spinning a while after a run and would
    steal the cores from the next, so those are timed one after the other.
    """
    runtime = get_runtime(timing.runtime)
    device = resolve_device(timing.device)
    with tempfile.TemporaryDirectory(prefix="adasap-latency-") as tmp:
        runs: list[Callable[[], object]] = []
        for k, (layer, shape) in enumerate(layers):
            workdir = Path(tmp) / str(k)  # each deployment writes its own model files
            workdir.mkdir()
            deployed = runtime.deploy(layer, shape, device=device, workdir=workdir)
            runs.append(deployed.runner(timing.batch_size))
        return time_runs(runs, timing.warmup, timing.repeats, interleaved=runtime.interleaved)


def _measure_grid(spec: LayerSpec, timing: TimingSettings, round_to: int) -> LayerGrid:
    ins, outs = spec.grid(timing.points, round_to)
    layers = [(spec.build(cin, cout), spec.input_shape(cin, cout)) for cin in ins for cout in outs]
    times = time_layers(layers, timing)
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
    pruning, so a table measured on the dense model serves every pruned version of it. The
    layers ran in ``runtime``, their grids on multiples of ``round_to``.
    """

    grids: dict[str, LayerGrid]
    layers: dict[str, str]
    machine: dict[str, Any]
    batch_size: int
    runtime: str
    round_to: int
    path: Path | None = None
    measured: int = 0  # grids timed by this call; the others came from the cache

    @classmethod
    def measure(
        cls,
        layout: NeuronLayout,
        example_inputs: Tensor,
        timing: TimingSettings = DEFAULT_TIMING,
        round_to: int | None = None,
    ) -> LatencyTable:
        """Time every prunable layer of ``layout`` in ``timing.runtime`` (cached per machine,
        runtime, input shape and batch), on grids of multiples of ``round_to`` (default: the
        runtime's :func:`~adasap.alignment.channel_alignment`, what ``round_to: auto`` keeps).

        Layers already in the cache file for this machine are not timed again; processes that
        measure at once time each layer once (:func:`adasap.io.cached`), and a damaged file
        (not matching its checksum) is measured again.
        """
        if round_to is None:
            round_to = channel_alignment(timing.runtime, resolve_device(timing.device))
        input_shape = tuple(example_inputs.shape[1:])
        specs = layer_specs(layout, input_shape)
        machine, runtime, batch = machine_info(timing.device), timing.runtime, timing.batch_size
        path = _cache_file(timing.cache_dir, machine, runtime, input_shape, batch)
        keys = {name: spec.key(timing.points, round_to) for name, spec in specs.items()}
        needed = {keys[name]: spec for name, spec in specs.items()}
        grids: dict[str, LayerGrid] = {}  # timed by this call

        def load() -> dict[str, LayerGrid]:
            found = _read_cache(path, machine, runtime, batch)
            if not needed.keys() <= found.keys():
                raise CacheMiss()  # complete the table: time the layers it lacks
            return found

        def complete() -> dict[str, LayerGrid]:
            try:
                found = _read_cache(path, machine, runtime, batch)
            except CacheMiss:
                found = {}
            for key, spec in needed.items():
                if key not in found:
                    found[key] = grids[key] = _measure_grid(spec, timing, round_to)
            write_checked_json(
                path,
                {
                    "format": TABLE_FORMAT,
                    "version": TABLE_VERSION,
                    "machine": machine,
                    "runtime": runtime,
                    "batch_size": batch,
                    "input_shape": list(input_shape),
                    "grids": {key: asdict(grid) for key, grid in found.items()},
                },
            )
            return found

        def damaged(why: str) -> None:
            warnings.warn(
                f"latency cache {path} is unusable ({why}); measuring again", stacklevel=5
            )

        cached_grids = cached(path, load, complete, on_damaged=damaged)
        used = {key: cached_grids[key] for key in keys.values()}
        return cls(used, keys, machine, batch, runtime, round_to, path, measured=len(grids))

    def layer_ms(self, name: str, cin: float, cout: float) -> float:
        return self.grids[self.layers[name]].at(cin, cout)
