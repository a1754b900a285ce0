"""Heads of window attention (Swin) as neurons, registered into :data:`heads.ADAPTERS`.

Window attention is multi-head self-attention within windows plus a relative position bias
per head added to that head's attention logits before its softmax, so a head stays one exact
neuron: its q/k/v rows of ``qkv``, its columns of ``proj`` and its own bias parameters.

- timm's ``WindowAttention`` and torchvision's ``ShiftedWindowAttention`` (``swin_t``,
  ``swin_s``) learn the bias as a table, ``relative_position_bias_table`` ``[(2Wh-1)(2Ww-1),
  num_heads]``: a head's is its column.
- torchvision's ``ShiftedWindowAttentionV2`` (``swin_v2_t``, ``swin_v2_s``) computes the bias
  with a small MLP (``cpb_mlp``, whose last layer outputs one row per head) and scales each
  head's cosine similarities by its own ``logit_scale`` (``[num_heads, 1, 1]``): a head's are
  its row of each. Its forward zeroes the k part of the ``qkv`` bias, which stays so.

timm's forward infers the head size from ``qkv``'s width, so a pruned timm layer keeps its
class: only ``num_heads`` changes. torchvision's functional ``shifted_window_attention`` takes
the head size to be ``C // num_heads`` (C: the embedding width) and reshapes the heads' output
back to C, so the first removal replaces a torchvision layer with a subclass keeping its
parameters, buffers and their names (:class:`HeadPrunedShiftedWindowAttention`, ``...V2``)
whose forward is torchvision's with the heads' width, ``qkv.out_features // 3``, inside.

MACs: Torch-Pruning counts adapted layers with :func:`heads.count_macs` (every token through
``qkv`` and ``proj``, and each window's attention matrices), which stays right as heads go.
The bias parameters multiply no token; V2's ``cpb_mlp`` runs once per call on the relative
positions, whatever the batch, so it is no per-sample cost: it is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from adasap.method.heads import ADAPTERS, HeadSlot, HeadSpec, count_macs, qualified_name

TIMM_WINDOW_ATTENTION = "timm.models.swin_transformer.WindowAttention"


def _window_heads(m: Any, own: Sequence[tuple[nn.Module, str, int]]) -> HeadSpec:
    """The heads of a window attention layer ``m``: ``qkv`` (q, k, v rows, each head after
    head), ``proj`` (columns per head) and ``own``: ``(owner, attr, dim)`` holding one channel
    per head along ``dim``. Exact only where every width agrees with ``num_heads`` (a subclass
    or an edited layer keeps the layer whole)."""
    count, qkv, proj = m.num_heads, m.qkv, m.proj
    linears = isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
    width = qkv.out_features // (3 * count) if linears else 0
    exact = (
        linears
        and width > 0
        and qkv.out_features == 3 * count * width
        and proj.in_features == count * width
    )
    slots = [HeadSlot(proj, "weight", 1, width, False)]
    slots += [
        HeadSlot(qkv, attr, 0, width, True)
        for attr in ("weight", "bias")
        if getattr(qkv, attr, None) is not None
    ]
    for owner, attr, dim in own:
        p = getattr(owner, attr, None)
        exact = exact and p is not None and p.dim() > dim and p.shape[dim] == count
        if p is not None:  # the head's own bias: its logits only, multiplying no token
            slots.append(HeadSlot(owner, attr, dim, 1, True, macs=False))
    projections = tuple(p for layer in (qkv, proj) for p in layer.parameters())
    return HeadSpec(count, width, tuple(slots), projections, exact)


class TimmWindowAttentionHeads:
    """timm's ``WindowAttention`` (Swin): a column of the bias table per head."""

    def heads(self, module: nn.Module) -> HeadSpec:
        return _window_heads(module, [(module, "relative_position_bias_table", 1)])

    def set_heads(self, module: nn.Module, count: int) -> nn.Module:
        module.num_heads = count  # the head size follows from qkv's width
        return module

    def shape(self, module: nn.Module, output: Any) -> tuple[int, int]:
        return output.shape[0], output.shape[1]  # (windows x batch, tokens per window)


ADAPTERS.add(TIMM_WINDOW_ATTENTION, TimmWindowAttentionHeads())


def window_attention(
    input: Tensor,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Tensor | None = None,
    proj_bias: Tensor | None = None,
    logit_scale: Tensor | None = None,
    training: bool = True,
) -> Tensor:
    """torchvision's ``shifted_window_attention`` (same arguments, same math) whose heads are
    ``qkv_weight.shape[0] // 3`` wide in all (not the input's width C): its head size, query
    scale and the reshape before ``proj`` follow from the heads left."""
    B, H, W, C = input.shape
    inner = qkv_weight.shape[0] // 3
    head_dim = inner // num_heads
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = shift_size.copy()
    # a window as large as the feature map needs no shift
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(
        B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C
    )
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    if logit_scale is not None and qkv_bias is not None:  # V2: keys take no bias
        qkv_bias = qkv_bias.clone()
        qkv_bias[inner : 2 * inner].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # V2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim**-0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:  # tokens that the shift brought together do not attend each other
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(
            pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1]
        )
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, -1)
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), inner)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    x = x.view(
        B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C
    )
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


# as torchvision's: torch.fx (its feature extraction) calls it whole, shape checks and all
torch.fx.wrap("window_attention")


def _attend(m: Any, x: Tensor, logit_scale: Tensor | None) -> Tensor:
    return window_attention(
        x, m.qkv.weight, m.proj.weight, m.get_relative_position_bias(), m.window_size,
        m.num_heads, m.shift_size, m.attention_dropout, m.dropout, m.qkv.bias, m.proj.bias,
        logit_scale, m.training,
    )  # fmt: skip


class HeadPrunedShiftedWindowAttention(ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` with heads removed (made by
    :class:`TorchvisionWindowAttentionHeads`, not constructed)."""

    def forward(self, x: Tensor) -> Tensor:
        return _attend(self, x, None)


class HeadPrunedShiftedWindowAttentionV2(ShiftedWindowAttentionV2):
    """torchvision's ``ShiftedWindowAttentionV2`` with heads removed (made by
    :class:`TorchvisionWindowAttentionHeads`, not constructed)."""

    def forward(self, x: Tensor) -> Tensor:
        return _attend(self, x, self.logit_scale)


_PRUNED: dict[type, type[nn.Module]] = {
    ShiftedWindowAttention: HeadPrunedShiftedWindowAttention,
    ShiftedWindowAttentionV2: HeadPrunedShiftedWindowAttentionV2,
}


def _replacement(source: nn.Module, count: int) -> nn.Module:
    """``source``'s settings, parameters, buffers and submodules, under the same names (the
    optimizer and the weights files know parameters by name), in its head-pruned class, with
    ``count`` heads. Its ``__init__`` is not run: it would draw new parameters."""
    cls = _PRUNED[type(source)]
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name, value in vars(source).items():
        if not name.startswith("_"):
            setattr(module, name, value)
    for name, p in source._parameters.items():
        module.register_parameter(name, p)
    for name, b in source._buffers.items():
        persistent = name not in source._non_persistent_buffers_set
        module.register_buffer(name, b, persistent=persistent)
    for name, child in source._modules.items():
        module.add_module(name, child)
    module.num_heads = count
    return module


class TorchvisionWindowAttentionHeads:
    """torchvision's ``ShiftedWindowAttention`` (a column of the bias table per head) and
    ``ShiftedWindowAttentionV2`` (a row of ``logit_scale`` and of ``cpb_mlp``'s last layer per
    head). The first removal replaces the layer with its head-pruned class, which this adapter
    serves from then on."""

    def heads(self, module: nn.Module) -> HeadSpec:
        m: Any = module
        if not isinstance(m, ShiftedWindowAttentionV2):
            return _window_heads(m, [(m, "relative_position_bias_table", 1)])
        last = m.cpb_mlp[-1] if isinstance(m.cpb_mlp, nn.Sequential) else None
        if not isinstance(last, nn.Linear):  # remove_heads keeps a Linear's out_features in step
            spec = _window_heads(m, [])
            spec.exact = False
            return spec
        own = [(m, "logit_scale", 0), (last, "weight", 0)]
        return _window_heads(m, own + ([(last, "bias", 0)] if last.bias is not None else []))

    def set_heads(self, module: nn.Module, count: int) -> nn.Module:
        if type(module) in _PRUNED:
            return _replacement(module, count)
        module.num_heads = count
        return module

    def shape(self, module: nn.Module, output: Any) -> tuple[int, int]:
        # (batch x windows, tokens per window): the feature map padded to whole windows
        batch, height, width, _ = output.shape
        rows, columns = module.window_size
        return batch * math.ceil(height / rows) * math.ceil(width / columns), rows * columns


TORCHVISION_WINDOW_ATTENTION = (
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    HeadPrunedShiftedWindowAttention,
    HeadPrunedShiftedWindowAttentionV2,
)
for _cls in TORCHVISION_WINDOW_ATTENTION:
    ADAPTERS.add(qualified_name(_cls), TorchvisionWindowAttentionHeads())

# Torch-Pruning counts timm's WindowAttention (where it imported timm) with an output
# projection it takes for square, and nothing of torchvision's, whose projections run as
# F.linear: count_macs counts both as it counts the remaining heads after a removal.
_COUNTERS = tp.utils.op_counter.MODULES_MAPPING
for _cls in list(_COUNTERS):
    if qualified_name(_cls) == TIMM_WINDOW_ATTENTION:
        _COUNTERS[_cls] = count_macs
for _cls in TORCHVISION_WINDOW_ATTENTION:
    _COUNTERS[_cls] = count_macs
