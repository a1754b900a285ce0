"""Layers Torch-Pruning prunes incompletely or does not know (``adasap.method.layer_pruners``):
exact shapes after removal, the size predicted, and the pruned model equal to the dense one
with the removed channels zeroed."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn
from torch_pruning._helpers import to_plain_idxs
from torch_pruning.dependency import index_mapping

from adasap.method.layer_pruners import (
    ConvPruner,
    ScalePruner,
    layer_pruner,
)
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size, predict_size, remove_neurons

X = torch.rand(2, 3, 8, 8)


class GainConv(nn.Conv2d):
    """A convolution with a per-output-channel gain, as timm's ``ScaledStdConv2d``."""

    def __init__(self, *args: int) -> None:
        super().__init__(*args, padding=1)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.gain, self.bias)


class Net(nn.Module):
    """conv1 -> ``middle`` -> conv2: conv1's output channels are the neurons tested."""

    def __init__(self, middle: nn.Module, conv1: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1 or nn.Conv2d(3, 8, 3, padding=1)
        self.middle = middle
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.middle(self.conv1(x)))


def pruned_and_zeroed(
    model: nn.Module, removed: list[int], x: torch.Tensor = X
) -> tuple[nn.Module, nn.Module]:
    """``model`` with conv1's ``removed`` channels removed, and a copy with them zeroed."""
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in zeroed.conv1.parameters(recurse=False):
            parameter[removed] = 0
    layout = NeuronLayout(model, x, [model.conv2])
    [group] = [g for g in layout.groups if g.root is model.conv1]
    neurons = torch.zeros(layout.num_neurons, dtype=torch.bool)
    neurons[torch.tensor(removed) + group.offset] = True
    # parameters only: Torch-Pruning's MACs counter skips a convolution's subclass and counts
    # a GroupNorm's MACs, which the prediction (of the layers whose MACs pruning removes) omits
    predicted, _ = predict_size(layout, neurons, measure_size(model, x))
    remove_neurons(layout, neurons.nonzero().flatten())
    assert predicted.params == measure_size(model, x).params
    return model.eval(), zeroed.eval()


def test_a_norm_without_bias_is_pruned():
    norm = nn.GroupNorm(1, 8)
    norm.bias = None  # timm's GroupNorm1NoBias (PoolFormerV2)
    model, _ = pruned_and_zeroed(Net(norm), [1, 4, 6])
    assert model.middle.weight.shape == (5,) and model.middle.bias is None
    assert model.conv1.weight.shape == (5, 3, 3, 3) and model(X).shape == (2, 4, 8, 8)


def test_a_convolution_gain_is_cut_with_its_channels():
    model = Net(nn.ReLU(), GainConv(3, 8, 3))
    gain = model.conv1.gain.detach().clone()
    model, zeroed = pruned_and_zeroed(model, [0, 5])
    assert model.conv1.gain.shape == (6, 1, 1, 1)
    assert torch.equal(model.conv1.gain.detach(), gain[[1, 2, 3, 4, 6, 7]])
    assert torch.allclose(model(X), zeroed(X), atol=1e-6)


def test_timm_blur_pool_and_metaformer_scale_are_pruned_exactly():
    timm = pytest.importorskip("timm")
    from timm.models.metaformer import Scale

    blur = timm.layers.BlurPool2d(channels=8, stride=1)
    model, zeroed = pruned_and_zeroed(Net(blur), [2, 3, 7])
    assert model.middle.filt.shape == (5, 1, 3, 3) and model.middle.channels == 5
    assert torch.allclose(model(X), zeroed(X), atol=1e-6)

    scale = Scale(8)
    with torch.no_grad():
        scale.scale.uniform_(0.5, 1.5)
    kept = scale.scale.detach()[[0, 2, 3, 4, 5, 6]]
    model, zeroed = pruned_and_zeroed(Net(scale), [1, 7])
    assert model.middle.shape == (6, 1, 1) and torch.equal(model.middle.scale.detach(), kept)
    assert torch.allclose(model(X), zeroed(X), atol=1e-6)
    # what a saved model's history is checked against when it is loaded
    assert isinstance(layer_pruner(model.middle), ScalePruner)
    assert layer_pruner(model.middle).get_out_channels(model.middle) == 6


def test_the_pruner_of_a_layer_is_the_one_adasaps_graphs_use():
    assert isinstance(layer_pruner(GainConv(3, 8, 3)), ConvPruner)
    assert layer_pruner(nn.Linear(4, 6)).get_in_channels(nn.Linear(4, 6)) == 4
    assert layer_pruner(nn.Sequential()) is None


class Recurrent(nn.Module):
    """Channels into a bidirectional LSTM over tokens, as timm's Sequencer mixes them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Linear(6, 8)
        self.rnn = nn.LSTM(8, 5, batch_first=True, bidirectional=True)
        self.conv2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.rnn(self.conv1(x))[0])


def test_an_lstm_loses_the_input_columns_of_every_gate_and_keeps_its_hidden_size():
    tokens = torch.rand(2, 4, 6)
    model, zeroed = pruned_and_zeroed(Recurrent(), [0, 3, 4], tokens)
    assert model.rnn.weight_ih_l0.shape == model.rnn.weight_ih_l0_reverse.shape == (20, 5)
    assert model.rnn.input_size == 5 and model.rnn.hidden_size == 5
    assert model.rnn.weight_hh_l0.shape == (20, 5)
    assert torch.allclose(model(tokens), zeroed(tokens), atol=1e-6)


class DenseConcat(nn.Module):
    """Concatenations of earlier outputs, one part twice (DenseNet's, and a repeated input)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.c2, self.c3 = nn.Conv2d(8, 4, 1), nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.c0(x)
        x1 = self.c1(x0)
        x2 = self.c2(torch.cat([x0, x1], 1))
        return self.fc(self.c3(torch.cat([x0, x1, x2, x1], 1)).mean((2, 3)))


def _groups(model: nn.Module) -> list[list[tuple[str, list[int]]]]:
    graph = NeuronLayout(model, X, [model.fc]).graph
    names = {m: n for n, m in model.named_modules()}
    found = []
    for conv in (model.c0, model.c1, model.c2):
        group = graph.get_pruning_group(
            conv, graph.get_pruner_of_module(conv).prune_out_channels, [0, 3]
        )
        found.append(
            sorted(
                (
                    names.get(item.dep.target.module, str(item.dep.target.type)),
                    to_plain_idxs(item.idxs),
                )
                for item in group
            )
        )
    return found


def test_concatenations_map_as_torch_pruning_maps_them(monkeypatch):
    # Torch-Pruning's own function, from a fresh copy of its module: adasap's replaces it
    spec = importlib.util.find_spec("torch_pruning.dependency.index_mapping")
    original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(original)
    ours = _groups(DenseConcat())
    monkeypatch.setattr(
        index_mapping, "update_concat_index_mapping", original.update_concat_index_mapping
    )
    assert ours == _groups(DenseConcat())
    assert any(idxs == [4, 7] for _, idxs in ours[1])  # c1's channels as concat parts 2 and 4
