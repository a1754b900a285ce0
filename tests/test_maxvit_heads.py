"""Heads of torchvision's MaxViT attention as neurons: they go whole and exactly, through an
equivalent replacement module, and the pruned models predict their size, save, reload and
export."""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn
from torchvision.models import MaxVit
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

from adasap.method.heads import remove_heads, replay_heads
from adasap.method.maxvit_heads import HeadPrunedRelativePositionalMultiHeadAttention
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size, predict_size, remove_neurons
from head_checks import pruned_saved_reloaded_exported

X = torch.rand(2, 3, 32, 32)
NAMES = [
    "blocks.0.layers.0.layers.window_attention.attn_layer.1",
    "blocks.0.layers.0.layers.grid_attention.attn_layer.1",
    "blocks.1.layers.0.layers.window_attention.attn_layer.1",
    "blocks.1.layers.0.layers.grid_attention.attn_layer.1",
]


def tiny_maxvit(num_classes: int = 10) -> nn.Module:
    """MaxViT in small: 8 x 8 then 4 x 4 maps in 2 x 2 partitions (4 tokens each), a block
    and a grid attention per stage, 4 then 8 heads of 4 (widths 16 and 32)."""
    torch.manual_seed(0)
    return MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
        block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=num_classes,
    ).eval()  # fmt: skip


def attentions(model: nn.Module) -> list[nn.Module]:
    return [model.get_submodule(name) for name in NAMES]


def head_groups(layout):
    return [g for g in layout.groups if g.heads is not None]


def test_every_maxvit_attention_is_a_group_of_heads_with_its_bias_table_columns():
    model = tiny_maxvit()
    layout = NeuronLayout(model, X, [model.classifier[5]])
    groups = head_groups(layout)
    assert [(g.name, g.size) for g in groups] == list(zip(NAMES, (4, 4, 8, 8), strict=True))
    attn = attentions(model)[2]
    slices = {(s.module, s.attr, s.dim, s.is_output): s for s in groups[2].slices}
    assert set(slices) == {
        (attn.to_qkv, "weight", 0, True),
        (attn.to_qkv, "bias", 0, True),
        (attn.merge, "weight", 1, False),
        (attn, "relative_position_bias_table", 1, True),
    }
    # row r of to_qkv is q, k or v of head (r mod 32) // 4
    rows = slices[(attn.to_qkv, "weight", 0, True)]
    assert torch.equal(rows.roots, torch.arange(96) % 32 // 4)
    assert torch.equal(slices[(attn.merge, "weight", 1, False)].roots, torch.arange(32) // 4)
    table = slices[(attn, "relative_position_bias_table", 1, True)]
    assert torch.equal(table.roots, torch.arange(8))
    # a head's MACs per sample: 4 tokens in each of 4 partitions (4 x 4 map), its q/k/v rows
    # and merge columns per token, its logits (q k^T), softmax, key scaling and attention @ v
    assert groups[2].heads.macs == 16 * (3 * 4 * 32 + 3 * 4 + 4 * 32) + 16 * (4 * 9 + 4)


def test_removing_heads_leaves_exact_shapes_the_predicted_size_and_zeroed_heads_output():
    model = tiny_maxvit()
    dense = copy.deepcopy(model)
    keys = list(model.state_dict())
    layout = NeuronLayout(model, X, [model.classifier[5]])
    groups = head_groups(layout)
    chosen = {0: [1], 1: [], 2: [0, 5], 3: [0, 1, 2, 3, 4, 7]}
    removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
    for i, heads in chosen.items():
        removed[[groups[i].offset + h for h in heads]] = True
    before = measure_size(model, X)
    predicted, _ = predict_size(layout, removed, before)
    remove_neurons(layout, torch.nonzero(removed).flatten())
    assert predicted == measure_size(model, X)
    # a head's q/k/v rows (weight and bias), merge columns and bias-table column
    assert before.params - predicted.params == (16 * 16 + 12 + 9) + 8 * (16 * 32 + 12 + 9)
    for attn, kept, width in zip(attentions(model), (3, 4, 6, 2), (16, 16, 32, 32), strict=True):
        pruned = kept < width // 4
        assert isinstance(attn, HeadPrunedRelativePositionalMultiHeadAttention) == pruned
        assert attn.n_heads == kept and attn.head_dim == 4
        assert attn.scale_factor == width**-0.5  # the input width's, whatever heads remain
        assert (
            attn.to_qkv.weight.shape == (12 * kept, width) and attn.to_qkv.out_features == 12 * kept
        )
        assert attn.to_qkv.bias.shape == (12 * kept,)
        assert attn.merge.weight.shape == (width, 4 * kept) and attn.merge.in_features == 4 * kept
        assert attn.relative_position_bias_table.shape == (9, kept)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        for attn, heads in zip(attentions(dense), chosen.values(), strict=True):
            for h in heads:  # a head reaches the output only through its merge columns
                attn.merge.weight[:, 4 * h : 4 * h + 4] = 0
        torch.testing.assert_close(model(X), dense(X), atol=1e-5, rtol=0)


def test_the_replacement_computes_what_the_torchvision_module_computes():
    torch.manual_seed(0)
    stock = RelativePositionalMultiHeadAttention(24, 6, 9).eval()
    same = HeadPrunedRelativePositionalMultiHeadAttention(copy.deepcopy(stock), 4).eval()
    assert same.state_dict().keys() == stock.state_dict().keys()
    assert same.scale_factor == stock.scale_factor and same.size == 3 and same.max_seq_len == 9
    x = torch.randn(2, 5, 9, 24)
    with torch.no_grad():
        assert torch.equal(same(x), stock(x))


def test_a_kept_head_keeps_its_own_bias_table_column_and_a_pruned_layer_loses_more():
    model = tiny_maxvit()
    name = NAMES[3]
    table = model.get_submodule(name).relative_position_bias_table.detach().clone()
    remove_heads(model, name, [1, 6])
    assert torch.equal(
        model.get_submodule(name).relative_position_bias_table, table[:, [0, 2, 3, 4, 5, 7]]
    )
    entry = remove_heads(model, name, [0, 4])  # the replacement's heads 0 and 4: 0 and 5
    assert entry == [name + ":heads", True, [0, 4]]
    attn = model.get_submodule(name)
    assert attn.n_heads == 4
    assert torch.equal(attn.relative_position_bias_table, table[:, [2, 3, 4, 7]])
    fresh = tiny_maxvit()
    replay_heads(fresh, [name + ":heads", True, [1, 6]])
    replay_heads(fresh, entry)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


def test_dense_maxvit_attention_macs_add_what_torch_pruning_leaves_out(monkeypatch):
    """Torch-Pruning has no counter of its own for the layer: it counts its two Linear layers
    (each bias once). adasap counts every token's bias and each head's attention matrices,
    which the head takes with it when it goes."""
    model = tiny_maxvit()
    ours = measure_size(model, X)
    monkeypatch.delitem(tp.utils.op_counter.MODULES_MAPPING, RelativePositionalMultiHeadAttention)
    theirs = measure_size(model, X)
    assert theirs.params == ours.params

    def left_out(rows: int, width: int, heads: int) -> int:
        """rows = partitions x tokens per sample; partitions of 4 tokens, heads of 4."""
        biases = (rows - 1) * 4 * width
        return biases + heads * rows * (4 * 9 + 4)

    assert ours.macs - theirs.macs == 2 * left_out(64, 16, 4) + 2 * left_out(16, 32, 8) == 42624


def test_maxvit_pruned_to_half_its_parameters_saves_reloads_and_exports(tmp_path):
    def heads_of(model):
        return [attn.n_heads for attn in attentions(model)]

    heads, result = pruned_saved_reloaded_exported(
        lambda: tiny_maxvit(4), 32, X[:1], heads_of, tmp_path
    )
    assert result.keep_fraction("params") >= 0.49
    # heads and the MLP hidden units inside each PartitionAttentionLayer go together
    entries = [e for e in result.pruning_history if e[0].endswith(":heads")]
    assert [e[0].removesuffix(":heads") for e in entries] == NAMES
    assert heads == [2, 2, 3, 5]

    def hidden(model):
        return [m.mlp_layer[1].out_features for m in model.modules() if hasattr(m, "mlp_layer")]

    pruned, dense = hidden(result.model), hidden(tiny_maxvit(4))
    assert all(p < d for p, d in zip(pruned, dense, strict=True)), (pruned, dense)
