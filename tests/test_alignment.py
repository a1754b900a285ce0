"""The channel multiple of each deployment runtime: its table, the CPU detection, round_to, and
the latency table whose grid lies on the multiples."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from adasap import alignment
from adasap.alignment import (
    RUNTIME_NAMES,
    channel_alignment,
    check_rounding,
    cpu_instruction_set,
    resolve_round_to,
)
from adasap.deploy import table as table_module
from adasap.deploy.budget import LatencyBudget
from adasap.deploy.runtimes import RUNTIMES
from adasap.deploy.table import LatencyTable, LayerGrid, LayerSpec
from adasap.deploy.timing import TimingSettings
from adasap.errors import UserError
from adasap.method.neurons import NeuronLayout


def test_the_runtimes_known_here_are_the_deployable_ones():
    assert set(RUNTIME_NAMES) == set(RUNTIMES.names())


@pytest.mark.parametrize(
    "instructions, expected",
    [
        ("avx512", {"torch": 8, "ort": 16, "ort-int8": 16, "openvino": 16, "openvino-int8": 16}),
        ("avx2", {"torch": 8, "ort": 8, "ort-int8": 8, "openvino": 8, "openvino-int8": 8}),
        ("other", {"torch": 4, "ort": 4, "ort-int8": 4, "openvino": 4, "openvino-int8": 4}),
    ],
)
def test_alignment_follows_the_cpu_instruction_set(monkeypatch, instructions, expected):
    monkeypatch.setattr(alignment, "cpu_instruction_set", lambda: instructions)
    assert {name: channel_alignment(name) for name in RUNTIME_NAMES} == expected
    # a GPU's tensor cores whatever the CPU: 8 in floating point, 16 in INT8
    assert channel_alignment("ort", "cuda") == channel_alignment("torch", "cuda:1") == 8
    assert channel_alignment("ort-int8", torch.device("cuda", 0)) == 16


@pytest.mark.parametrize(
    "flags, capability, expected",
    [
        ({"sse4_2", "avx2", "avx512f", "avx512_vnni"}, "AVX2", "avx512"),
        ({"sse4_2", "avx2", "fma"}, "AVX512", "avx2"),  # the CPU's flags, not torch's level
        ({"neon", "asimd"}, "DEFAULT", "other"),
        (None, "AVX512", "avx512"),  # no /proc/cpuinfo: PyTorch's dispatch level
        (None, "AVX2", "avx2"),
        (None, "DEFAULT", "other"),
    ],
)
def test_the_instruction_set_comes_from_the_cpu_flags(monkeypatch, flags, capability, expected):
    monkeypatch.setattr(alignment, "_linux_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_instruction_set.__wrapped__() == expected


def test_this_machine_has_an_answer():
    assert cpu_instruction_set() in ("avx512", "avx2", "other")
    assert channel_alignment("ort") in (4, 8, 16)


def test_auto_resolves_and_numbers_stay(monkeypatch):
    monkeypatch.setattr(alignment, "cpu_instruction_set", lambda: "avx512")
    assert resolve_round_to("auto", "ort", "cpu") == 16
    assert resolve_round_to("auto", "torch", "cpu") == 8
    assert resolve_round_to("auto", "ort", "cuda") == 8
    assert resolve_round_to(1, "ort", "cpu") == 1
    assert resolve_round_to(32, "torch", "cpu") == 32


@pytest.mark.parametrize(
    "runtime, round_to, message",
    [
        ("tensorrt", "auto", "unknown runtime 'tensorrt': choose one of torch, ort, ort-int8, "),
        ("ort", 0, "round_to must be >= 1 or auto, got 0: e.g. round_to=auto"),
        ("ort", -16, "round_to must be >= 1 or auto, got -16"),
        ("ort", "fast", "round_to must be >= 1 or auto, got 'fast'"),
        ("ort", True, "round_to must be >= 1 or auto, got True"),
        ("ort", 8.0, "round_to must be >= 1 or auto, got 8.0"),
    ],
)
def test_bad_runtime_or_round_to_is_one_line(runtime, round_to, message):
    with pytest.raises(UserError) as caught:
        check_rounding(runtime, round_to)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    if runtime == "tensorrt":
        with pytest.raises(UserError, match="unknown runtime"):
            channel_alignment(runtime)


# ------------------------------------------------------ where it is used: the latency table


def test_the_latency_grid_lies_on_the_channel_multiples():
    spec = LayerSpec("conv", 64, 512, True, True, bias=False, batchnorm=True,
                     kernel_size=(3, 3), padding=(1, 1), input_size=(8, 8))  # fmt: skip
    ins, outs = spec.grid(6, 16)
    assert ins == [1, 16, 32, 48, 64]
    assert len(outs) == 6 and (outs[0], outs[-1]) == (1, 512)
    assert all(c % 16 == 0 for c in outs[1:])
    # round_to 1: evenly spread counts, as before there were multiples
    assert spec.grid(6, 1) == ([1, 13, 26, 38, 51, 64], [1, 102, 205, 307, 410, 512])
    assert replace(spec, prune_in=False).grid(6, 16)[0] == [64]
    small = LayerSpec("linear", 12, 16, True, True, bias=True, batchnorm=False)
    assert small.grid(6, 16) == ([1, 12], [1, 16])


def test_the_latency_table_times_layers_in_the_deployment_runtime(tmp_path, monkeypatch):
    monkeypatch.setattr(alignment, "cpu_instruction_set", lambda: "avx512")
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 6 * 6, 2))  # fmt: skip
    x = torch.rand(1, 3, 8, 8)
    layout = NeuronLayout(model, x, [model[4]])
    deployed = []
    get_runtime = table_module.get_runtime
    monkeypatch.setattr(table_module, "get_runtime", lambda n: deployed.append(n) or get_runtime(n))
    settings = TimingSettings(points=4, warmup=0, repeats=1, cache_dir=tmp_path, runtime="ort")
    ort = LatencyTable.measure(layout, x, settings)
    assert (ort.runtime, ort.round_to, ort.measured) == ("ort", 16, 2)  # the conv, the linear
    assert deployed == ["ort", "ort"] and "-ort-" in ort.path.name
    assert ort.grids[ort.layers["0"]].outs == [1, 16, 32]
    assert LatencyTable.measure(layout, x, settings).measured == 0  # cached per runtime
    eager = LatencyTable.measure(layout, x, replace(settings, runtime="torch"))
    assert (eager.round_to, eager.measured) == (8, 2) and eager.path != ort.path
    assert eager.grids[eager.layers["0"]].outs == [1, 8, 24, 32]
    exact = LatencyTable.measure(layout, x, settings, round_to=1)  # another grid: timed anew
    assert exact.measured == 2 and exact.grids[exact.layers["0"]].outs == [1, 11, 21, 32]

    flat = replace(ort, grids={k: LayerGrid(g.ins, g.outs, [[1.0] * len(g.outs)] * len(g.ins))
                               for k, g in ort.grids.items()})  # fmt: skip
    budget = LatencyBudget(flat, keep=0.5, dense_ms=1.0, current_ms=1.0)
    with pytest.raises(UserError) as caught:
        budget.select(layout, torch.ones(layout.num_neurons), round_to=16)
    assert "in multiples of 16" in str(caught.value) and "--round-to 1" in str(caught.value)
