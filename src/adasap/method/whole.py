"""What Torch-Pruning's dependency groups must not cut: attention layers and channel moves.

A group reaching either is left whole by :class:`~adasap.method.neurons.NeuronLayout` (heads
are neurons of their own: :mod:`adasap.method.heads`; docs/models.md says why shuffled
channels stay).
"""

from __future__ import annotations

from torch import nn
from torch_pruning.dependency import Node

CHANNEL_MOVING_OPS = ("ChannelShuffle", "IndexSelect", "Gather", "PixelShuffle", "PixelUnshuffle")


def _named_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__


def is_attention(module: nn.Module) -> bool:
    """Attention layers split channels into heads: Torch-Pruning's groups never cut them (the
    heads of those with an adapter are neurons of their own: :mod:`adasap.method.heads`).

    A layer counts by its class name, the innermost one: a block named after the attention it
    holds (torchvision's ``PartitionAttentionLayer`` in MaxViT) holds its MLP too, which stays
    prunable."""
    if not _named_attention(module):
        return False
    return not any(_named_attention(m) for m in module.modules() if m is not module)


def moves_channels(node: object) -> bool:
    grad_fn = getattr(node, "grad_fn", None)
    return grad_fn is not None and grad_fn.name().startswith(CHANNEL_MOVING_OPS)


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
