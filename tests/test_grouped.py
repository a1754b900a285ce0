"""Grouped (not depthwise) convolutions: a neuron is one channel index within a group, taken
in every group at once (adasap.method.grouped)."""

import pytest
import torch
from torch import nn
from torchvision.models.regnet import ResBottleneckBlock
from torchvision.models.resnet import Bottleneck

import adasap
from adasap.data import load_dataset
from adasap.deploy.onnx import export_onnx
from adasap.deploy.serialization import load_model, save_model
from adasap.method.grouped import is_grouped_conv
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size, predict_size, remove_neurons
from adasap.models import build_model

X = torch.randn(2, 3, 8, 8)


class Block(nn.Module):
    """conv(3->8) -> conv(8->16) -> BN -> grouped conv(16->16, 4 groups) -> BN -> ReLU ->
    conv(16->8) -> linear(8->3)."""

    def __init__(self, groups: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 16, 1)
        self.bn_a = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
        self.bn_b = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(torch.relu(self.stem(x)))))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.fc(self.c(x).mean((2, 3)))


class TwoGroupings(nn.Module):
    """One group of channels read by a 4-group and a 2-group conv: a neuron is a channel index
    in every group of both (channels c, c + 4, c + 8, c + 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.four = nn.Conv2d(16, 8, 3, padding=1, groups=4)
        self.two = nn.Conv2d(16, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.a(x)))
        return self.fc((self.four(x) + self.two(x)).mean((2, 3)))


class Concatenated(nn.Module):
    """Two convs concatenated into a grouped conv's input: neither feeds every group."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.cat([self.left(x), self.right(x)], 1)
        return self.fc(self.b(x).mean((2, 3)))


def group_of(layout, module):
    return next(
        g for g in layout.groups if any(s.module is module and s.is_output for s in g.slices)
    )


def neuron_ids(layout, picks):
    """Global neuron ids of ``{module: local neuron indices}``."""
    ids = [torch.tensor(local) + group_of(layout, m).offset for m, local in picks.items()]
    return torch.cat(ids)


@torch.no_grad()
def silence(layout, neurons):
    """Zero every output slice of ``neurons`` (weights, biases, BN gamma and beta): in eval
    mode their channels are then 0 after BN and ReLU, so removing them changes nothing."""
    removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
    removed[neurons] = True
    for g in layout.groups:
        for s in g.slices:
            if s.is_output:
                gone = s.idxs[removed[s.roots + g.offset]]
                s.param.index_fill_(s.dim, gone, 0.0)


def weight_macs(model):
    """The MACs of every conv and linear weight for one sample: ``numel x output positions``
    (a grouped conv's weight holds ``C_in / G`` inputs per output)."""
    total = 0

    def count(module, _inputs, output):
        nonlocal total
        positions = output[0, 0].numel() if output.dim() > 2 else 1
        total += module.weight.numel() * positions

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    hooks = [m.register_forward_hook(count) for m in layers]
    with torch.no_grad():
        model(X[:1])
    for h in hooks:
        h.remove()
    return total


def predict_then_remove(layout, neurons):
    """Remove ``neurons``; check the size predicted beforehand against the one measured."""
    model = layout.model
    removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
    removed[neurons] = True
    dense, dense_weights = measure_size(model, X), weight_macs(model)
    predicted, _ = predict_size(layout, removed, dense)
    remove_neurons(layout, neurons)
    measured = measure_size(model, X)
    assert predicted.params == measured.params
    # every weight's MACs exactly; Torch-Pruning also counts biases and BatchNorms per
    # element, which the prediction leaves out for every kind of layer alike
    assert dense.macs - predicted.macs == dense_weights - weight_macs(model)
    assert measured.macs < predicted.macs


def test_a_neuron_is_one_channel_index_in_every_group():
    model = Block()
    layout = NeuronLayout(model, X, [model.fc])
    assert [(g.name, g.size) for g in layout.groups] == [("stem", 8), ("a", 4), ("b", 4), ("c", 8)]
    owners = layout.ownership().owners
    for conv in (model.a, model.b):
        offset = group_of(layout, conv).offset
        assert torch.equal(owners[conv.weight][1], torch.arange(16) % 4 + offset)
    # the grouped conv's input columns (4 per group) are one neuron each, of a's group
    inputs = [s for g in layout.groups for s in g.slices if s.module is model.b and s.dim == 1]
    assert len(inputs) == 1
    assert torch.equal(inputs[0].idxs, torch.arange(4))
    assert torch.equal(inputs[0].roots, torch.arange(4))


def test_removal_shrinks_every_group_equally_and_is_predicted_exactly():
    torch.manual_seed(0)
    model = Block().eval()
    layout = NeuronLayout(model, X, [model.fc])
    neurons = neuron_ids(layout, {model.a: [1], model.b: [0, 3]})
    silence(layout, neurons)
    before = model(X)
    predict_then_remove(layout, neurons)
    assert model.a.weight.shape == (12, 8, 1, 1) and model.bn_a.weight.shape == (12,)
    assert model.b.weight.shape == (8, 3, 3, 3)  # 4 groups of 3 inputs and 2 outputs each
    assert (model.b.groups, model.b.in_channels, model.b.out_channels) == (4, 12, 8)
    assert model.bn_b.weight.shape == (8,) and model.c.weight.shape == (8, 8, 1, 1)
    torch.testing.assert_close(model(X), before, rtol=0, atol=1e-6)


def test_the_kept_local_channels_keep_their_weights():
    model = Block()
    original = model.b.weight.detach().clone()  # (16, 4, 3, 3): 4 groups of 4 outputs
    layout = NeuronLayout(model, X, [model.fc])
    remove_neurons(layout, neuron_ids(layout, {model.a: [2], model.b: [1]}))
    rows = [o for o in range(16) if o % 4 != 1]
    assert torch.equal(model.b.weight, original[rows][:, [0, 1, 3]])


def test_channels_read_by_two_groupings_are_tied_across_both():
    torch.manual_seed(0)
    model = TwoGroupings().eval()
    layout = NeuronLayout(model, X, [model.fc])
    a = group_of(layout, model.a)
    assert a.size == 4  # widths 4 and 8: channel c is tied to c + 4, c + 8, c + 12
    owners = layout.ownership().owners
    assert torch.equal(owners[model.a.weight][1], torch.arange(16) % 4 + a.offset)
    neurons = neuron_ids(layout, {model.a: [2]})
    silence(layout, neurons)
    before = model(X)
    predict_then_remove(layout, neurons)
    assert model.four.weight.shape == (8, 3, 3, 3) and model.two.weight.shape == (8, 6, 3, 3)
    assert model.four.groups == 4 and model.two.groups == 2
    torch.testing.assert_close(model(X), before, rtol=0, atol=1e-6)


def test_a_concatenation_into_a_grouped_conv_stays_whole():
    model = Concatenated()
    layout = NeuronLayout(model, X, [model.fc])
    assert [g.name for g in layout.groups] == ["b"]  # its outputs: every group whole


def test_a_transposed_grouped_conv_stays_whole():
    """Its weight holds the outputs per group on its second dimension, which Torch-Pruning
    slices as if whole: the channels it reads and writes stay."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ConvTranspose2d(8, 8, 3, groups=2), nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    layout = NeuronLayout(model, X, [model[-1]])
    assert [g.name for g in layout.groups] == ["2"]


BLOCK_IDS = ["regnet_x", "regnet_y", "resnext"]


def tiny_regnet_and_resnext() -> list[nn.Module]:
    """torchvision's RegNet (with and without SE) and ResNeXt bottlenecks, in small."""
    regnet_x = ResBottleneckBlock(16, 16, 1, nn.BatchNorm2d, nn.ReLU, 4, 1.0, None)
    regnet_y = ResBottleneckBlock(16, 32, 2, nn.BatchNorm2d, nn.ReLU, 8, 1.0, 0.25)
    resnext = Bottleneck(32, 8, groups=4, base_width=16)  # a 3x3 conv of 4 groups of 2
    return [regnet_x, regnet_y, resnext]


@pytest.mark.parametrize("block", tiny_regnet_and_resnext(), ids=BLOCK_IDS)
def test_torchvision_blocks_prune_their_grouped_convs_exactly(block):
    torch.manual_seed(0)
    width = block.f.a[0].in_channels if hasattr(block, "f") else block.conv1.in_channels
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), block,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(3),
    ).eval()  # fmt: skip
    model(X)
    layout = NeuronLayout(model, X, [model[-1]])
    convs = [m for m in model.modules() if is_grouped_conv(m)]
    assert len(convs) == 1
    conv = convs[0]
    before_shape, groups = conv.weight.shape, conv.groups
    tied = [g for g in layout.groups if g.neuron_of_root is not None]
    assert len(tied) == 2  # the grouped conv's inputs and its outputs
    neurons = torch.cat([torch.tensor([0]) + g.offset for g in tied])
    silence(layout, neurons)
    expected = model(X)
    predict_then_remove(layout, neurons)
    assert conv.groups == groups
    assert conv.weight.shape[:2] == (before_shape[0] - groups, before_shape[1] - 1)
    torch.testing.assert_close(model(X), expected, rtol=0, atol=1e-5)


def test_regnet_x_400mf_prunes_its_grouped_convs_to_half_its_parameters(tmp_path):
    torch.manual_seed(0)
    data = load_dataset(
        "synthetic", num_classes=4, channels=3, image_size=32, num_train=10, num_test=4,
        val_fraction=0.2,
    )  # fmt: skip
    architecture = dict(
        name="regnet_x_400mf", num_classes=4, in_channels=3, image_size=32, mean=[0.5] * 3,
        std=[0.25] * 3,
    )  # fmt: skip
    model = build_model(**architecture).eval()
    dense = {n: m.weight.shape for n, m in model.named_modules() if is_grouped_conv(m)}
    result = adasap.prune(
        model, data, keep=0.5, warmup_epochs=0, prune_epochs=1, finetune_epochs=0, prune_steps=1,
        batch_size=8, method="sgd", criterion="magnitude", device="cpu", amp="off",
        channels_last=False, progress=False, keep_kind="params", round_to=1,
    )  # fmt: skip
    assert 0.49 <= result.keep_fraction("params") <= 0.5
    pruned = result.model.eval()
    assert sum(p.numel() for p in pruned.parameters()) == result.size.params
    convs = {n: m for n, m in pruned.named_modules() if n in dense}
    assert len(convs) == len(dense)
    assert any(m.weight.shape[0] < dense[n][0] for n, m in convs.items())  # outputs pruned
    assert any(m.weight.shape[1] < dense[n][1] for n, m in convs.items())  # and inputs
    for m in convs.values():  # every group as wide as the others, and as many groups
        assert m.out_channels % m.groups == 0 and m.in_channels % m.groups == 0
        assert m.weight.shape[1] == m.in_channels // m.groups
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = pruned(x)
    save_model(tmp_path / "model", pruned, architecture, result.pruning_history)
    loaded = load_model(tmp_path / "model").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    scale = max(1.0, float(expected.abs().max()))
    report = export_onnx(pruned, tmp_path / "model.onnx", image_size=32, tolerance=1e-4 * scale)
    assert report.passed, str(report)


def test_a_grouped_convs_block_counts_its_channels_not_its_neurons():
    torch.manual_seed(0)
    data = load_dataset(
        "synthetic", num_classes=4, channels=3, image_size=32, num_train=10, num_test=4,
        val_fraction=0.2,
    )  # fmt: skip
    model = build_model(name="regnet_x_400mf", num_classes=4, in_channels=3, image_size=32,
                        mean=[0.5] * 3, std=[0.25] * 3).eval()  # fmt: skip
    dense = {n: m.out_channels for n, m in model.named_modules() if is_grouped_conv(m)}
    # blocks of 16 channels: a 2-group conv's block is 8 neurons, a 10-group conv's 8
    result = adasap.prune(
        model, data, keep=0.5, warmup_epochs=0, prune_epochs=1, finetune_epochs=0, prune_steps=1,
        batch_size=8, method="sgd", criterion="magnitude", device="cpu", amp="off",
        channels_last=False, progress=False, keep_kind="params", round_to=16,
    )  # fmt: skip
    convs = {n: m for n, m in result.model.named_modules() if n in dense}
    # blocks of 16 neurons (16 G channels) left every one of them whole; a 25-group conv of
    # 400 channels still is (its 16 channels per group are one block)
    assert sum(m.out_channels < dense[n] for n, m in convs.items()) >= 5
    for name, conv in convs.items():
        assert conv.out_channels % 16 == 0 or conv.out_channels == dense[name], name
        assert conv.out_channels % conv.groups == 0
