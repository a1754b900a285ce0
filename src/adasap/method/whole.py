"""What Torch-Pruning's dependency groups must not cut: attention layers, channel moves, and
concatenations of a channel and its copy where Torch-Pruning maps the two apart.

A group reaching any of them is left whole by :class:`~adasap.method.neurons.NeuronLayout` (heads
are neurons of their own: :mod:`adasap.method.heads`; docs/models.md says why shuffled
channels stay).
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning._helpers import to_plain_idxs
from torch_pruning.dependency import Node

from adasap.method.examples import Example, run_example, tracing_forward
from adasap.method.layer_pruners import customized_pruners, mended_graph

# Torch-Pruning has its own pruner for these (their groups stay whole all the same)
TORCH_PRUNING_ATTENTION = (nn.MultiheadAttention,)
CHANNEL_MOVING_OPS = ("ChannelShuffle", "IndexSelect", "Gather", "PixelShuffle", "PixelUnshuffle")


# attention layers by class name: timm's Attention, ClassAttn, TalkingHeadAttn, torchvision's
# ShiftedWindowAttention, ...
ATTENTION_NAME = re.compile(r"Attention|Attn")
# token mixers that mix channels as attention does, by class name (or class) where the name
# does not say so: ConViT's GPSA and MHSA, SHViT's SHSA and iFormer's SHMA (single-head),
# EfficientViM's HSMSSD (a state-space mixer), FocalNet's FocalModulation
TOKEN_MIXERS: set[str | type[nn.Module]] = {
    "GPSA", "MHSA", "SHSA", "SHMA", "HSMSSD", "FocalModulation",
}  # fmt: skip


def register_token_mixer(layer: str | type[nn.Module]) -> None:
    """Treat the layers of class ``layer`` (a class, or a class name) as attention: their
    channels stay whole and tracing sees each as one layer. For a token mixer of your own
    whose removals break the model or whose trace is slow."""
    if not (isinstance(layer, str) or (isinstance(layer, type) and issubclass(layer, nn.Module))):
        raise TypeError(f"register_token_mixer takes an nn.Module class or its name, not {layer!r}")
    TOKEN_MIXERS.add(layer)


def _named_attention(module: nn.Module) -> bool:
    kind = type(module)
    return (
        isinstance(module, nn.MultiheadAttention)
        or bool(ATTENTION_NAME.search(kind.__name__))
        or kind.__name__ in TOKEN_MIXERS
        or kind in TOKEN_MIXERS
    )


def is_attention(module: nn.Module) -> bool:
    """Attention layers split channels into heads: Torch-Pruning's groups never cut them (the
    heads of those with an adapter are neurons of their own: :mod:`adasap.method.heads`).

    A layer counts by its class name, the innermost one: a block named after the attention it
    holds (torchvision's ``PartitionAttentionLayer`` in MaxViT) holds its MLP too, which stays
    prunable."""
    if not _named_attention(module):
        return False
    return not any(_named_attention(m) for m in module.modules() if m is not module)


def inside_attention(model: nn.Module) -> set[int]:
    """The ids of every attention layer of ``model``, the modules inside it and their
    parameters: what no dependency group may cut."""
    attention = [a for a in model.modules() if is_attention(a)]
    return {id(m) for a in attention for m in a.modules()} | {
        id(p) for a in attention for p in a.parameters()
    }


def moves_channels(node: object) -> bool:
    """An op moving channels, or a channel concatenation Torch-Pruning left unmapped (a part of
    unknown width): Torch-Pruning maps both as if element-wise."""
    grad_fn = getattr(node, "grad_fn", None)
    if grad_fn is not None and grad_fn.name().startswith(CHANNEL_MOVING_OPS):
        return True
    concat = getattr(node, "module", None)
    return (
        isinstance(concat, tp.ops._ConcatOp)
        and concat.offsets is None
        and getattr(grad_fn, "_saved_dim", None) == 1
    )


def _repeated_parts(cat_node: Node) -> list[tuple[int, int]]:
    """The pairs of parts of a concatenation carrying the same layer's channels (GhostNet
    concatenates a conv's output with a depthwise conv of it), decided once per concat."""
    concat = cat_node.module
    if not hasattr(concat, "repeated_parts"):
        sources = [_channel_sources(part) for part in cat_node.inputs]
        concat.repeated_parts = [
            (a, b) for a, b in itertools.combinations(range(len(sources)), 2)
            if sources[a] & sources[b]
        ]  # fmt: skip
    return concat.repeated_parts


def maps_copies_apart(node: Node, item: Any) -> bool:
    """Whether a group's ``item`` maps a concatenation's output as if parts carrying the same
    channels held channels of their own.

    From the layer whose channels are copied, Torch-Pruning ties each channel to its copy
    (both positions from one root); from a layer past the concatenation it maps the parts
    apart and removes a channel's copy unseen: the layer can be emptied."""
    concat = node.module
    if not isinstance(concat, tp.ops._ConcatOp) or concat.offsets is None:
        return False
    offsets = concat.offsets
    root_at = dict(zip(to_plain_idxs(item.idxs), item.root_idxs, strict=True))
    for a, b in _repeated_parts(node):
        width = offsets[a + 1] - offsets[a]
        if offsets[b + 1] - offsets[b] != width:
            return True
        if any(root_at.get(offsets[a] + j) != root_at.get(offsets[b] + j) for j in range(width)):
            return True
    return False


def _channel_sources(node: Node) -> set[int]:
    """The layers whose output channels reach ``node`` as they are: back through element-wise
    ops, norms, depthwise convs and concatenations to the layers mixing channels. A split or a
    slice ends the way: its parts are different channels of one layer."""
    sources: set[int] = set()
    seen: set[int] = set()
    queue = [node]
    while queue:
        current = queue.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if consumes_channels(current.module):
            sources.add(id(current.module))
        elif not isinstance(current.module, tp.ops._SplitOp | tp.ops._SliceOp):
            queue.extend(current.inputs)
    return sources


def consumes_channels(module: object) -> bool:
    """A layer mixing its input channels into new ones: coupled channels end at its input."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return not module.groups == module.in_channels == module.out_channels > 1
    return isinstance(module, nn.Linear)


def reaches_channel_move(root: Node) -> bool:
    """Whether a layer's output channels, or channels coupled to them (residual additions,
    concatenations), meet a channel-moving op, which Torch-Pruning takes for element-wise."""
    seen: set[tuple[int, bool]] = set()
    queue = [(n, True) for n in root.outputs]  # (node, reached going forward)
    while queue:
        node, forward = queue.pop()
        if (id(node), forward) in seen:
            continue
        seen.add((id(node), forward))
        if moves_channels(node):
            return True
        boundary = consumes_channels(node.module)
        if forward and boundary:
            continue  # a consumer: the channels end at its input
        queue.extend((n, True) for n in node.outputs)
        if not boundary:  # an element-wise op: its other inputs share the channels
            queue.extend((n, False) for n in node.inputs)
    return False


class _OpaqueAttention(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning's view of an attention layer while tracing: one layer reading and writing
    ``widths[layer]`` channels. Never asked to prune: every group reaching it stays whole."""

    def __init__(self, widths: dict[nn.Module, int]) -> None:
        super().__init__()
        self.widths = widths

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise RuntimeError(f"{type(layer).__name__} is attention: its channels stay whole")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return self.widths[layer]

    get_in_channels = get_out_channels


def _width(module: nn.Module, tensor: Tensor) -> int | None:
    """The channels ``module`` reads from ``tensor``: along dim 1 where its first projection
    is a convolution (``N x C x H x W``), else along the last (tokens, or Swin's ``N x H x W x
    C``); None without a projection."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return tensor.shape[1] if tensor.dim() > 2 else None
        if isinstance(m, nn.Linear):
            return tensor.shape[-1]
    return None


def _opaque_widths(model: nn.Module, example: Example) -> dict[nn.Module, int]:
    """The width of each attention layer that maps a tensor to one of its own shape on the
    example, in classes all of whose layers do (Torch-Pruning registers layers by class)."""
    attention = [
        m for m in model.modules() if is_attention(m) and not isinstance(m, TORCH_PRUNING_ATTENTION)
    ]
    widths: dict[nn.Module, int | None] = {}

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        x = inputs[0] if inputs else None
        output = output[0] if isinstance(output, tuple) and output else output
        same = isinstance(x, Tensor) and isinstance(output, Tensor) and output.shape == x.shape
        width = _width(module, x) if same else None
        widths[module] = width if widths.get(module, width) == width else None

    hooks = [m.register_forward_hook(record) for m in attention]
    try:
        with torch.no_grad():
            run_example(model, example)
    finally:
        for hook in hooks:
            hook.remove()
    refused = {type(m) for m in attention if widths.get(m) is None}
    return {m: w for m, w in widths.items() if w is not None and type(m) not in refused}


def _stand_in(_module: nn.Module, inputs: Any, output: Tensor | tuple) -> Tensor | tuple:
    # the same values, reached from the input through one element-wise op: the tracer sees
    # a layer on the input and nothing inside it. More outputs (EfficientViM's hidden state)
    # hold the layer's own channels, which stay whole: they are cut from the trace.
    if isinstance(output, tuple):
        rest = (o.detach() if isinstance(o, Tensor) else o for o in output[1:])
        return (_stand_in(_module, inputs, output[0]), *rest)
    return output.detach() + inputs[0] * 0


def dependency_graph(
    model: nn.Module, example: Example, ignored_layers: Sequence[nn.Module]
) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, each attention layer traced as one layer.

    Torch-Pruning maps channel indices through every reshape inside an attention layer one
    Python object at a time: from a layer writing torchvision Swin's residual stream one search
    ran over ten minutes and 12 GB. No group may cut attention (its heads are neurons of their
    own), so the graph needs only know that the layer reads and writes those channels: while
    tracing, the layer's output is its own values plus 0 x its input, and its class is a
    Torch-Pruning customized layer (whose insides it leaves alone). Layers of classes that
    change the shape of what they read (or that Torch-Pruning prunes itself) are traced whole.
    """
    widths = _opaque_widths(model, example)
    hooks = [m.register_forward_hook(_stand_in) for m in widths]
    opaque = _OpaqueAttention(widths)
    try:
        with warnings.catch_warnings():
            # parameters outside layers (a position embedding) are handled as Torch-Pruning's
            # "unwrapped" ones; the warning says so
            warnings.filterwarnings("ignore", "Unwrapped parameters", UserWarning)
            return mended_graph().build_dependency(
                model,
                example_inputs=example,
                forward_fn=tracing_forward(ignored_layers),
                customized_pruners={
                    **customized_pruners(model),
                    **dict.fromkeys({type(m) for m in widths}, opaque),
                },
            )
    finally:
        for hook in hooks:
            hook.remove()
