import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import adasap
from adasap.deploy import budget, timing
from adasap.deploy import table as latency_table
from adasap.deploy.latency import (
    LatencyTable,
    LayerGrid,
    TimingSettings,
    compare_latency,
    latency_budget,
    latency_predictor,
    latency_ranking,
    layer_specs,
    measure_latency,
    prune_to_latency,
    run_latency,
)
from adasap.deploy.runtimes import DEFAULT_RUNTIME, image_batch
from adasap.deploy.serialization import save_model
from adasap.errors import UserError
from adasap.method.importance import magnitude_scores, normalize_scores
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size, remove_neurons, select_neurons, size_predictor
from adasap.models.builders import build_model, find_classifier

ARCHITECTURE = dict(
    name="resnet20", num_classes=10, in_channels=3, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3
)
FAST = dict(warmup=0, repeats=2)
FAST_TIMING = TimingSettings(warmup=0, repeats=2)
# Two repeats on a shared machine may well be noisy: test_noisy_timing_warns checks the warning.
pytestmark = pytest.mark.filterwarnings("ignore:latency on this machine is noisy")
TABLE = TimingSettings(points=3, warmup=0, repeats=1)


def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model(**ARCHITECTURE).eval()


def layout_of(model: nn.Module) -> NeuronLayout:
    return NeuronLayout(model, torch.rand(2, 3, 32, 32), [find_classifier(model, 10)])


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> LatencyTable:
    model = resnet20()
    return LatencyTable.measure(
        layout_of(model),
        torch.rand(1, 3, 32, 32),
        replace(TABLE, cache_dir=tmp_path_factory.mktemp("latency")),
    )


@pytest.fixture(scope="module")
def pruned_pair() -> tuple[nn.Module, nn.Module, NeuronLayout]:
    dense, pruned = resnet20(), resnet20()
    layout = layout_of(pruned)
    example = torch.rand(2, 3, 32, 32)
    size = measure_size(pruned, example)
    predict = size_predictor(layout, size, "macs")
    remove_neurons(
        layout, select_neurons(layout, magnitude_scores(layout), size.macs // 2, predict)
    )
    return dense, pruned, layout


@pytest.mark.parametrize("runtime", ["torch", "ort"])
def test_measure_latency_results(runtime):
    results = measure_latency(
        resnet20(), (3, 32, 32), batch_sizes=(1, 3), runtime=runtime, warmup=1, repeats=3
    )
    assert [r.batch_size for r in results] == [1, 3]
    for r in results:
        assert r.runtime == runtime and r.device == "cpu" and r.repeats == 3
        assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms
        assert math.isclose(r.images_per_second, r.batch_size * 1e3 / r.median_ms)
        assert json.dumps(r.to_dict())


def test_measure_latency_leaves_the_model_alone():
    model = resnet20().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_latency(model, (3, 32, 32), batch_sizes=(2,), **FAST)
    assert model.training
    assert model.net.conv1.weight.is_contiguous()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_timing_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown runtime 'tensorrt': choose one of torch"):
        measure_latency(resnet20(), (3, 32, 32), runtime="tensorrt")
    with pytest.raises(UserError, match="repeats"):
        measure_latency(resnet20(), (3, 32, 32), repeats=0)
    with pytest.raises(UserError, match="batch sizes"):
        measure_latency(resnet20(), (3, 32, 32), batch_sizes=(0,))
    with pytest.raises(UserError, match="no models"):
        measure_latency(tmp_path)
    with pytest.raises(UserError, match="no models"):
        run_latency(tmp_path)


def test_compare_latency_and_run_directory(pruned_pair, tmp_path):
    dense, pruned, layout = pruned_pair
    comparison = compare_latency(
        dense, pruned, (3, 32, 32), batch_sizes=(1, 2), runtimes=("torch", "ort"), **FAST
    )
    assert [(r["runtime"], r["batch_size"]) for r in comparison.rows] == [
        ("torch", 1),
        ("torch", 2),
        ("ort", 1),
        ("ort", 2),
    ]
    for r in comparison.rows:
        assert math.isclose(r["speedup"], 1 / r["ratio"])
        assert r["ratio_low"] <= r["ratio"] <= r["ratio_high"] and r["rounds"] == 2
        assert r["noisy"]  # two rounds are too few for a 95% interval
    assert json.loads(json.dumps(comparison.to_dict()))["machine"]["torch"] == torch.__version__
    console = Console(record=True, width=150)
    console.print(comparison.table())
    assert "pruned/dense" in console.export_text()

    save_model(tmp_path / "adasap", pruned, ARCHITECTURE, layout.graph.pruning_history())
    rows = run_latency(tmp_path, batch_sizes=(1,), runtimes=("torch",), **FAST).rows
    assert [(r["model"], r["batch_size"]) for r in rows] == [("adasap", 1)]
    default = run_latency(tmp_path, batch_sizes=(1,), **FAST).rows  # a classifier: in ORT
    assert [(r["model"], r["runtime"]) for r in default] == [("adasap", DEFAULT_RUNTIME)]
    (result,) = measure_latency(tmp_path / "adasap", batch_sizes=(1,), **FAST)
    assert result.median_ms > 0


def test_table_is_cached_per_machine(table, monkeypatch):
    assert table.measured > 0 and table.path.is_file()
    assert len(table.layers) > len(table.grids)  # identical layers share one measurement
    calls = []

    def count(runs, *args, **kwargs):
        calls.append(runs)
        return [[1.0]] * len(runs)

    monkeypatch.setattr(latency_table, "time_runs", count)
    cached = replace(TABLE, cache_dir=table.path.parent)
    again = LatencyTable.measure(layout_of(resnet20()), torch.rand(1, 3, 32, 32), cached)
    assert calls == [] and again.measured == 0
    assert again.grids == table.grids and again.layers == table.layers
    other_grid = LatencyTable.measure(
        layout_of(resnet20()), torch.rand(1, 3, 32, 32), replace(cached, points=2)
    )
    assert other_grid.measured > 0 and calls


def test_damaged_cache_is_measured_again(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
    )
    layout = NeuronLayout(model, torch.rand(1, 3, 8, 8), [model[3]])
    settings = replace(TABLE, cache_dir=tmp_path)
    first = LatencyTable.measure(layout, torch.rand(1, 3, 8, 8), settings)
    first.path.write_text("{not json")
    with pytest.warns(UserWarning, match="unusable"):
        again = LatencyTable.measure(layout, torch.rand(1, 3, 8, 8), settings)
    assert again.measured == first.measured == 2  # the conv and the linear layer
    assert json.loads(first.path.read_text())["format"] == "adasap-latency-table"


def test_layer_grid_interpolates_bilinearly_and_clamps():
    grid = LayerGrid(
        ins=[1, 3], outs=[2, 4, 8], ms=[[i + 10 * o for o in (2, 4, 8)] for i in (1, 3)]
    )
    assert grid.at(2, 6) == pytest.approx(2 + 60)
    assert grid.at(1, 2) == pytest.approx(21) and grid.at(3, 8) == pytest.approx(83)
    assert grid.at(10, 100) == pytest.approx(83)
    single = LayerGrid(ins=[5], outs=[1, 5], ms=[[1.0, 3.0]])
    assert single.at(5, 3) == pytest.approx(2.0)


def test_layer_specs_follow_the_model():
    specs = layer_specs(layout_of(resnet20()), (3, 32, 32))
    stem = specs["net.conv1"]
    assert (stem.prune_in, stem.prune_out, stem.batchnorm) == (False, True, True)
    down = specs["net.layer2.0.conv1"]
    assert down.stride == (2, 2) and down.input_size == (32, 32) and down.in_channels == 16
    assert specs["net.layer3.1.conv2"].input_size == (8, 8)
    fc = specs["net.fc"]
    assert (fc.kind, fc.prune_in, fc.prune_out) == ("linear", True, False)

    class Depthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 16, 1)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            return self.fc(self.pw(torch.relu(self.dw(self.conv(x)))).mean((2, 3)))

    model = Depthwise()
    specs = layer_specs(NeuronLayout(model, torch.rand(1, 3, 16, 24), [model.fc]), (3, 16, 24))
    dw = specs["dw"]
    assert dw.depthwise and not dw.prune_in and dw.input_size == (16, 24)
    assert dw.build(5, 5)(torch.rand(1, *dw.input_shape(8, 5))).shape == (1, 5, 8, 12)


def test_a_grouped_conv_is_tabled_per_group_in_and_on_whole_groups_out():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 24, 1)
            self.grouped = nn.Conv2d(24, 36, 3, padding=1, groups=4)
            self.fc = nn.Linear(36, 5)

        def forward(self, x):
            return self.fc(self.grouped(torch.relu(self.conv(x))).mean((2, 3)))

    model = Grouped()
    layout = NeuronLayout(model, torch.rand(1, 3, 8, 8), [model.fc])
    spec = layer_specs(layout, (3, 8, 8))["grouped"]
    assert (spec.groups, spec.in_channels, spec.out_channels) == (4, 6, 36)
    assert spec.prune_in and spec.prune_out and not spec.depthwise
    # blocks of 6 channels: 3 per group in (6 / gcd(4, 6)), lcm(4, 6) = 12 out
    assert spec.grid(4, round_to=6) == ([1, 3, 6], [4, 12, 24, 36])
    layer = spec.build(3, 12)
    assert (layer.in_channels, layer.out_channels, layer.groups) == (12, 12, 4)
    assert layer(torch.rand(1, *spec.input_shape(3, 12))).shape == (1, 12, 8, 8)
    # the budget reads the same axes: one neuron of the layer before is one input per group
    removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
    removed[0] = True
    [tabled] = [t for t in budget._tabled_layers(layout, _one_grid(spec)) if t.name == "grouped"]
    assert (tabled.in_size, tabled.out_size, int(removed[tabled.in_ids].sum())) == (6, 36, 1)


def _one_grid(spec) -> LatencyTable:
    grid = LayerGrid([spec.in_channels], [spec.out_channels], [[1.0]])
    return LatencyTable({"k": grid}, {"grouped": "k"}, {}, 1, "torch", 1)


def test_predictor_is_anchored_and_monotone(table):
    layout = layout_of(resnet20())
    predict = latency_predictor(layout, table, current_latency=2.5)
    nothing = torch.zeros(layout.num_neurons, dtype=torch.bool)
    assert predict(nothing) == pytest.approx(2.5)
    order = torch.randperm(layout.num_neurons, generator=torch.Generator().manual_seed(0))
    values = []
    for count in range(0, layout.num_neurons + 1, 16):
        removed = nothing.clone()
        removed[order[:count]] = True
        values.append(predict(removed))
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] < values[0]

    # A table that adds up to more than the model is scaled to fit: still anchored, never < 0.
    layers_ms = sum(table.layer_ms(name, 1e9, 1e9) for name in table.layers)
    small = latency_predictor(layout, table, current_latency=layers_ms / 10)
    assert small(nothing) == pytest.approx(layers_ms / 10)
    assert 0 <= small(removed) < small(nothing)


def test_ranking_divides_scores_by_latency_saved(table):
    layout = layout_of(resnet20())
    scores = torch.ones(layout.num_neurons)
    ranking = latency_ranking(layout, scores, table)
    assert ranking.shape == scores.shape and (ranking > 0).all()
    index = layout.group_index()
    for g in range(len(layout.groups)):
        assert ranking[index == g].unique().numel() == 1  # one cost per group


def compute_bound(table: LatencyTable) -> LatencyTable:
    """The table's layers costing ``in x out`` ms: far above any measured model latency, so
    predictions scale the model's latency by the layers' share (deterministic on a busy box)."""
    grids = {
        key: LayerGrid(g.ins, g.outs, [[float(i * o) for o in g.outs] for i in g.ins])
        for key, g in table.grids.items()
    }
    return replace(table, grids=grids)


def test_latency_budget_pruning_meets_the_predicted_budget(table):
    model = resnet20()
    report = prune_to_latency(
        model, torch.rand(2, 3, 32, 32), 0.6, table=compute_bound(table), timing=FAST_TIMING
    )
    assert report.predicted_ms <= report.budget_ms + 1e-9
    assert report.budget_ms == pytest.approx(0.6 * report.dense_ms)
    assert report.removed > 0 and report.pruning_history
    assert report.measured_ms > 0 and "vs budget" in str(report)
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 10)


def test_budget_steps_follow_the_prediction(table):
    model = resnet20()
    example = torch.rand(2, 3, 32, 32)
    layout = layout_of(model)
    budget = latency_budget(layout, example, 0.7, table=compute_bound(table), timing=FAST_TIMING)
    first_target = (budget.dense_ms + budget.target_ms) / 2
    scores = normalize_scores(magnitude_scores(layout), layout)
    remove_neurons(layout, budget.select(layout, scores, first_target))
    assert budget.current_ms <= first_target
    layout = layout_of(model)
    remove_neurons(
        layout, budget.select(layout, normalize_scores(magnitude_scores(layout), layout))
    )
    assert budget.current_ms <= budget.target_ms


def test_noisy_timing_warns(table, monkeypatch):
    monkeypatch.setattr(timing, "time_interleaved", lambda *a, **k: [[1.0] * 5 + [10.0] * 5])
    layout = layout_of(resnet20())
    with pytest.warns(UserWarning, match="noisy"):
        budget = latency_budget(layout, torch.rand(1, 3, 32, 32), 0.5, table=table)
    assert budget.dense_ms == 5.5 and budget.target_ms == 2.75


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5, float("nan")])
def test_budget_outside_zero_one_is_a_user_error(keep):
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        prune_to_latency(resnet20(), torch.rand(2, 3, 32, 32), keep)


def test_unreachable_budget_is_a_user_error(table):
    # Flat grids: removing channels saves nothing, so no budget below the dense latency is met.
    flat = {
        k: LayerGrid(g.ins, g.outs, [[1.0] * len(g.outs)] * len(g.ins))
        for k, g in table.grids.items()
    }
    flat_table = replace(table, grids=flat)
    with pytest.raises(UserError, match="without emptying a layer"):
        prune_to_latency(
            resnet20(), torch.rand(2, 3, 32, 32), 0.5, table=flat_table, timing=FAST_TIMING
        )


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("batch_size", 0, "batch sizes must be >= 1"),
        ("repeats", 0, "repeats >= 1"),
        ("warmup", -1, "warmup >= 0"),
        ("points", 1, ">= 2 points per axis"),
        ("runtime", "tensorrt", "unknown runtime 'tensorrt'"),
    ],
)
def test_bad_timing_settings_are_a_user_error(field, value, words):
    with pytest.raises(UserError, match=words):
        TimingSettings(**{field: value})


def test_training_imports_no_timing_and_timing_imports_no_onnx():
    # onnx and onnxruntime take seconds to import: only exporting and onnxruntime timing need
    # them; training needs timing only for a latency target, and imports it then
    code = (
        "import sys, adasap; "
        "assert 'adasap.deploy.timing' not in sys.modules, 'import adasap times things'; "
        "import adasap.deploy.latency; "
        "assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(adasap.__file__).parents[1])}  # this checkout
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr


def test_image_batch_repeats_the_given_images_in_turn_or_draws_random_ones():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    batch = image_batch(images, 5, (3, 4, 4))
    assert batch.dtype == torch.float32 and batch.shape == (5, 3, 4, 4)
    for k in range(5):
        assert torch.equal(batch[k], images[k % 2].float())
    random = image_batch(None, 3, (3, 4, 4))
    assert random.shape == (3, 3, 4, 4) and 0 <= random.min() and random.max() <= 1
    with pytest.raises(UserError, match=r"do not fit inputs of shape \(3, 8, 8\)"):
        image_batch(images, 1, (3, 8, 8))


class _InputRecorder(nn.Module):
    """Reports the sum of every input it is called with (a stand-in for a detector, whose time
    depends on what it sees); ``report`` is a function, which the timed deep copy shares."""

    def __init__(self, report) -> None:
        super().__init__()
        self.report = report

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.report(round(float(x.sum()), 3))
        return x


def test_compare_latency_feeds_every_model_the_given_images():
    seen: dict[str, set[float]] = {"dense": set(), "pruned": set()}
    dense = _InputRecorder(lambda s: seen["dense"].add(s))
    pruned = _InputRecorder(lambda s: seen["pruned"].add(s))
    images = torch.rand(2, 3, 8, 8)
    compare_latency(
        dense, pruned, (3, 8, 8), batch_sizes=(1, 3), runtimes=("torch",), images=images, **FAST
    )
    expected = {round(float(image_batch(images, b, (3, 8, 8)).sum()), 3) for b in (1, 3)}
    assert seen["dense"] == seen["pruned"] == expected
