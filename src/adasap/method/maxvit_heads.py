"""Heads of MaxViT's attention as neurons, registered into :data:`heads.ADAPTERS`.

torchvision's ``RelativePositionalMultiHeadAttention`` (MaxViT's block and grid attention) is
multi-head self-attention over the tokens of each partition, ``[B, G, P, D]``: ``to_qkv``
holds the q, k and v rows (three runs of ``n_heads * head_dim``, head after head), ``merge``
takes ``n_heads * head_dim`` columns (a run of ``head_dim`` per head), and the learned
relative position bias (``relative_position_bias_table``, ``[(2s-1)^2, n_heads]``) adds a
column per head to that head's logits before its softmax. A head is one exact neuron: its
q/k/v rows, its ``merge`` columns and its bias column. The logits scale, ``scale_factor =
feat_dim ** -0.5``, comes from the input width, not the head count, so it stays as it is.

The torchvision forward reshapes the heads' outputs to the input width ``D`` before
``merge``, which fails once a head is gone; the first removal therefore replaces the layer
with :class:`HeadPrunedRelativePositionalMultiHeadAttention`, a subclass holding the same
parameters and buffer under the same names (the weights files and the optimizer know them by
name) whose forward reshapes to the remaining heads' width. This adapter serves both classes,
so a pruned layer loses more heads and a saved model's head entries replay on reload.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

from adasap.method.heads import ADAPTERS, HeadSlot, HeadSpec, count_macs, qualified_name


class HeadPrunedRelativePositionalMultiHeadAttention(RelativePositionalMultiHeadAttention):
    """MaxViT's attention with heads removed: what the torchvision module computes with the
    remaining heads. Shares ``source``'s parameters and buffer rather than copying them."""

    def __init__(self, source: RelativePositionalMultiHeadAttention, n_heads: int) -> None:
        nn.Module.__init__(self)  # the parent's __init__ would create fresh parameters
        self.n_heads, self.head_dim = n_heads, source.head_dim
        self.size, self.max_seq_len = source.size, source.max_seq_len
        self.to_qkv = source.to_qkv
        self.scale_factor = source.scale_factor
        self.merge = source.merge
        self.relative_position_bias_table = source.relative_position_bias_table
        self.register_buffer("relative_position_index", source.relative_position_index)
        self.train(source.training)

    def forward(self, x: Tensor) -> Tensor:
        batch, groups, tokens, _ = x.shape
        heads, width = self.n_heads, self.head_dim
        q, k, v = (
            t.reshape(batch, groups, tokens, heads, width).permute(0, 1, 3, 2, 4)
            for t in torch.chunk(self.to_qkv(x), 3, dim=-1)
        )
        k = k * self.scale_factor
        logits = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
        weights = F.softmax(logits + self.get_relative_positional_bias(), dim=-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", weights, v)
        out = out.permute(0, 1, 3, 2, 4).reshape(batch, groups, tokens, heads * width)
        return self.merge(out)


class MaxVitAttentionHeads:
    """torchvision's ``RelativePositionalMultiHeadAttention`` and its pruned replacement:
    ``to_qkv`` (rows per head), ``merge`` (columns per head), the bias table (a column per
    head). Exact only where the widths agree with ``n_heads`` and ``head_dim``."""

    def heads(self, module: nn.Module) -> HeadSpec:
        m: Any = module
        count, width = m.n_heads, m.head_dim
        qkv, merge, table = m.to_qkv, m.merge, m.relative_position_bias_table
        exact = (
            isinstance(qkv, nn.Linear)
            and isinstance(merge, nn.Linear)
            and qkv.out_features == 3 * count * width
            and merge.in_features == count * width
            and table.dim() == 2
            and table.shape[1] == count
        )
        slots = [HeadSlot(merge, "weight", 1, width, False)]
        slots += [
            HeadSlot(qkv, attr, 0, width, True)
            for attr in ("weight", "bias")
            if getattr(qkv, attr, None) is not None
        ]
        # the head's bias column: its own logits only; added, not multiplied per token
        slots.append(HeadSlot(m, "relative_position_bias_table", 1, 1, True, macs=False))
        projections = tuple(p for layer in (qkv, merge) for p in layer.parameters())
        return HeadSpec(count, width, tuple(slots), projections, exact)

    def set_heads(self, module: nn.Module, count: int) -> nn.Module:
        if isinstance(module, HeadPrunedRelativePositionalMultiHeadAttention):
            module.n_heads = count
            return module
        return HeadPrunedRelativePositionalMultiHeadAttention(module, count)

    def shape(self, module: nn.Module, output: Any) -> tuple[int, int]:
        batch, groups, tokens, _ = output.shape
        return batch * groups, tokens  # a sequence per partition (window or grid cell)


ADAPTERS.add(qualified_name(RelativePositionalMultiHeadAttention), MaxVitAttentionHeads())
ADAPTERS.add(qualified_name(HeadPrunedRelativePositionalMultiHeadAttention), MaxVitAttentionHeads())

# Torch-Pruning has no counter for this layer: it counts its two Linear layers alone (each
# bias once, not per token) and neither the attention matrices nor the scaling, which a head
# takes with it. count_macs counts all of those, so removing a head takes from the measured
# MACs exactly what the layout predicted it saves.
_COUNTERS = tp.utils.op_counter.MODULES_MAPPING
_COUNTERS[RelativePositionalMultiHeadAttention] = count_macs
_COUNTERS[HeadPrunedRelativePositionalMultiHeadAttention] = count_macs
