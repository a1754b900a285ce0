"""torchvision's Swin window attention (ShiftedWindowAttention, V1; ShiftedWindowAttentionV2)
loses whole heads exactly through a head-pruned subclass, predicts its size, and the pruned
models save, reload and export."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)

from adasap.method.heads import ADAPTERS, count_macs, qualified_name, remove_heads
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size, predict_size, remove_neurons
from adasap.method.window_heads import (
    HeadPrunedShiftedWindowAttention,
    HeadPrunedShiftedWindowAttentionV2,
)
from head_checks import pruned_saved_reloaded_exported, removed_as_predicted

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
PADDED = torch.rand(2, 3, 36, 36, generator=torch.Generator().manual_seed(1))
LAYERS = ["features.1.0.attn", "features.1.1.attn", "features.3.0.attn"]
VERSIONS = ["v1", "v2"]


def tiny_swin(version: str, num_classes: int = 10) -> SwinTransformer:
    """Swin's layers in small: 2 blocks of 2 heads of 8 on 8 x 8 tokens in 4 windows of 4 x 4
    (the second shifted: masked), then 1 block of 4 heads of 8 on one window."""
    torch.manual_seed(0)
    v2 = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=[4, 4],
        num_classes=num_classes, **(v2 if version == "v2" else {}),
    ).eval()  # fmt: skip


def num_heads(model: nn.Module) -> list[int]:
    return [attn.num_heads for attn in attentions(model)]


def attentions(model: nn.Module) -> list[nn.Module]:
    return [model.get_submodule(name) for name in LAYERS]


def head_groups(layout: NeuronLayout) -> list:
    return [g for g in layout.groups if g.heads is not None]


def zero_heads(attn: nn.Module, heads: list[int], head_dim: int = 8, *, qkv: bool = True) -> None:
    """What removing ``heads`` leaves of the dense layer's output: their q/k/v rows (weight,
    bias) and their ``proj`` columns zeroed."""
    count = attn.num_heads
    with torch.no_grad():
        for h in heads:
            attn.proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0
            for part in range(3) if qkv else ():
                rows = slice((part * count + h) * head_dim, (part * count + h + 1) * head_dim)
                attn.qkv.weight[rows] = 0
                attn.qkv.bias[rows] = 0


@pytest.mark.parametrize("version", VERSIONS)
def test_every_torchvision_window_attention_is_a_group_of_heads_with_its_own_biases(version):
    model = tiny_swin(version)
    layout = NeuronLayout(model, X, [model.head])
    assert [(g.name, g.size) for g in head_groups(layout)] == list(
        zip(LAYERS, (2, 2, 4), strict=True)
    )
    attn = attentions(model)[0]
    slices = {(s.module, s.attr, s.dim, s.is_output): s for s in head_groups(layout)[0].slices}
    own = (
        {(attn, "logit_scale", 0, True), (attn.cpb_mlp[2], "weight", 0, True)}
        if version == "v2"
        else {(attn, "relative_position_bias_table", 1, True)}
    )
    assert (
        set(slices)
        == {
            (attn.qkv, "weight", 0, True),
            (attn.qkv, "bias", 0, True),
            (attn.proj, "weight", 1, False),
        }
        | own
    )
    # row r of qkv is q, k or v of head (r mod 16) // 8
    assert torch.equal(slices[(attn.qkv, "weight", 0, True)].roots, torch.arange(48) % 16 // 8)
    for key in own:
        assert torch.equal(slices[key].roots, torch.arange(2))


@pytest.mark.parametrize("version", VERSIONS)
def test_removing_torchvision_window_heads_replaces_the_layers_with_exact_shapes(version):
    model = tiny_swin(version)
    dense = copy.deepcopy(model)
    names = list(model.state_dict())
    layout = NeuronLayout(model, X, [model.head])
    first, second, third = head_groups(layout)
    neurons = torch.tensor([first.offset + 1, second.offset, third.offset, third.offset + 2])
    removed_as_predicted(layout, neurons, X)
    pruned = (
        HeadPrunedShiftedWindowAttentionV2 if version == "v2" else HeadPrunedShiftedWindowAttention
    )
    for attn, kept, width in zip(attentions(model), (1, 1, 2), (16, 16, 32), strict=True):
        assert type(attn) is pruned and attn.num_heads == kept
        assert attn.qkv.weight.shape == (24 * kept, width) and attn.qkv.out_features == 24 * kept
        assert attn.qkv.bias.shape == (24 * kept,)
        assert attn.proj.weight.shape == (width, 8 * kept) and attn.proj.in_features == 8 * kept
        if version == "v2":
            assert attn.logit_scale.shape == (kept, 1, 1)
            assert attn.cpb_mlp[2].weight.shape == (kept, 512)
            assert attn.cpb_mlp[2].out_features == kept
        else:
            assert attn.relative_position_bias_table.shape == (49, kept)
    # the optimizer and the weights files know parameters by name: the names stay
    assert list(model.state_dict()) == names
    for attn, heads in zip(attentions(dense), ([1], [0], [0, 2]), strict=True):
        zero_heads(attn, heads)
    with torch.no_grad():
        torch.testing.assert_close(model(X), dense(X), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(PADDED), dense(PADDED), atol=1e-5, rtol=0)
    # a replaced layer is traced and loses heads again like the stock one (one head: kept)
    layout = NeuronLayout(model, X, [model.head])
    assert [(g.name, g.size) for g in head_groups(layout)] == [("features.3.0.attn", 2)]
    removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
    removed[head_groups(layout)[0].offset + 1] = True  # the original head 3
    predicted, _ = predict_size(layout, removed, measure_size(model, X))
    remove_neurons(layout, torch.nonzero(removed).flatten())
    assert predicted == measure_size(model, X)
    zero_heads(attentions(dense)[2], [3])
    assert attentions(model)[2].num_heads == 1 and type(attentions(model)[2]) is pruned
    with torch.no_grad():
        torch.testing.assert_close(model(X), dense(X), atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_zeroing_only_the_proj_columns_of_a_torchvision_window_head_already_removes_it(version):
    model, dense = tiny_swin(version), tiny_swin(version)
    remove_heads(model, "features.1.1.attn", [0])  # shifted windows: masked
    zero_heads(attentions(dense)[1], [0], qkv=False)
    with torch.no_grad():
        torch.testing.assert_close(model(X), dense(X), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [[0, 0], [2, 2]], ids=["windows", "shifted"])
@pytest.mark.parametrize("version", VERSIONS)
def test_the_replacement_computes_what_torchvision_computes(version, shift):
    """Every head kept: the same outputs to the bit, on a feature map padded to whole windows,
    and in training, its two dropouts drawn in the same order."""
    cls = ShiftedWindowAttentionV2 if version == "v2" else ShiftedWindowAttention
    torch.manual_seed(0)
    stock = cls(16, [4, 4], shift, 2, attention_dropout=0.2, dropout=0.1)
    with torch.no_grad():
        stock.qkv.bias.normal_()  # V2 zeroes the k part in its forward: so must the replacement
    same = ADAPTERS.get(qualified_name(cls)).set_heads(copy.deepcopy(stock), 2)
    assert type(same) is not cls and isinstance(same, cls)
    assert list(same.state_dict()) == list(stock.state_dict())
    tokens = torch.randn(2, 9, 10, 16)
    for training in (False, True):
        stock.train(training)
        same.train(training)
        torch.manual_seed(1)
        expected = stock(tokens)
        torch.manual_seed(1)
        assert torch.equal(same(tokens), expected)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_kept_torchvision_window_head_keeps_its_own_bias_parameters(version):
    model = tiny_swin(version)
    attn = attentions(model)[2]
    own = (
        [("logit_scale", 0), ("cpb_mlp.2.weight", 0)]
        if version == "v2"
        else [("relative_position_bias_table", 1)]
    )
    with torch.no_grad():
        for name, _ in own:  # each head's its own value
            nn.init.normal_(attn.get_parameter(name))
    before = {name: attn.get_parameter(name).detach().clone() for name, _ in own}
    remove_heads(model, "features.3.0.attn", [1, 2])
    attn = attentions(model)[2]
    for name, dim in own:
        kept = before[name].index_select(dim, torch.tensor([0, 3]))
        assert torch.equal(attn.get_parameter(name), kept)


def test_widths_disagreeing_with_the_head_count_keep_the_layer_whole():
    for version in VERSIONS:
        attn = attentions(tiny_swin(version))[0]
        adapter = ADAPTERS.get(qualified_name(type(attn)))
        assert adapter.heads(attn).exact
        attn.num_heads = 3  # 48 q/k/v rows are no 3 heads of one width
        assert not adapter.heads(attn).exact
    attn = attentions(tiny_swin("v1"))[0]
    attn.relative_position_bias_table = nn.Parameter(torch.zeros(49, 3))
    assert not ADAPTERS.get(qualified_name(type(attn))).heads(attn).exact
    attn = attentions(tiny_swin("v2"))[0]
    attn.cpb_mlp.append(nn.Tanh())  # its last layer no Linear: which rows are the heads'?
    assert not ADAPTERS.get(qualified_name(type(attn))).heads(attn).exact


@pytest.mark.parametrize("x", [X, PADDED], ids=["32px", "36px padded"])
@pytest.mark.parametrize("version", VERSIONS)
def test_torch_pruning_counts_torchvision_window_attention_as_count_macs(version, x):
    """Every token of the feature map padded to whole 4 x 4 windows through qkv and proj
    (weights and biases), and each head's attention matrices per window (q scaling, q k^T,
    softmax, attention @ v), per image; V2's bias MLP runs once per call: not counted."""
    for cls in (ShiftedWindowAttention, ShiftedWindowAttentionV2):
        assert tp.utils.op_counter.MODULES_MAPPING[cls] is count_macs
    for cls in (HeadPrunedShiftedWindowAttention, HeadPrunedShiftedWindowAttentionV2):
        assert tp.utils.op_counter.MODULES_MAPPING[cls] is count_macs
    model = tiny_swin(version)
    # tokens per side of each stage, padded to whole windows: 8 or 9 -> 12, then 4 or 5 -> 8
    padded = {32: (8, 4), 36: (12, 8)}[x.shape[-1]]
    tokens = [side**2 for side in padded]
    windows = [(side // 4) ** 2 for side in padded]
    matrices = 16 * (16 * (2 * 8 + 1) + 8)  # one head's, per window of 16 tokens of 8
    first = tokens[0] * (16 * 48 + 48 + 16 * 16 + 16) + 2 * windows[0] * matrices
    second = tokens[1] * (32 * 96 + 96 + 32 * 32 + 32) + 4 * windows[1] * matrices
    assert (first, second) == {32: (105472, 85504), 36: (237312, 342016)}[x.shape[-1]]
    for name, macs in zip(LAYERS, (first, first, second), strict=True):
        assert measure_size(model, x, part=model.get_submodule(name)).macs == macs
    remove_heads(model, "features.1.0.attn", [0])
    remove_heads(model, "features.3.0.attn", [1, 2, 3])
    # a head's share of all but proj's bias, which stays
    per_head = [(first - tokens[0] * 16) // 2, (second - tokens[1] * 32) // 4]
    left = (first - per_head[0], first, second - 3 * per_head[1])
    for name, macs in zip(LAYERS, left, strict=True):
        assert measure_size(model, x, part=model.get_submodule(name)).macs == macs


def test_a_pruned_torchvision_swin_traces_with_torch_fx():
    """torchvision's feature extraction (torch.fx) calls the window attention whole, as it
    calls torchvision's own."""
    model = tiny_swin("v2")
    remove_heads(model, "features.1.1.attn", [1])
    extractor = create_feature_extractor(model, {"features.1": "stage", "head": "logits"})
    with torch.no_grad():
        assert torch.equal(extractor(X)["logits"], model(X))


@pytest.mark.parametrize("version", VERSIONS)
def test_torchvision_swin_pruned_to_half_its_parameters_saves_reloads_and_exports(
    version, tmp_path
):
    heads, _ = pruned_saved_reloaded_exported(
        lambda: tiny_swin(version, num_classes=4), 32, X[:1], num_heads, tmp_path
    )
    assert min(heads) >= 1 and sum(heads) < 8
