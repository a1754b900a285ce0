"""A clear answer for every model, fast (issue #28): a model Torch-Pruning leaves broken, an
exception from inside Torch-Pruning, a trace or group search past its budget, and a target
missed either way each give one line that says what happened and what to do."""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
import types
import warnings

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import Dependency

import adasap
from adasap.data import load_dataset
from adasap.errors import UserError
from adasap.method import effort as effort_module
from adasap.method import pruner as pruner_module
from adasap.method.effort import Effort, EffortBudget
from adasap.method.neurons import NeuronLayout
from adasap.method.pruner import Pruner, PrunerSettings
from adasap.method.pruning import ModelSize, remove_neurons
from adasap.method.schedule import PhaseSchedule
from adasap.method.target import OffTarget

X = torch.rand(2, 3, 8, 8)
ONE_REMOVAL = PhaseSchedule(0, 1, 1, removals=1)


class SplitBlock(nn.Module):
    """Splits its conv's output with sizes fixed in its code: Torch-Pruning cannot update them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = torch.split(self.conv(x), [4, 4], dim=1)
        return torch.cat([self.a(left), self.b(right)], 1)


class ScaledBlock(nn.Module):
    """A per-channel layer scale held in a buffer: Torch-Pruning does not see it, so it keeps
    its old shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("scale", torch.full((8, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale


class SlicedBlock(nn.Module):
    """Scales its channels by a buffer it slices to an even count of them: it breaks only with
    an odd count left, which the layout's check on a copy (half removed) does not reach."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("scale", torch.full((8, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * self.scale[: y.shape[1] + y.shape[1] % 2]


class Net(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = block
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(torch.relu(self.stem(x))).mean((2, 3)))


def pruner(model: nn.Module, ignored: list[nn.Module], **kwargs) -> Pruner:
    options = dict(keep=0.5, keep_kind="params", round_to=1, criterion="magnitude")
    return Pruner(model, X, ONE_REMOVAL, ignored_layers=ignored, **{**options, **kwargs})


# --- a model Torch-Pruning leaves broken ---------------------------------------------------


@pytest.mark.parametrize("block", [SplitBlock, ScaledBlock])
def test_a_layer_whose_removal_breaks_the_model_stays_whole_and_the_rest_is_pruned(block):
    torch.manual_seed(0)
    model = Net(block())
    ignored = [model.fc] + ([model.block.a, model.block.b] if block is SplitBlock else [])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fixed = pruner(model, ignored, keep=0.7)
    assert fixed.layout.left_whole == ["block.conv"]
    after = model.state_dict()  # the check ran on a copy
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    fixed.remove(1.0)
    assert model.block.conv.weight.shape[0] == 8 and model.stem.out_channels < 8
    assert model(X).shape == (2, 2)


def test_a_removal_breaking_the_model_is_named_with_the_layer_to_ignore():
    torch.manual_seed(0)
    model = Net(SlicedBlock())
    broken = pruner(model, [model.fc], keep=0.5)
    assert broken.layout.left_whole == []
    with pytest.raises(UserError) as info:
        broken.remove(1.0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "removing channels of block.conv broke the model (not its input): block (SlicedBlock) "
        "now fails (RuntimeError: The size of tensor a ("
    )
    assert message.endswith(
        "as Torch-Pruning left something there at its old size; leave those channels unpruned "
        "with ignored_layers=[model.block.conv]"
    )
    assert "give images" not in message  # not the user's input
    assert model.training  # the check ran in eval mode and put it back


def test_prune_stops_with_the_same_answer_and_leaves_the_given_model_whole():
    torch.manual_seed(0)
    model = Net(SlicedBlock())
    data = load_dataset(
        "synthetic", num_classes=2, channels=3, image_size=8, num_train=10, num_test=4,
        val_fraction=0.2,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"^removing channels of block\.conv broke the model"):
        adasap.prune(
            model, data, keep=0.5, keep_kind="params", round_to=1, warmup_epochs=0,
            prune_epochs=1, finetune_epochs=0, prune_steps=1, batch_size=8, method="sgd",
            criterion="magnitude", device="cpu", amp="off", channels_last=False, progress=False,
            ignored_layers=[model.fc],
        )  # fmt: skip
    assert model.block.conv.out_channels == 8 and model(X).shape == (2, 2)  # pruned a copy


# --- exceptions from inside Torch-Pruning ---------------------------------------------------


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_an_index_error_looking_up_a_layer_is_one_user_error_naming_it(monkeypatch):
    model = Chain()
    build = tp.DependencyGraph.build_dependency

    def built_then_broken(graph, *args, **kwargs):
        build(graph, *args, **kwargs)
        lookup = graph.get_pruner_of_module

        def failing(module):
            if module is model.conv2:
                raise IndexError("list index out of range")
            return lookup(module)

        graph.get_pruner_of_module = failing
        return graph

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", built_then_broken)
    with pytest.raises(UserError) as info:
        NeuronLayout(model, X, [model.fc])
    assert str(info.value) == (
        "Torch-Pruning cannot group the channels of conv2 (Conv2d) (IndexError: list index out "
        "of range): leave them unpruned with ignored_layers=[model.conv2] (the module itself)"
    )


def test_any_exception_inside_a_removal_is_a_user_error(monkeypatch):
    model = Chain()
    layout = NeuronLayout(model, X, [model.fc])
    apply = Dependency.__call__

    def fails_on_conv2(self, idxs):
        if self.target.module is model.conv2:
            raise AssertionError("shape mismatch")  # once outside the errors it caught
        return apply(self, idxs)

    monkeypatch.setattr(Dependency, "__call__", fails_on_conv2)
    with pytest.raises(UserError) as info:
        remove_neurons(layout, torch.tensor([0]))
    assert str(info.value) == (
        "Torch-Pruning failed removing channels of conv1 at conv2 (Conv2d) (AssertionError: "
        "shape mismatch): leave that layer unpruned with ignored_layers=[model.conv2]"
    )


# --- the effort budget ----------------------------------------------------------------------


def jump_in_group_search(monkeypatch, seconds: float = 0.0, memory: int = 0) -> list:
    """From the first group search on, the clock reads ``seconds`` more and the process holds
    ``memory`` more bytes; returns the graphs searched."""
    now, held, graphs = [0.0], [0], []
    monkeypatch.setattr(effort_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(effort_module, "resident_bytes", lambda: held[0])
    search = tp.DependencyGraph.get_pruning_group

    def jumping(graph, *args):
        graphs.append(graph)
        now[0], held[0] = seconds, memory
        return search(graph, *args)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", jumping)
    return graphs


def test_a_search_past_its_time_budget_names_the_layer_inside_the_search(monkeypatch):
    graphs = jump_in_group_search(monkeypatch, seconds=100.0)
    model = Chain()
    with pytest.raises(UserError) as info:
        NeuronLayout(model, X, [model.fc], EffortBudget(60.0, None))
    assert str(info.value) == (
        "Torch-Pruning's dependency search from conv1 (Conv2d) ran 100 s, past its budget of "
        "60 s: leave that layer unpruned with ignored_layers=[model.conv1], or raise the budget "
        "(trace_seconds=120, a Pruner or prune() keyword; None: no limit)"
    )
    # raised inside Torch-Pruning's one search call, whose nodes got their own lists back
    assert "get_pruning_group" in [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert all(type(n.dependencies) is list for n in graphs[0].module2node.values())


def test_no_time_budget_lets_the_search_run(monkeypatch):
    jump_in_group_search(monkeypatch, seconds=1e6)
    model = Chain()
    layout = NeuronLayout(model, X, [model.fc], EffortBudget(None, None))
    assert [g.name for g in layout.groups] == ["conv1", "conv2"]


def test_a_search_past_its_memory_budget_names_the_layer(monkeypatch):
    jump_in_group_search(monkeypatch, seconds=1.0, memory=5 << 30)
    model = Chain()
    with pytest.raises(
        UserError,
        match=r"^Torch-Pruning's dependency search from conv1 \(Conv2d\) grew the process by 5 "
        r"GiB, past its budget of 4 GiB: .*\(trace_memory_gib=8, a Pruner",
    ):
        NeuronLayout(model, X, [model.fc], EffortBudget(None, 4.0))


def test_a_tiny_budget_stops_the_pruner_at_tracing_and_none_disables_it():
    with pytest.raises(
        UserError,
        match=r"^tracing the model \(Chain\) with Torch-Pruning ran .* s, past its budget of "
        r"1e-09 s: raise the budget \(trace_seconds=2e-09, ",
    ):
        Pruner(Chain(), X, ONE_REMOVAL, round_to=1, trace_seconds=1e-9)
    unlimited = Pruner(Chain(), X, ONE_REMOVAL, round_to=1, trace_seconds=None)
    assert unlimited.settings.trace_budget == EffortBudget(None, 4.0)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no SIGALRM timer (Windows)")
def test_the_alarm_stops_work_no_check_reaches_and_puts_the_previous_timer_back():
    graph = types.SimpleNamespace(module2node={})  # no nodes: only the alarm checks
    effort = Effort(EffortBudget(0.3, None), "Chain")
    effort.part = ("conv2", "Conv2d")

    def previous(_signum, _frame):
        raise AssertionError("the previous handler ran during the search")

    signal.signal(signal.SIGALRM, previous)
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        with pytest.raises(UserError, match=r"^Torch-Pruning's dependency search from conv2 "):
            with effort_module.checked_search(graph, effort):
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline:  # a long comprehension of Torch-Pruning's
                    pass
        assert signal.getsignal(signal.SIGALRM) is previous
        assert 95.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def test_off_the_main_thread_the_cooperative_checks_still_stop_the_search(monkeypatch):
    jump_in_group_search(monkeypatch, seconds=100.0)
    model, caught = Chain(), []

    def build() -> None:
        try:
            NeuronLayout(model, X, [model.fc], EffortBudget(60.0, None))
        except UserError as error:
            caught.append(str(error))

    worker = threading.Thread(target=build)
    worker.start()
    worker.join()
    assert caught and caught[0].startswith("Torch-Pruning's dependency search from conv1 (Conv2d)")


def test_missing_memory_readings_disable_only_the_memory_budget(monkeypatch):
    monkeypatch.setattr(effort_module, "resident_bytes", lambda: None)
    Effort(EffortBudget(None, 1e-9), "Chain").check()  # nothing to compare: no error
    with pytest.raises(UserError, match=r"^tracing the model \(Chain\) with Torch-Pruning ran"):
        Effort(EffortBudget(1e-9, 1e-9), "Chain").check()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
def test_resident_memory_follows_what_the_process_holds():
    before = effort_module.resident_bytes()
    # 64 MiB, written, from malloc (fresh pages, not a block a caching allocator kept)
    held = np.ones(8 << 20)
    assert effort_module.resident_bytes() - before > 32 << 20
    del held


@pytest.mark.parametrize("name", ["trace_seconds", "trace_memory_gib"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_budgets_must_be_positive_or_none(name, value):
    with pytest.raises(UserError, match=rf"^{name} must be a positive number or None"):
        PrunerSettings(**{name: value})


# --- a target missed either way -------------------------------------------------------------


def coarse() -> nn.Module:
    """Four neurons of 32 parameters each (27 + 1 conv, 2 BatchNorm, 2 classifier inputs):
    half the parameters (65 of 130) cannot be kept in whole neurons (2 keep 66, 1 keeps 34)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 2),
    )  # fmt: skip


def test_a_last_removal_far_under_its_target_warns_with_what_it_kept():
    model = coarse()
    p = pruner(model, [model[4]])
    with pytest.warns(OffTarget) as caught:
        p.remove(1.0)
    (warning,) = [w.message for w in caught if isinstance(w.message, OffTarget)]
    assert str(warning) == (
        "the pruned model keeps 26.2% of the dense model's params, under the 50.0% target: "
        "removing whole neurons until the target was met went past it; give a larger keep"
    )
    assert warning.kept == pytest.approx(34 / 130) == p.target.fraction()
    assert warning.aimed == 0.5 and p.target.missed is warning


def test_blocks_of_channels_name_round_to():
    model = coarse()
    p = pruner(model, [model[4]], round_to=2, keep=0.6)
    expected = (
        r"keeps 50\.8% .* under the 60\.0% target: removing whole neurons in blocks of 2 "
        r"\(round_to\) until the target was met went past it; give a larger keep, or round_to=1 "
        r"for any channel count$"
    )
    with pytest.warns(OffTarget, match=expected):
        p.remove(1.0)


def fine() -> nn.Module:
    """Neurons small enough that half the parameters are kept within a neuron's worth."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 1),
        nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2),
    )  # fmt: skip


def test_a_measured_size_under_the_prediction_warns_too(monkeypatch):
    model = fine()
    p = pruner(model, [model[8]])
    dense = p.size
    monkeypatch.setattr(
        pruner_module, "measure_size", lambda model, example: ModelSize(dense.params // 4, 0)
    )
    expected = r"keeps 25\.0% .* under the 50\.0% target: its size prediction misses for this"
    with pytest.warns(OffTarget, match=expected):
        p.remove(1.0)
    assert p.target.missed.kept == pytest.approx(0.25, abs=0.01)


def test_a_removal_on_target_says_nothing():
    model = fine()
    p = pruner(model, [model[8]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.remove(1.0)
    assert p.target.missed is None
    assert 0.5 / 1.05 <= p.target.fraction() <= 0.5
