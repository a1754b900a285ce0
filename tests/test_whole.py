"""What dependency groups must not cut: attention found by its innermost class name, and
traced as one opaque layer (``adasap.method.whole``)."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch_pruning import ops

from adasap.errors import UserError
from adasap.method import whole
from adasap.method.importance import magnitude_scores
from adasap.method.neurons import NeuronLayout
from adasap.method.pruner import Pruner
from adasap.method.pruning import remove_neurons
from adasap.method.schedule import PhaseSchedule
from adasap.method.whole import dependency_graph, is_attention


class ToyAttention(nn.Module):
    """Heads split by reshapes, as torchvision's Swin does in a function."""

    def __init__(self, width: int, heads: int, shrink: bool = False) -> None:
        super().__init__()
        self.heads, self.shrink = heads, shrink
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width // 2 if shrink else width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(b, n, c))


class ToyAttentionBlock(nn.Module):
    """Named after the attention it holds; its MLP is no attention."""

    def __init__(self, width: int, shrink: bool = False) -> None:
        super().__init__()
        self.attn = ToyAttention(width, 2, shrink)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x) if not self.attn.shrink else self.attn(x).repeat(1, 1, 2)
        return x + self.fc2(torch.relu(self.fc1(x)))


class Toy(nn.Module):
    def __init__(self, shrink: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.Sequential(ToyAttentionBlock(8), ToyAttentionBlock(8, shrink))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


X = torch.rand(2, 5, 6)


def test_attention_is_the_innermost_layer_named_so():
    model = Toy()
    assert [n for n, m in model.named_modules() if is_attention(m)] == [
        "blocks.0.attn",
        "blocks.1.attn",
    ]
    assert is_attention(nn.MultiheadAttention(8, 2))


def test_attention_is_traced_as_one_layer_and_its_stream_stays_whole():
    torch.manual_seed(0)
    model = Toy().eval()
    expected = model(X)
    graph = dependency_graph(model, X, [model.head])
    attn = model.blocks[0].attn
    assert graph.module2node[attn].type == ops.OPTYPE.CUSTOMIZED
    assert attn.qkv not in graph.module2node and attn.proj not in graph.module2node
    assert torch.equal(model(X), expected)  # the stand-in is gone
    layout = NeuronLayout(model, X, [model.head])
    # the MLPs' hidden units only: the stream (embed, fc2) meets attention and stays whole
    assert [(g.name, g.size) for g in layout.groups] == [("blocks.0.fc1", 32), ("blocks.1.fc1", 32)]


def test_a_class_with_a_layer_changing_its_input_shape_is_traced_whole():
    model = Toy(shrink=True).eval()
    graph = dependency_graph(model, X, [model.head])
    attn = model.blocks[0].attn
    assert graph.module2node[attn.qkv].module is attn.qkv  # traced inside, as Torch-Pruning does
    assert attn not in graph.module2node


@pytest.mark.parametrize(
    "name",
    # SHViT's, iFormer's and EfficientViM's token mixers with them
    ["Attention", "ClassAttn", "TalkingHeadAttn", "GPSA", "MHSA", "FocalModulation", "SHSA",
     "SHMA", "HSMSSD"],
)  # fmt: skip
def test_attention_class_names_of_timm_and_torchvision(name):
    assert is_attention(type(name, (nn.Module,), {})())
    assert not is_attention(type("Attentive", (nn.Module,), {})())


class TokenMixer(ToyAttention):
    """A user's mixer whose class name says nothing of attention."""


@pytest.mark.parametrize("registered", [TokenMixer, "TokenMixer"])
def test_a_registered_token_mixer_is_attention(monkeypatch, registered):
    monkeypatch.setattr(whole, "TOKEN_MIXERS", set(whole.TOKEN_MIXERS))
    model = nn.Sequential(
        nn.Linear(6, 8), TokenMixer(8, 2), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)
    ).eval()
    assert not is_attention(model[1])
    whole.register_token_mixer(registered)
    assert is_attention(model[1])
    assert (
        dependency_graph(model, X, [model[4]]).module2node[model[1]].type == ops.OPTYPE.CUSTOMIZED
    )
    layout = NeuronLayout(model, X, [model[4]])
    assert [(g.name, g.size) for g in layout.groups] == [("2", 16)]  # not the mixer's own
    with pytest.raises(TypeError, match="takes an nn.Module class or its name"):
        whole.register_token_mixer(nn.Linear(2, 2))


def test_a_group_torch_pruning_maps_past_a_parameters_end_stays_whole(monkeypatch):
    timm = pytest.importorskip("timm")
    # ConViT's GPSA taken for no attention: Torch-Pruning maps indices past a parameter's end
    # (scoring it raised IndexError)
    monkeypatch.setattr(whole, "ATTENTION_NAME", re.compile("Attention"))
    model = timm.create_model("convit_tiny", num_classes=3, img_size=32).eval()
    layout = NeuronLayout(model, torch.rand(1, 3, 32, 32), [model.head])
    assert layout.groups and all(
        int(s.idxs.max()) < s.param.shape[s.dim] for g in layout.groups for s in g.slices
    )
    assert magnitude_scores(layout).shape == (layout.num_neurons,)


def test_a_concatenation_of_parts_of_unknown_width_is_traced_and_kept_whole():
    timm = pytest.importorskip("timm")
    # Torch-Pruning 1.6 raised TypeError summing the parts' widths on this model
    model = timm.create_model("cs3darknet_focus_s", num_classes=3).eval()
    layout = NeuronLayout(model, torch.rand(1, 3, 32, 32), [model.head.fc])
    unmapped = [n for n in layout.graph.module2node.values() if whole.moves_channels(n)]
    assert unmapped and all(isinstance(n.module, ops._ConcatOp) for n in unmapped)
    assert layout.groups  # the groups not reaching them are pruned


def test_a_channel_concatenation_moves_channels_only_while_unmapped():
    cat = SimpleNamespace(name=lambda: "CatBackward0", _saved_dim=1)
    node = SimpleNamespace(grad_fn=cat, module=ops._ConcatOp(0))
    assert whole.moves_channels(node)
    node.module.offsets = [0, 4, 8]
    assert not whole.moves_channels(node)
    node.module.offsets, cat._saved_dim = None, 2  # along another dim: not channels
    assert not whole.moves_channels(node)


class Ghost(nn.Module):
    """GhostNet's module (a conv's output concatenated with a depthwise conv of it) gated by
    a squeeze-excite conv, beside SqueezeNet's Fire (two expansions concatenated)."""

    def __init__(self, gate_first: bool = False) -> None:
        super().__init__()
        if gate_first:  # the gate is then the first layer of the ghost's group
            self.gate = nn.Conv2d(8, 8, 1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.primary = nn.Conv2d(8, 4, 1)
        self.cheap = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        if not gate_first:
            self.gate = nn.Conv2d(8, 8, 1)
        self.expand1, self.expand3 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)
        self.heads = nn.ModuleList([nn.Conv2d(8, 3, 1), nn.Conv2d(8, 3, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        ghost = torch.cat([self.primary(x), self.cheap(self.primary(x))], 1)
        ghost = ghost * torch.sigmoid(self.gate(ghost.mean((2, 3), keepdim=True)))
        fire = torch.cat([self.expand1(x), self.expand3(x)], 1)
        return (self.heads[0](ghost) + self.heads[1](fire)).mean((2, 3))


def test_a_channel_and_its_copy_concatenated_are_one_neuron():
    torch.manual_seed(0)
    model = Ghost().eval()
    images = torch.rand(2, 3, 6, 6)
    layout = NeuronLayout(model, images, list(model.heads))
    groups = [(g.name, g.size) for g in layout.groups]
    assert groups == [("stem", 8), ("primary", 4), ("expand1", 4), ("expand3", 4)]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (zeroed.primary, zeroed.cheap):
            layer.weight[1], layer.bias[1] = 0, 0
    remove_neurons(layout, torch.tensor([8 + 1]))  # the primary's channel 1 and its copy
    assert model.primary.out_channels == model.cheap.out_channels == 3
    assert model.gate.out_channels == model.gate.in_channels == model.heads[0].in_channels == 6
    assert torch.allclose(model(images), zeroed(images), atol=1e-6)


def test_a_group_mapping_a_channel_and_its_copy_apart_stays_whole():
    # from the gate, Torch-Pruning maps the ghost's parts as channels of their own: removing
    # one part's channel would remove its copy unseen and could empty the primary conv
    model = Ghost(gate_first=True).eval()
    images = torch.rand(2, 3, 6, 6)
    layout = NeuronLayout(model, images, list(model.heads))
    assert [(g.name, g.size) for g in layout.groups] == [
        ("stem", 8), ("expand1", 4), ("expand3", 4),
    ]  # fmt: skip
    remove_neurons(layout, torch.tensor([0, 1, 2, 8, 12]))
    assert model.primary.out_channels == 4 and model(images).shape == (2, 3)


class ToyConvAttention(nn.Module):
    """Attention on ``N x C x H x W`` maps with 1x1 convolutions (EfficientViT-M, LeViT)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Conv2d(width, 3 * width, 1), nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, 2, c // 2, h * w).unbind(1)
        out = v @ (q.transpose(-2, -1) @ k).softmax(-1)
        return self.proj(out.reshape(b, c, h, w))


def test_a_convolutional_attention_reads_its_channels_along_dim_1():
    stem, attn, head = nn.Conv2d(3, 6, 1), ToyConvAttention(6), nn.Linear(6, 3)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.attn, self.head = stem, attn, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            return self.head((x + self.attn(x)).mean((2, 3)))

    model = Net().eval()
    images = torch.rand(1, 3, 4, 5)
    graph = dependency_graph(model, images, [head])
    assert graph.module2node[attn].type == ops.OPTYPE.CUSTOMIZED
    assert graph.get_out_channels(attn) == 6
    assert NeuronLayout(model, images, [head]).groups == []  # the stream meets attention


class ToyStateAttention(ToyAttention):
    """A mixer returning its own state besides its output (EfficientViM's HSMSSD)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x), self.qkv(x)


class ToyStateNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mixer = nn.Linear(6, 8), ToyStateAttention(8, 2)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head, self.state_head = nn.Linear(8, 3), nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, state = self.mixer(self.embed(x))
        y = y + self.fc2(torch.relu(self.fc1(y)))
        return self.head(y.mean(1)) + self.state_head(state.mean(1))


def test_a_mixer_returning_its_state_is_traced_as_one_layer_and_pruned_around():
    model = ToyStateNet().eval()
    graph = dependency_graph(model, X, [model.head, model.state_head])
    assert graph.module2node[model.mixer].type == ops.OPTYPE.CUSTOMIZED
    layout = NeuronLayout(model, X, [model.head, model.state_head])
    assert [(g.name, g.size) for g in layout.groups] == [("fc1", 16)]
    remove_neurons(layout, torch.arange(8))
    assert model.fc1.out_features == 8 and model(X).shape == (2, 3)


def test_a_model_whose_every_group_stays_whole_is_refused_saying_so():
    model = nn.Sequential(nn.Linear(6, 8), ToyAttention(8, 2), nn.Linear(8, 3))
    with pytest.raises(UserError, match=r"^the model has no prunable layers: every group .*whole"):
        Pruner(model, X, PhaseSchedule(0, 1, 1, removals=1), ignored_layers=[model[2]], keep=0.5)
