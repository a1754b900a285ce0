"""Heads of window attention (Swin) as neurons, registered into :data:`heads.ADAPTERS`.

timm's ``WindowAttention`` is multi-head self-attention within windows plus a learned
relative position bias per head (``relative_position_bias_table``, ``[(2Wh-1)(2Ww-1),
num_heads]``) added to each head's attention logits before its softmax. A head's bias column
changes its own attention only, so the head stays one exact neuron: its q/k/v rows of
``qkv``, its columns of ``proj`` and its column of the bias table. The forward pass reads the
head count from ``num_heads`` and infers the head size from ``qkv``'s width, so a pruned
layer keeps its class: only ``num_heads`` changes.

torchvision's ``ShiftedWindowAttention`` is not adapted: its functional forward derives the
head size from the embedding width (``C // num_heads``), so with fewer heads it would need
an equivalent replacement module (as ``nn.MultiheadAttention`` has); it stays whole.
"""

from __future__ import annotations

from typing import Any

import torch_pruning as tp
from torch import nn

from adasap.method.heads import ADAPTERS, HeadSlot, HeadSpec, count_macs, qualified_name

TIMM_WINDOW_ATTENTION = "timm.models.swin_transformer.WindowAttention"


class TimmWindowAttentionHeads:
    """timm's ``WindowAttention`` (Swin): ``qkv`` (q, k, v rows, each head after head),
    ``proj`` (columns per head) and the bias table (a column per head). Exact only where the
    widths agree with ``num_heads`` (a subclass or an edited layer keeps the layer whole)."""

    def heads(self, module: nn.Module) -> HeadSpec:
        m: Any = module
        count = m.num_heads
        qkv, proj, table = m.qkv, m.proj, m.relative_position_bias_table
        linears = isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
        width = qkv.out_features // (3 * count) if linears else 0
        exact = (
            linears
            and width > 0
            and qkv.out_features == 3 * count * width
            and proj.in_features == count * width
            and table.dim() == 2
            and table.shape[1] == count
        )
        slots = [HeadSlot(proj, "weight", 1, width, False)]
        slots += [
            HeadSlot(qkv, attr, 0, width, True)
            for attr in ("weight", "bias")
            if getattr(qkv, attr, None) is not None
        ]
        # the head's bias column: its own logits only; added, not multiplied per token
        slots.append(HeadSlot(m, "relative_position_bias_table", 1, 1, True, macs=False))
        projections = tuple(p for layer in (qkv, proj) for p in layer.parameters())
        return HeadSpec(count, width, tuple(slots), projections, exact)

    def set_heads(self, module: nn.Module, count: int) -> nn.Module:
        module.num_heads = count  # the head size follows from qkv's width
        return module

    def shape(self, module: nn.Module, output: Any) -> tuple[int, int]:
        return output.shape[0], output.shape[1]  # (windows x batch, tokens per window)


ADAPTERS.add(TIMM_WINDOW_ATTENTION, TimmWindowAttentionHeads())

# Torch-Pruning counts timm's WindowAttention (where it imported timm) with an output
# projection it takes for square: wrong once heads are gone. count_macs counts the same for
# an unpruned layer (the bias table's additions neither) and the remaining heads after.
_COUNTERS = tp.utils.op_counter.MODULES_MAPPING
for _cls in list(_COUNTERS):
    if qualified_name(_cls) == TIMM_WINDOW_ATTENTION:
        _COUNTERS[_cls] = count_macs
