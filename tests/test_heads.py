"""Attention heads as neurons (issue #28, attention): timm's Attention and torch's
nn.MultiheadAttention lose whole heads, exactly, and the pruned models save, reload, export
and predict their size."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from adasap.deploy.serialization import load_model, save_model
from adasap.errors import UserError
from adasap.method.heads import HeadPrunedMultiheadAttention, remove_heads
from adasap.method.neurons import NeuronLayout
from adasap.method.optim import AdaSAP
from adasap.method.pruner import Pruner
from adasap.method.pruning import (
    measure_size,
    named_optimizer_state,
    predict_size,
    remove_neurons,
    replay_pruning,
    select_neurons,
    size_predictor,
    transfer_optimizer_state,
)
from adasap.method.schedule import PhaseSchedule
from head_checks import pruned_saved_reloaded_exported, removed_as_predicted

timm = pytest.importorskip("timm")

X = torch.rand(2, 3, 32, 32)


def tiny_vit(**kwargs) -> nn.Module:
    """ViT-Tiny's blocks (3 heads of 64, width 192) on 32 px images in 16 patches, 2 blocks."""
    torch.manual_seed(0)
    options = dict(img_size=32, patch_size=8, depth=2, num_classes=10, **kwargs)
    return timm.create_model("vit_tiny_patch16_224", **options).eval()


class TorchEncoder(nn.Module):
    """Tokens through two nn.MultiheadAttention blocks (4 heads of 8), batch first or not."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 32)
        self.attention = nn.ModuleList(
            nn.MultiheadAttention(32, 4, batch_first=batch_first) for _ in range(2)
        )
        self.fc1, self.fc2 = nn.Linear(32, 16), nn.Linear(16, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x if self.batch_first else x.transpose(0, 1)
        for attention in self.attention:
            x = x + attention(x, x, x, need_weights=False)[0]
        x = x if self.batch_first else x.transpose(0, 1)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


TOKENS = torch.randn(2, 5, 6)


def zero_heads(qkv_weight, qkv_bias, proj_weight, heads, head_dim, *, qkv=True):
    """What removing ``heads`` leaves of the dense layer's output: their q/k/v rows (weight,
    bias) and their output-projection columns zeroed."""
    count = proj_weight.shape[1] // head_dim
    with torch.no_grad():
        for h in heads:
            columns = slice(h * head_dim, (h + 1) * head_dim)
            proj_weight[:, columns] = 0
            for part in range(3) if qkv else ():
                rows = slice((part * count + h) * head_dim, (part * count + h + 1) * head_dim)
                qkv_weight[rows] = 0
                if qkv_bias is not None:
                    qkv_bias[rows] = 0


def head_groups(layout):
    return [g for g in layout.groups if g.heads is not None]


# --- timm's Attention ------------------------------------------------------------------------


def test_every_timm_attention_is_a_group_of_heads_with_its_qkv_rows_and_proj_columns():
    model = tiny_vit()
    layout = NeuronLayout(model, X, [model.head])
    groups = head_groups(layout)
    assert [(g.name, g.size) for g in groups] == [("blocks.0.attn", 3), ("blocks.1.attn", 3)]
    attn = model.blocks[0].attn
    slices = {(s.module, s.attr, s.dim, s.is_output): s for s in groups[0].slices}
    assert set(slices) == {
        (attn.qkv, "weight", 0, True),
        (attn.qkv, "bias", 0, True),
        (attn.proj, "weight", 1, False),
    }
    # row r of qkv is q, k or v of head (r mod 192) // 64
    rows = slices[(attn.qkv, "weight", 0, True)]
    assert torch.equal(rows.roots, (torch.arange(576) % 192) // 64)
    assert torch.equal(slices[(attn.proj, "weight", 1, False)].roots, torch.arange(192) // 64)


def test_removing_heads_leaves_exact_shapes_and_the_output_of_the_zeroed_heads():
    model = tiny_vit()
    dense = copy.deepcopy(model)
    layout = NeuronLayout(model, X, [model.head])
    first, second = head_groups(layout)
    remove_neurons(layout, torch.tensor([first.offset + 1, second.offset, second.offset + 2]))
    for block, kept in zip(model.blocks, (2, 1), strict=True):
        attn = block.attn
        assert attn.num_heads == kept and attn.attn_dim == kept * 64 and attn.head_dim == 64
        assert (
            attn.qkv.weight.shape == (3 * kept * 64, 192) and attn.qkv.out_features == 3 * kept * 64
        )
        assert attn.qkv.bias.shape == (3 * kept * 64,)
        assert attn.proj.weight.shape == (192, kept * 64) and attn.proj.in_features == kept * 64
    for block, heads in zip(dense.blocks, ([1], [0, 2]), strict=True):
        attn = block.attn
        zero_heads(attn.qkv.weight, attn.qkv.bias, attn.proj.weight, heads, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(X), dense(X), atol=1e-5, rtol=0)


def test_zeroing_only_the_output_columns_of_a_head_already_removes_it():
    """The identity the removal rests on: a head reaches the output only through its columns
    of the output projection, whatever its q/k/v rows hold."""
    model, dense = tiny_vit(), tiny_vit()
    remove_heads(model, "blocks.0.attn", [0])
    attn = dense.blocks[0].attn
    zero_heads(attn.qkv.weight, attn.qkv.bias, attn.proj.weight, [0], 64, qkv=False)
    with torch.no_grad():
        torch.testing.assert_close(model(X), dense(X), atol=1e-5, rtol=0)


def test_unfused_attention_and_qk_norms_lose_heads_exactly():
    model = tiny_vit(qk_norm=True)
    for block in model.blocks:
        block.attn.fused_attn = False
        nn.init.normal_(block.attn.q_norm.weight)  # within a head: the kept heads keep theirs
    dense = copy.deepcopy(model)
    remove_heads(model, "blocks.1.attn", [1])
    assert model.blocks[1].attn.q_norm.weight.shape == (64,)
    attn = dense.blocks[1].attn
    zero_heads(attn.qkv.weight, attn.qkv.bias, attn.proj.weight, [1], 64)
    with torch.no_grad():
        torch.testing.assert_close(model(X), dense(X), atol=1e-5, rtol=0)


def test_a_norm_over_all_heads_or_an_ignored_projection_keeps_the_layer_whole():
    model = tiny_vit()
    model.blocks[0].attn.norm = nn.LayerNorm(192)  # timm's scale_norm: over every head
    assert [g.name for g in head_groups(NeuronLayout(model, X, [model.head]))] == ["blocks.1.attn"]
    model = tiny_vit()
    layout = NeuronLayout(model, X, [model.head, model.blocks[1].attn.qkv])
    assert [g.name for g in head_groups(layout)] == ["blocks.0.attn"]


def test_predicted_size_is_the_measured_size_after_removing_heads():
    model = tiny_vit()
    layout = NeuronLayout(model, X, [model.head])
    dense = measure_size(model, X)
    removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
    first, second = head_groups(layout)
    removed[[first.offset, second.offset + 1, second.offset + 2]] = True
    predicted, _ = predict_size(layout, removed, dense)
    costs = layout.neuron_costs("macs")
    remove_neurons(layout, torch.nonzero(removed).flatten())
    measured = measure_size(model, X)
    # heads only: the MACs of the projections and of the attention matrices, exactly
    assert predicted == measured
    assert measured.macs < dense.macs and measured.params < dense.params
    # what a head costs in MACs: its projections' rows per token (q, k, v, output), its
    # attention matrices (q k^T, softmax, attention @ v) and its query scaling
    tokens, width, heads = 17, 192, 3
    per_head = tokens * (3 * 64 * width + 3 * 64 + 64 * width) + tokens * (
        tokens * (2 * 64 + 1) + 64
    )
    assert first.heads.macs == per_head
    assert dense.macs - measured.macs == 3 * per_head
    assert torch.equal(costs[first.offset : first.offset + heads], torch.full((heads,), per_head))


def test_linear_layers_on_tokens_count_their_tokens_in_the_macs_prediction():
    """A linear layer on (batch, tokens, channels) runs once per token: the MLP's predicted
    MACs are measured ones (the miss of issue #28 on ViT, ConvNeXt and MobileViT)."""
    model = tiny_vit()
    layout = NeuronLayout(model, X, [model.head])
    assert layout.output_pixels[model.blocks[0].mlp.fc1] == 17
    mlp = next(g for g in layout.groups if g.name == "blocks.0.mlp.fc1")
    ids = torch.arange(mlp.offset, mlp.offset + 100)
    removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
    removed[ids] = True
    predicted, _ = predict_size(layout, removed, measure_size(model, X))
    remove_neurons(layout, ids)
    measured = measure_size(model, X)
    assert predicted.params == measured.params
    # Torch-Pruning also counts the GELU (one per token) and the bias (once) of each unit
    assert predicted.macs - measured.macs == 100 * (17 + 1)


def test_heads_keep_at_least_min_channels_and_ignore_round_to():
    model = tiny_vit()
    layout = NeuronLayout(model, X, [model.head])
    scores = torch.rand(layout.num_neurons, generator=torch.Generator().manual_seed(1))
    predict = size_predictor(layout, measure_size(model, X), "params")
    # blocks of 4: the MLP keeps multiples of 4, while a 3-head layer may still lose heads
    chosen = select_neurons(layout, scores, 300_000, predict, round_to=4)
    for group in head_groups(layout):
        gone = ((chosen >= group.offset) & (chosen < group.offset + group.size)).sum()
        assert 1 <= gone <= 2  # heads go, one always stays
    mlp = [g for g in layout.groups if g.heads is None]
    for group in mlp:
        gone = int(((chosen >= group.offset) & (chosen < group.offset + group.size)).sum())
        assert (group.size - gone) % 4 == 0
    # min_channels counts channels: 65 of them need two heads of 64
    chosen = select_neurons(layout, scores, 300_000, predict, min_channels=65)
    for group in head_groups(layout):
        assert ((chosen >= group.offset) & (chosen < group.offset + group.size)).sum() == 1


def test_adasap_radii_scale_each_heads_qkv_rows_by_its_own_radius():
    model = tiny_vit()
    layout = NeuronLayout(model, X, [model.head])
    ownership = layout.ownership()
    attn = model.blocks[0].attn
    group = head_groups(layout)[0]
    for p in (attn.qkv.weight, attn.qkv.bias):
        dim, ids = ownership.owners[p]
        assert dim == 0 and torch.equal(ids, group.offset + (torch.arange(576) % 192) // 64)
    assert attn.proj.weight not in ownership.owners  # its rows are the residual stream's
    opt = AdaSAP(model.parameters(), torch.optim.SGD, rho_min=0.1, rho_max=1.0, lr=0.1)
    radii = torch.full((layout.num_neurons,), 0.1)
    radii[group.offset + 2] = 1.0
    opt.set_radii(ownership, radii)
    model(X).square().mean().backward()
    e = opt.perturbations()[attn.qkv.weight]
    g = attn.qkv.weight.grad
    scale = e / g  # rho_i / ||g|| per element, wherever the gradient is non-zero
    head = (torch.arange(576) % 192) // 64
    nonzero = g.abs() > 1e-12
    ratio = (
        scale[head == 2][nonzero[head == 2]].mean() / scale[head == 0][nonzero[head == 0]].mean()
    )
    assert ratio == pytest.approx(10.0, rel=1e-4)


def test_momentum_of_the_kept_heads_carries_over():
    model = tiny_vit()
    layout = NeuronLayout(model, X, [model.head])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(X).square().mean().backward()
    optimizer.step()
    attn = model.blocks[0].attn
    old = optimizer.state[attn.qkv.weight]["momentum_buffer"].clone()
    state = named_optimizer_state(model, optimizer)
    kept = remove_neurons(layout, torch.tensor([head_groups(layout)[0].offset + 1]))
    rows = torch.nonzero((torch.arange(576) % 192) // 64 != 1).flatten()
    assert torch.equal(kept["blocks.0.attn.qkv.weight"][0], rows)
    assert torch.equal(
        kept["blocks.0.attn.proj.weight"][1], torch.cat([torch.arange(64), torch.arange(128, 192)])
    )
    new = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    transfer_optimizer_state(state, kept, model, new)
    assert torch.equal(new.state[attn.qkv.weight]["momentum_buffer"], old[rows])


def four_classes(make):
    def build():
        model = make()
        model.reset_classifier(4)
        return model

    return build


def test_prune_to_half_the_parameters_removes_heads_saves_reloads_and_exports(tmp_path):
    def heads_of(model):
        return [block.attn.num_heads for block in model.blocks]

    heads, _ = pruned_saved_reloaded_exported(four_classes(tiny_vit), 32, X, heads_of, tmp_path)
    assert min(heads) >= 1 and sum(heads) < 6


def test_a_damaged_head_entry_is_a_user_error_on_load(tmp_path):
    model = tiny_vit()
    save_model(tmp_path / "model", model, {"in_channels": 3, "image_size": 32},
               [["blocks.0.attn:heads", True, [0, 1, 2]]])  # fmt: skip
    with pytest.raises(UserError, match="pruning_history"):
        load_model(tmp_path / "model", base_model=tiny_vit())
    save_model(tmp_path / "other", model, {"in_channels": 3, "image_size": 32},
               [["blocks.0.mlp:heads", True, [0]]])  # fmt: skip
    with pytest.raises(UserError, match="no prunable layer"):
        load_model(tmp_path / "other", base_model=tiny_vit())


def test_pruner_resume_replays_heads_and_channels_in_order():
    model = tiny_vit()
    layout = NeuronLayout(model, X, [model.head])
    mlp = next(g for g in layout.groups if g.heads is None)
    remove_neurons(layout, torch.tensor([head_groups(layout)[1].offset, mlp.offset + 3]))
    history = list(layout.graph.pruning_history())
    layout = NeuronLayout(model, X, [model.head])  # a second removal, on the pruned model
    remove_neurons(layout, torch.tensor([head_groups(layout)[1].offset + 1]))
    history += layout.graph.pruning_history()
    fresh = tiny_vit()
    replay_pruning(fresh, history, X, [fresh.head])
    assert [b.attn.num_heads for b in fresh.blocks] == [3, 1]
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


@pytest.mark.parametrize("make", [tiny_vit, TorchEncoder], ids=["timm", "torch"])
def test_an_adasap_pruner_removes_heads_and_resumes_exactly(make):
    """Two removals with Taylor scores and per-neuron radii, then a resume on a fresh dense
    model: the heads replayed, the optimizer's state loaded, the same weights to the bit."""
    inputs = X if make is tiny_vit else TOKENS
    targets = torch.tensor([1, 2])
    schedule = PhaseSchedule(1, 3, 1, removals=2)

    def pruner():
        model = make()
        return Pruner(model, inputs, schedule, method="adasap", keep=0.6, keep_kind="params",
                      round_to=1, criterion="taylor", ignored_layers=[model.head],
                      optimizer_kwargs={"lr": 0.01, "momentum": 0.9})  # fmt: skip

    def step(p):
        p.step(lambda: nn.functional.cross_entropy(p.model(inputs), targets))

    reference = pruner()
    for _ in range(schedule.total_steps):
        step(reference)
    assert any(e[0].endswith(":heads") for e in reference.pruning_history)
    first = pruner()
    for _ in range(3):  # past the first removal
        step(first)
    saved = copy.deepcopy({"pruner": first.state_dict(), "model": first.model.state_dict()})
    resumed = pruner()
    resumed.load_state_dict(saved["pruner"])
    resumed.model.load_state_dict(saved["model"])
    for _ in range(3, schedule.total_steps):
        step(resumed)
    assert resumed.pruning_history == reference.pruning_history
    for (name, a), (_, b) in zip(
        resumed.model.state_dict().items(), reference.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


# --- torch's nn.MultiheadAttention ---------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads_are_removed_through_an_equivalent_module(batch_first):
    model = TorchEncoder(batch_first).eval()
    dense = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    layout = NeuronLayout(model, TOKENS, [model.head])
    groups = head_groups(layout)
    assert [(g.name, g.size) for g in groups] == [("attention.0", 4), ("attention.1", 4)]
    remove_neurons(
        layout, torch.tensor([groups[0].offset + 1, groups[0].offset + 3, groups[1].offset])
    )
    first, second = model.attention
    assert isinstance(first, HeadPrunedMultiheadAttention) and first.num_heads == 2
    assert first.in_proj_weight.shape == (48, 32) and first.in_proj_bias.shape == (48,)
    assert first.out_proj.weight.shape == (32, 16) and first.out_proj.in_features == 16
    assert second.num_heads == 3 and first.embed_dim == 32 and first.head_dim == 8
    # the optimizer and the weights files know parameters by name: the names stay
    assert [n for n, _ in model.named_parameters()] == names
    for attention, heads in zip(dense.attention, ([1, 3], [0]), strict=True):
        zero_heads(attention.in_proj_weight, attention.in_proj_bias, attention.out_proj.weight,
                   heads, 8)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), dense(TOKENS), atol=1e-5, rtol=0)
    # the replacement is traced and pruned again like the stock module
    layout = NeuronLayout(model, TOKENS, [model.head])
    assert [g.size for g in head_groups(layout)] == [2, 3]
    assert_removal_as_predicted(layout, model, head_groups(layout)[1].offset)
    assert model.attention[1].num_heads == 2


def assert_removal_as_predicted(layout, model, neuron):
    """Removing ``neuron`` leaves the size :func:`predict_size` said, parameters and MACs."""
    removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
    removed[neuron] = True
    predicted, _ = predict_size(layout, removed, measure_size(model, TOKENS))
    remove_neurons(layout, torch.nonzero(removed).flatten())
    assert predicted == measure_size(model, TOKENS)


def test_multihead_attention_macs_are_predicted_before_its_replacement():
    model = TorchEncoder().eval()
    layout = NeuronLayout(model, TOKENS, [model.head])
    assert_removal_as_predicted(layout, model, head_groups(layout)[0].offset)


def mha_cases():
    keys = torch.randn(2, 7, 32)
    return {
        "self": dict(),
        "weights": dict(need_weights=True),
        "per-head weights": dict(need_weights=True, average_attn_weights=False),
        "padding": dict(key_padding_mask=torch.tensor([[False] * 4 + [True], [False] * 5])),
        "float mask": dict(attn_mask=torch.randn(5, 5), need_weights=True),
        "bool mask": dict(attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1)),
        "cross": dict(key=keys, value=keys),
    }


@pytest.mark.parametrize("case", list(mha_cases()))
@pytest.mark.parametrize("batch_first", [True, False])
def test_the_replacement_computes_what_nn_multihead_attention_computes(case, batch_first):
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    same = HeadPrunedMultiheadAttention(copy.deepcopy(stock), 4).eval()
    options = dict(mha_cases()[case])
    query = torch.randn(2, 5, 32)
    key, value = options.pop("key", query), options.pop("value", query)
    options.setdefault("need_weights", False)
    if not batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    if case != "cross":
        key = value = query  # the same tensor: self-attention
    with torch.no_grad():
        expected = stock(query, key, value, **options)
        got = same(query, key, value, **options)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=0)


def test_the_replacement_takes_unbatched_input_and_refuses_per_head_masks():
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(16, 2).eval()
    same = HeadPrunedMultiheadAttention(copy.deepcopy(stock), 2).eval()
    tokens = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            same(tokens, tokens, tokens)[0], stock(tokens, tokens, tokens)[0]
        )
    with pytest.raises(ValueError, match="3-D attn_mask"):
        same(tokens, tokens, tokens, attn_mask=torch.zeros(2, 5, 5))


def test_a_transformer_encoder_layer_runs_its_pruned_attention_outside_its_fused_path():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), nn.Linear(32, 3)
    ).eval()
    dense = copy.deepcopy(model)
    remove_heads(model, "0.self_attn", [2])
    attention = dense[0].self_attn
    zero_heads(attention.in_proj_weight, attention.in_proj_bias, attention.out_proj.weight, [2], 8)
    tokens = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), dense(tokens), atol=1e-5, rtol=0)


def test_multihead_attention_with_bias_kv_stays_whole():
    model = TorchEncoder()
    model.attention[0] = nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True)
    layout = NeuronLayout(model.eval(), TOKENS, [model.head])
    assert [g.name for g in head_groups(layout)] == ["attention.1"]


# --- timm's WindowAttention (Swin) -----------------------------------------------------------

SWIN_X = torch.rand(2, 3, 56, 56)


def tiny_swin(**kwargs) -> nn.Module:
    """Swin-T's layers in small: 2 blocks of 2 heads of 12 on 14 x 14 tokens in windows of 7
    (the second shifted: masked), then 1 block of 4 heads of 12 on one window."""
    torch.manual_seed(0)
    options = dict(img_size=56, embed_dim=24, depths=(2, 1), num_heads=(2, 4), window_size=7)
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=5, **options, **kwargs)


def window_attentions(model):
    return [m for m in model.modules() if type(m).__name__ == "WindowAttention"]


def test_every_window_attention_is_a_group_of_heads_with_its_bias_table_columns():
    model = tiny_swin().eval()
    layout = NeuronLayout(model, SWIN_X, [model.head.fc])
    groups = head_groups(layout)
    assert [(g.name, g.size) for g in groups] == [
        ("layers.0.blocks.0.attn", 2),
        ("layers.0.blocks.1.attn", 2),
        ("layers.1.blocks.0.attn", 4),
    ]
    attn = window_attentions(model)[0]
    slices = {(s.module, s.attr, s.dim, s.is_output): s for s in groups[0].slices}
    assert set(slices) == {
        (attn.qkv, "weight", 0, True),
        (attn.qkv, "bias", 0, True),
        (attn.proj, "weight", 1, False),
        (attn, "relative_position_bias_table", 1, True),
    }
    assert torch.equal(slices[(attn.qkv, "weight", 0, True)].roots, torch.arange(72) % 24 // 12)
    table = slices[(attn, "relative_position_bias_table", 1, True)]
    assert torch.equal(table.idxs, torch.arange(2)) and torch.equal(table.roots, torch.arange(2))


@pytest.mark.parametrize("fused", [True, False])
def test_removing_window_heads_leaves_exact_shapes_and_the_output_of_the_zeroed_heads(fused):
    model = tiny_swin().eval()
    for attn in window_attentions(model):
        attn.fused_attn = fused
    dense = copy.deepcopy(model)
    layout = NeuronLayout(model, SWIN_X, [model.head.fc])
    first, second, third = head_groups(layout)
    neurons = torch.tensor([first.offset + 1, second.offset, third.offset, third.offset + 2])
    removed_as_predicted(layout, neurons, SWIN_X)
    for attn, kept, width in zip(window_attentions(model), (1, 1, 2), (24, 24, 48), strict=True):
        assert attn.num_heads == kept
        assert (
            attn.qkv.weight.shape == (3 * kept * 12, width) and attn.qkv.out_features == 36 * kept
        )
        assert attn.proj.weight.shape == (width, kept * 12) and attn.proj.in_features == 12 * kept
        assert attn.relative_position_bias_table.shape == (169, kept)
    for attn, heads in zip(window_attentions(dense), ([1], [0], [0, 2]), strict=True):
        zero_heads(attn.qkv.weight, attn.qkv.bias, attn.proj.weight, heads, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(SWIN_X), dense(SWIN_X), atol=1e-5, rtol=0)


def test_dense_window_attention_macs_are_those_torch_pruning_counts(monkeypatch):
    """adasap counts WindowAttention with heads.count_macs, which stays right as heads go;
    on the dense layer it counts what Torch-Pruning's own counter counts."""
    model = tiny_swin().eval()
    ours = measure_size(model, SWIN_X)
    counters = tp.utils.op_counter
    cls = type(window_attentions(model)[0])
    monkeypatch.setitem(
        counters.MODULES_MAPPING, cls, counters.timm_multihead_attention_counter_hook
    )
    assert measure_size(model, SWIN_X) == ours


def test_a_kept_window_head_keeps_its_own_bias_table_column():
    model = tiny_swin().eval()
    attn = window_attentions(model)[2]
    table = attn.relative_position_bias_table.detach().clone()
    remove_heads(model, "layers.1.blocks.0.attn", [1, 2])
    assert torch.equal(attn.relative_position_bias_table, table[:, [0, 3]])


def test_swin_pruned_to_half_its_parameters_saves_reloads_and_exports(tmp_path):
    def heads_of(model):
        return [attn.num_heads for attn in window_attentions(model)]

    heads, _ = pruned_saved_reloaded_exported(
        four_classes(tiny_swin), 56, SWIN_X[:1], heads_of, tmp_path
    )
    assert sum(heads) < sum(heads_of(tiny_swin()))
