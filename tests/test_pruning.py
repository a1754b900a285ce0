import pytest
import torch
from torch import nn

from adasap.errors import UserError
from adasap.method.importance import TaylorImportance, magnitude_scores, normalize_scores
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import (
    UnreachableTarget,
    measure_size,
    named_optimizer_state,
    remove_neurons,
    select_neurons,
    size_predictor,
    transfer_optimizer_state,
)
from adasap.models.builders import build_model


class Chain(nn.Module):
    """conv(3->8) -> BN -> conv(8->16) -> BN -> pool -> linear(16->4)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Depthwise(nn.Module):
    """conv(3->8) -> depthwise(8) -> pointwise(8->16) -> linear(16->5)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw_bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.dw_bn(self.dw(x)))
        return self.fc(self.pw(x).mean((2, 3)))


class Residual(nn.Module):
    """Two convs writing into the same residual stream: their outputs are one group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.bn(self.body(x))
        return self.fc(x.mean((2, 3)))


def group_of(layout, module):
    return next(
        g for g in layout.groups if any(s.module is module and s.is_output for s in g.slices)
    )


def prune_group(layout, module, local_idxs):
    group = group_of(layout, module)
    return remove_neurons(layout, torch.tensor(local_idxs) + group.offset)


X = torch.randn(2, 3, 8, 8)


def test_chain_exact_shapes():
    model = Chain()
    layout = NeuronLayout(model, X, [model.fc])
    assert [g.size for g in layout.groups] == [8, 16]
    prune_group(layout, model.conv1, [1, 5])
    layout = NeuronLayout(model, X, [model.fc])
    prune_group(layout, model.conv2, [0, 2, 4])
    assert model.conv1.weight.shape == (6, 3, 3, 3)
    assert model.conv1.bias.shape == (6,)
    assert model.bn1.weight.shape == model.bn1.running_mean.shape == (6,)
    assert model.conv2.weight.shape == (13, 6, 3, 3)
    assert model.bn2.running_var.shape == (13,)
    assert model.fc.weight.shape == (4, 13)
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert out.shape == (2, 4)


def test_depthwise_exact_shapes():
    model = Depthwise()
    layout = NeuronLayout(model, X, [model.fc])
    prune_group(layout, model.conv, [0, 7, 3])
    assert model.conv.weight.shape == (5, 3, 3, 3)
    assert model.dw.weight.shape == (5, 1, 3, 3)
    assert model.dw.groups == model.dw.in_channels == model.dw.out_channels == 5
    assert model.dw_bn.weight.shape == (5,)
    assert model.pw.weight.shape == (16, 5, 1, 1)
    model(X).sum().backward()


def test_residual_coupling_prunes_both_branches_together():
    model = Residual()
    layout = NeuronLayout(model, X, [model.fc])
    assert len(layout.groups) == 1
    owners = layout.ownership().owners
    # channel c of the stem and of the body is the same neuron c
    assert torch.equal(owners[model.stem.weight][1], owners[model.body.weight][1])
    prune_group(layout, model.stem, [2, 3])
    assert model.stem.weight.shape == (6, 3, 3, 3)
    assert model.body.weight.shape == (6, 6, 3, 3)
    assert model.bn.weight.shape == (6,)
    assert model.fc.weight.shape == (3, 6)


def test_linear_head_never_pruned_and_hidden_linear_is():
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5))
    x = torch.randn(2, 10)
    layout = NeuronLayout(model, x, [model[2]])
    assert len(layout.groups) == 1
    remove_neurons(layout, torch.arange(4))
    assert model[0].weight.shape == (28, 10)
    assert model[2].weight.shape == (5, 28)


def test_removing_all_zero_channels_leaves_output_unchanged():
    torch.manual_seed(0)
    model = Chain().eval()
    dead = [2, 6]
    with torch.no_grad():
        model.conv1.weight[dead] = 0
        model.conv1.bias[dead] = 0
        model.bn1.weight[dead] = 0
        model.bn1.bias[dead] = 0
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    layout = NeuronLayout(model, X, [model.fc])
    prune_group(layout, model.conv1, dead)
    assert model.conv1.out_channels == 6
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_ignored_layer_in_residual_stream_blocks_its_group():
    model = Residual()
    layout = NeuronLayout(model, X, [model.fc, model.body])
    assert layout.groups == []


def test_magnitude_scores_are_group_l2_norms():
    model = Chain()
    layout = NeuronLayout(model, X, [model.fc])
    scores = magnitude_scores(layout)
    group = group_of(layout, model.conv1)
    c = 3
    expected = torch.cat(
        [
            model.conv1.weight[c].flatten(),
            model.conv1.bias[c : c + 1],
            model.bn1.weight[c : c + 1],
            model.bn1.bias[c : c + 1],
            model.conv2.weight[:, c].flatten(),
        ]
    ).norm()
    torch.testing.assert_close(scores[group.offset + c], expected.detach())


def test_taylor_scores_are_abs_group_sums_of_weight_times_gradient():
    torch.manual_seed(0)
    model = Chain()
    layout = NeuronLayout(model, X, [model.fc])
    taylor = TaylorImportance()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    expected = torch.zeros(())
    c = 5
    for x in batches:
        model.zero_grad()
        model(x).pow(2).sum().backward()
        taylor.accumulate(layout)
        terms = [
            (model.conv1.weight[c] * model.conv1.weight.grad[c]).sum(),
            model.conv1.bias[c] * model.conv1.bias.grad[c],
            model.bn1.weight[c] * model.bn1.weight.grad[c],
            model.bn1.bias[c] * model.bn1.bias.grad[c],
            (model.conv2.weight[:, c] * model.conv2.weight.grad[:, c]).sum(),
        ]
        expected = expected + torch.stack(terms).sum().abs().detach()
    offset = group_of(layout, model.conv1).offset
    torch.testing.assert_close(taylor(layout)[offset + c], expected / 2)


def test_bn_form_taylor_uses_only_batchnorm():
    torch.manual_seed(0)
    model = Chain()
    layout = NeuronLayout(model, X, [model.fc])
    taylor = TaylorImportance(taylor_form="bn")
    model(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
    taylor.accumulate(layout)
    c = 1
    expected = (
        model.bn1.weight[c] * model.bn1.weight.grad[c] + model.bn1.bias[c] * model.bn1.bias.grad[c]
    ).abs()
    offset = group_of(layout, model.conv1).offset
    torch.testing.assert_close(taylor(layout)[offset + c], expected.detach())


def test_normalize_scores_per_group_mean():
    model = Chain()
    layout = NeuronLayout(model, X, [model.fc])
    scores = torch.rand(layout.num_neurons) + 0.1
    normalized = normalize_scores(scores, layout, "mean")
    for g in layout.groups:
        span = slice(g.offset, g.offset + g.size)
        torch.testing.assert_close(normalized[span].mean(), torch.tensor(1.0))


@pytest.mark.parametrize("kind", ["params", "macs"])
@pytest.mark.parametrize("keep", [0.8, 0.5, 0.3])
def test_resnet20_reaches_target_within_two_points(kind, keep):
    model = build_model(
        "resnet20", num_classes=10, in_channels=1, image_size=28, mean=(0.5,), std=(0.5,)
    )
    x = torch.rand(2, 1, 28, 28)
    classifier = model.net.fc
    layout = NeuronLayout(model, x, [classifier])
    dense = measure_size(model, x)
    scores = normalize_scores(magnitude_scores(layout), layout)
    predict = size_predictor(layout, dense, kind)
    chosen = select_neurons(layout, scores, int(keep * dense.of(kind)), predict, kind)
    remove_neurons(layout, chosen)
    achieved = measure_size(model, x).of(kind) / dense.of(kind)
    assert keep - 0.02 <= achieved <= keep + 0.005
    assert classifier.out_features == 10
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels >= 1
    model(x).sum().backward()


def test_unreachable_target_is_a_user_error():
    model = Chain()
    layout = NeuronLayout(model, X, [model.fc])
    dense = measure_size(model, X)
    scores = magnitude_scores(layout)
    with pytest.raises(UserError, match="without emptying a layer"):
        select_neurons(layout, scores, 10, size_predictor(layout, dense, "params"))


def test_unreachable_target_in_ms_shows_the_milliseconds():
    model = Chain()
    layout = NeuronLayout(model, X, [model.fc])
    with pytest.raises(UnreachableTarget, match=r"cannot reach 0\.25 ms .*reachable is 0\.5 ms"):
        select_neurons(layout, magnitude_scores(layout), 0.25, lambda removed: 0.5, "ms")


@pytest.mark.parametrize("round_to", [4, 8, 16])
@pytest.mark.parametrize("keep", [0.8, 0.5, 0.3])
def test_round_to_keeps_multiples_and_still_meets_the_target(round_to, keep):
    model = build_model(
        "resnet20", num_classes=10, in_channels=1, image_size=8, mean=(0.5,), std=(0.5,)
    )
    x = torch.rand(2, 1, 8, 8)
    layout = NeuronLayout(model, x, [model.net.fc])
    dense = measure_size(model, x)
    scores = normalize_scores(magnitude_scores(layout), layout)
    target = int(keep * dense.params)
    chosen = select_neurons(
        layout, scores, target, size_predictor(layout, dense, "params"), round_to=round_to
    )
    removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
    removed[chosen] = True
    for g in layout.groups:
        lost = removed[g.offset : g.offset + g.size]
        kept = g.size - int(lost.sum())
        assert kept == g.size or kept % round_to == 0
        if lost.any():  # the removed are the group's lowest-ranked
            group_scores = scores[g.offset : g.offset + g.size]
            assert group_scores[lost].max() <= group_scores[~lost].min()
    remove_neurons(layout, chosen)
    params = measure_size(model, x).params
    # at or under the target, and not by much: blocks that fit are given back
    assert 0.95 * target <= params <= target
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % round_to == 0


def test_round_to_larger_than_a_group_leaves_it_whole():
    model = Chain()  # conv1 has 8 channels, conv2 16
    layout = NeuronLayout(model, X, [model.fc])
    dense = measure_size(model, X)
    predict = size_predictor(layout, dense, "params")
    with pytest.raises(UnreachableTarget, match="multiples of 16 .*--round-to 1") as caught:
        select_neurons(layout, magnitude_scores(layout), 0.9 * dense.params, predict, round_to=16)
    assert caught.value.smallest == dense.params
    chosen = select_neurons(
        layout, magnitude_scores(layout), 0.9 * dense.params, predict, round_to=8
    )
    remove_neurons(layout, chosen)
    assert (model.conv1.out_channels, model.conv2.out_channels) == (8, 8)


def test_momentum_of_surviving_channels_is_kept():
    torch.manual_seed(0)
    model = Chain()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(X).pow(2).sum().backward()
    opt.step()
    old_conv2 = opt.state[model.conv2.weight]["momentum_buffer"].clone()
    old_bn1 = opt.state[model.bn1.weight]["momentum_buffer"].clone()
    state = named_optimizer_state(model, opt)
    layout = NeuronLayout(model, X, [model.fc])
    kept = prune_group(layout, model.conv1, [0, 4])
    new_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    transfer_optimizer_state(state, kept, model, new_opt)
    survivors = torch.tensor([1, 2, 3, 5, 6, 7])
    assert torch.equal(
        new_opt.state[model.conv2.weight]["momentum_buffer"], old_conv2[:, survivors]
    )
    assert torch.equal(new_opt.state[model.bn1.weight]["momentum_buffer"], old_bn1[survivors])
    assert len(new_opt.state) == len(list(model.parameters()))


def test_untraceable_model_is_a_user_error():
    class ReturnsPythonFloat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).sum().item()

    with pytest.raises(UserError, match="Torch-Pruning cannot trace"):
        NeuronLayout(ReturnsPythonFloat(), X)


class Grouped(nn.Module):
    """conv(3->8) -> grouped conv(8->8, 2 groups) -> conv(8->16) -> linear(16->3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.grouped(self.conv(x))))
        return self.fc(self.pw(x).mean((2, 3)))


def test_grouped_conv_channels_are_pruned_equally_in_every_group():
    model = Grouped()
    layout = NeuronLayout(model, X, [model.fc])
    # a neuron of a group touching `grouped` is one channel index of each of its 2 groups
    assert [(g.name, g.size) for g in layout.groups] == [("conv", 4), ("grouped", 4), ("pw", 16)]
    prune_group(layout, model.pw, [0, 15])
    layout = NeuronLayout(model, X, [model.fc])
    prune_group(layout, model.grouped, [1])  # channels 1 and 5
    assert model.grouped.weight.shape == (6, 4, 3, 3) and model.grouped.groups == 2
    assert model.pw.weight.shape == (14, 6, 1, 1) and model.fc.weight.shape == (3, 14)
    assert model(X).shape == (2, 3)


class TinyTransformer(nn.Module):
    """tokens(6->8) -> attention (2 heads) -> LayerNorm -> MLP(8->16->8) -> linear(8->3)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


def test_attention_heads_and_mlp_channels_are_neurons_and_the_embedding_width_whole():
    model = TinyTransformer().eval()
    tokens = torch.randn(2, 5, 6)
    layout = NeuronLayout(model, tokens, [model.head])
    assert [(g.name, g.size) for g in layout.groups] == [("attention", 2), ("fc1", 16)]
    prune_group(layout, model.fc1, [1, 2, 3])
    assert model.fc1.weight.shape == (13, 8) and model.fc1.bias.shape == (13,)
    assert model.fc2.weight.shape == (8, 13)
    assert model.attention.in_proj_weight.shape == (24, 8) and model.norm.weight.shape == (8,)
    assert model(tokens).shape == (2, 3)


def test_layer_norm_slices_follow_their_linear():
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    layout = NeuronLayout(model, torch.randn(2, 6), [model[2]])
    (group,) = layout.groups
    assert {(type(s.module).__name__, s.attr, s.dim) for s in group.slices} == {
        ("Linear", "weight", 0), ("Linear", "bias", 0), ("LayerNorm", "weight", 0),
        ("LayerNorm", "bias", 0), ("Linear", "weight", 1),
    }  # fmt: skip
    remove_neurons(layout, torch.tensor([0, 7]))
    assert model[0].weight.shape == (6, 6) and model[1].weight.shape == model[1].bias.shape == (6,)
    assert model[2].weight.shape == (3, 6)
    assert model(torch.randn(2, 6)).shape == (2, 3)


class LayerScale(nn.Module):
    """A per-channel scale held by the model itself (not a layer), as in ConvNeXt."""

    def __init__(self, shape=(8, 1, 1)):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.full(shape, 0.5))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc((self.conv(x) * self.scale).mean((2, 3)))


def test_a_per_channel_parameter_outside_layers_is_part_of_its_neurons():
    model = LayerScale()
    layout = NeuronLayout(model, X, [model.fc])
    (group,) = layout.groups
    assert ("scale", 0) in {(s.attr, s.dim) for s in group.slices}
    # per neuron: 27 conv weights + 1 bias + 1 scale + 2 classifier inputs
    assert torch.equal(layout.neuron_costs("params"), torch.full((8,), 31.0))
    assert model.scale in layout.ownership().owners
    prune_group(layout, model.conv, [3, 4])
    assert model.scale.shape == (6, 1, 1) and model.conv.weight.shape == (6, 3, 3, 3)
    assert model(X).shape == (2, 2)


def test_a_parameter_of_unknown_layout_leaves_its_group_whole():
    model = LayerScale(shape=(8, 4, 4))  # which dimension is the channel? not ours to guess
    assert NeuronLayout(model, torch.rand(2, 3, 4, 4), [model.fc]).groups == []


def test_channels_through_a_shuffle_are_not_pruned_but_the_rest_is():
    from adasap.models.torchvision_models import ChannelShuffle

    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), ChannelShuffle(2), nn.Conv2d(8, 6, 1), nn.Flatten(), nn.LazyLinear(2)
    )
    model(X)  # materialize the lazy linear
    layout = NeuronLayout(model, X, [model[4]])
    assert [g.name for g in layout.groups] == ["2"]
    shuffled = ChannelShuffle(2)(torch.arange(8.0).view(1, 8, 1, 1)).flatten()
    assert shuffled.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_untraceable_layer_is_named_in_a_one_line_user_error():
    import torchvision

    # torchvision's own ShuffleNet: its view/transpose channel shuffle defeats the tracer
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=4)
    with pytest.raises(
        UserError, match=r"after stage4\.1\.branch2\.6 \(BatchNorm2d\).*Zero"
    ) as info:
        NeuronLayout(model, torch.rand(2, 3, 32, 32))
    assert "\n" not in str(info.value) and "nn.ChannelShuffle" in str(info.value)


def test_failure_inside_torch_pruning_removal_names_the_layer(monkeypatch):
    from torch_pruning.dependency import Dependency

    model = Chain()
    layout = NeuronLayout(model, X, [model.fc])
    apply = Dependency.__call__

    def mishandles_bn1(self, idxs):
        if self.target.module is model.bn1:
            raise IndexError("index 9 is out of bounds for dimension 0 with size 8")
        return apply(self, idxs)

    monkeypatch.setattr(Dependency, "__call__", mishandles_bn1)
    with pytest.raises(UserError, match=r"at bn1 \(BatchNorm2d\) \(IndexError.*\[model\.bn1\]$"):
        prune_group(layout, model.conv1, [0])


def test_failure_grouping_channels_names_the_layer(monkeypatch):
    import torch_pruning as tp

    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    model = Chain()
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", broken)
    with pytest.raises(
        UserError, match=r"channels of conv\d \(Conv2d\).*ignored_layers=\[model\.conv\d\]"
    ):
        NeuronLayout(model, X, [model.fc])


class ConcatGate(nn.Module):
    """Two layers concatenated, then gated per channel (timm's CSPNeXt). The gate, declared
    first, roots one group whose neurons are split between the two layers."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Conv2d(8, 8, 1)
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], 1)
        x = x * self.gate(x.mean((2, 3), keepdim=True)).sigmoid()
        return self.fc(x.mean((2, 3)))


def test_each_layer_of_a_concatenated_group_keeps_min_channels():
    model = ConcatGate()
    layout = NeuronLayout(model, X, [model.fc])
    [group] = [g for g in layout.groups if g.name == "gate"]
    scores = torch.ones(layout.num_neurons)
    # b's channels (the group's last four) rank below all of a's
    scores[group.offset : group.offset + 8] = torch.tensor([8.0, 7, 6, 5, 0.4, 0.3, 0.2, 0.1])
    predict = size_predictor(layout, measure_size(model, X), "params")
    with pytest.raises(UnreachableTarget) as unreachable:
        select_neurons(layout, scores, 0, predict)
    remove_neurons(layout, select_neurons(layout, scores, unreachable.value.smallest, predict))
    # the group's top-ranked neuron is one of a's; b keeps its own best
    assert (model.a.out_channels, model.b.out_channels, model.gate.out_channels) == (1, 1, 2)
    assert model(X).shape == (X.shape[0], 5)
