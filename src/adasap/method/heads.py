"""Attention heads as neurons.

A head of a multi-head attention layer is one neuron: its query, key and value rows of the
input projection, its columns of the output projection (and its rows of an output gate, where
the layer has one). Softmax runs per head and the output projection sums the heads'
contributions, so removing a head takes exactly its term out of the layer's output and
changes nothing else; the embedding width (the residual stream) stays whole.

Torch-Pruning has no notion of heads (it would cut channels inside a head), so heads are
removed here, outside it, and recorded in the pruning history as ``[<layer>:heads, True,
[head indices]]`` entries, which :func:`replay_heads` replays. An attention class is supported
by one adapter registered under the class's qualified name (:data:`ADAPTERS`): where its
projections are, how many heads it has, how to set a new count, and the shape of its output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from adasap.errors import UserError
from adasap.registry import Registry

HEADS_SUFFIX = ":heads"  # a history entry's layer name ends with it: a head removal


@dataclass(frozen=True)
class HeadSlot:
    """``owner.<attr>`` holds, along ``dim``, one or more runs of the heads' channels, head
    after head, ``width`` each (qkv: three runs of ``head_dim``). ``is_output``: rows the head
    produces (AdaSAP's radius scales them); ``macs``: weights each token multiplies."""

    owner: nn.Module
    attr: str
    dim: int
    width: int
    is_output: bool
    macs: bool = True

    @property
    def param(self) -> Tensor:
        return getattr(self.owner, self.attr)

    def head_of_channel(self, count: int) -> Tensor:
        channels = torch.arange(self.param.shape[self.dim])
        return channels % (count * self.width) // self.width


@dataclass
class HeadSpec:
    """The heads of one attention layer. ``exact`` is false where removing a head would change
    the others (a norm over all heads): the layer then stays whole."""

    count: int
    head_dim: int
    slots: tuple[HeadSlot, ...]
    projections: tuple[Tensor, ...]  # the parameters each token multiplies (MACs)
    exact: bool = True
    macs: float = 0.0  # per sample, of one head (set by the layout)

    def slices(self) -> list[tuple[nn.Module, str, int, Tensor, Tensor, bool]]:
        """``(module, attr, dim, channels, head of each channel, is_output)`` per slot."""
        channels = [s.head_of_channel(self.count) for s in self.slots]
        return [
            (s.owner, s.attr, s.dim, torch.arange(len(h)), h, s.is_output)
            for s, h in zip(self.slots, channels, strict=True)
        ]

    def min_heads(self, min_channels: int) -> int:
        """``min_channels`` counts channels: a head holds ``head_dim`` of them; at least 1."""
        return max(1, math.ceil(min_channels / self.head_dim))


class HeadAdapter(Protocol):
    def heads(self, module: nn.Module) -> HeadSpec:
        """Where ``module`` keeps its heads."""

    def set_heads(self, module: nn.Module, count: int) -> nn.Module:
        """Record ``count`` heads, its slots already sliced; return the module in its place."""

    def shape(self, module: nn.Module, output: Any) -> tuple[int, int]:
        """(sequences in the batch, tokens per sequence) of one call's output."""


ADAPTERS: Registry[HeadAdapter] = Registry("attention class")


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def adapter_of(module: nn.Module) -> HeadAdapter | None:
    """The adapter of ``module``'s exact class (a subclass may compute otherwise), or None."""
    name = qualified_name(type(module))
    return ADAPTERS.get(name) if name in ADAPTERS else None


class HeadPrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with heads removed: the stock module derives its head size
    from ``embed_dim / num_heads`` and its q/k/v widths from ``embed_dim``, so it cannot hold
    fewer heads than its embedding width. This one keeps the width (the residual stream), the
    head size and the parameters' names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``: the
    optimizer and the weights files know parameters by name) and computes what the stock
    module computes with the remaining heads. Masks: 2-D ``attn_mask`` and ``key_padding_mask``
    (a 3-D mask names the original heads); returned weights average the remaining heads.
    """

    def __init__(self, source: nn.MultiheadAttention, num_heads: int) -> None:
        super().__init__()
        self.embed_dim, self.kdim, self.vdim = source.embed_dim, source.kdim, source.vdim
        self.num_heads, self.head_dim = num_heads, source.head_dim
        self.dropout, self.batch_first = source.dropout, source.batch_first
        self.bias_k, self.bias_v, self.add_zero_attn = None, None, False
        # False keeps nn.TransformerEncoderLayer off its fused path, which derives the head
        # size from embed_dim / num_heads
        self._qkv_same_embed_dim = False
        self.in_proj_weight = source.in_proj_weight
        self.register_parameter("in_proj_bias", source.in_proj_bias)
        self.out_proj = source.out_proj
        self.train(source.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,  # a hint about attn_mask, which holds the mask itself
    ) -> tuple[Tensor, Tensor | None]:
        self_attention = query is key and key is value
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, length, _ = query.shape
        heads, width = self.num_heads, self.head_dim
        if self_attention:  # as timm's Attention, which Torch-Pruning traces
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
            q, k, v = qkv.reshape(batch, length, 3, heads, width).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            biases = [None] * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            inputs = zip((query, key, value), self.in_proj_weight.chunk(3), biases, strict=True)
            q, k, v = (
                F.linear(t, w, b).reshape(batch, t.shape[1], heads, width).transpose(1, 2)
                for t, w, b in inputs
            )
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * width**-0.5) @ k.transpose(-2, -1)
            weights = (scores if mask is None else scores + mask).softmax(-1)
            weights = F.dropout(weights, dropout) if dropout > 0 else weights
            x = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        x = self.out_proj(x.transpose(1, 2).reshape(batch, length, heads * width))
        if not batched:
            x = x.squeeze(0)
        elif not self.batch_first:
            x = x.transpose(0, 1)
        return x, weights


def _additive_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, dtype: torch.dtype
) -> Tensor | None:
    """``nn.MultiheadAttention``'s masks (True or -inf: not attended) as one additive mask
    broadcasting over (batch, heads, queries, keys)."""
    total = None
    for mask, shape in ((attn_mask, (1, 1)), (key_padding_mask, None)):
        if mask is None:
            continue
        if mask is attn_mask and mask.dim() != 2:
            raise ValueError(
                "a 3-D attn_mask holds one mask per original head: this layer's heads were "
                "pruned, pass one (queries, keys) mask for all heads"
            )
        zero = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        mask = zero.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else mask.to(dtype)
        mask = mask.view(*shape, *mask.shape) if shape else mask[:, None, None, :]
        total = mask if total is None else total + mask
    return total


class TimmAttentionHeads:
    """timm's ``Attention`` (ViT, DeiT, MobileViT ...): ``qkv`` (q, k, v rows, each head after
    head), ``proj`` (columns per head), an optional ``gate`` (rows per head); ``q_norm`` and
    ``k_norm`` act within a head. A ``norm`` over all heads (``scale_norm``), or a timm without
    ``attn_dim`` (its forward reshaped to the input width), keeps the layer whole."""

    def heads(self, module: nn.Module) -> HeadSpec:
        m: Any = module
        count, width = m.num_heads, m.head_dim
        gate = getattr(m, "gate", None)
        linears = [m.qkv, m.proj] + ([gate] if gate is not None else [])
        exact = (
            all(isinstance(layer, nn.Linear) for layer in linears)
            and isinstance(getattr(m, "norm", nn.Identity()), nn.Identity)
            and getattr(m, "attn_dim", None) == count * width
            and m.qkv.out_features == 3 * count * width
            and m.proj.in_features == count * width
        )
        slots = [HeadSlot(m.proj, "weight", 1, width, False)]
        for layer in linears[:1] + linears[2:]:  # qkv and the gate: rows per head
            slots += [
                HeadSlot(layer, attr, 0, width, True)
                for attr in ("weight", "bias")
                if getattr(layer, attr, None) is not None
            ]
        projections = tuple(p for layer in linears for p in layer.parameters())
        return HeadSpec(count, width, tuple(slots), projections, exact)

    def set_heads(self, module: nn.Module, count: int) -> nn.Module:
        m: Any = module
        m.num_heads, m.attn_dim = count, count * m.head_dim
        return module

    def shape(self, module: nn.Module, output: Any) -> tuple[int, int]:
        return output.shape[0], output.shape[1]


class MultiheadAttentionHeads:
    """``nn.MultiheadAttention`` with one packed ``in_proj_weight`` (q, k, v rows, each head
    after head) and ``out_proj`` (columns per head); ``bias_k``/``bias_v`` or
    ``add_zero_attn`` keep it whole. Its first removal replaces it with a
    :class:`HeadPrunedMultiheadAttention`, which this adapter serves from then on."""

    def heads(self, module: nn.Module) -> HeadSpec:
        m: Any = module
        count, width = m.num_heads, m.head_dim
        packed = isinstance(m, HeadPrunedMultiheadAttention) or m._qkv_same_embed_dim
        plain = m.bias_k is None and m.bias_v is None and not m.add_zero_attn
        if not (packed and plain and m.in_proj_weight is not None):
            return HeadSpec(count, width, (), (), exact=False)
        slots = [HeadSlot(m, "in_proj_weight", 0, width, True)]
        if m.in_proj_bias is not None:
            slots.append(HeadSlot(m, "in_proj_bias", 0, width, True))
        slots.append(HeadSlot(m.out_proj, "weight", 1, width, False))
        projections = (m.in_proj_weight, m.in_proj_bias, *m.out_proj.parameters())
        return HeadSpec(count, width, tuple(slots), tuple(p for p in projections if p is not None))

    def set_heads(self, module: nn.Module, count: int) -> nn.Module:
        if isinstance(module, nn.MultiheadAttention):
            return HeadPrunedMultiheadAttention(module, count)
        module.num_heads = count
        return module

    def shape(self, module: nn.Module, output: Any) -> tuple[int, int]:
        out = output[0]
        if out.dim() == 2:  # unbatched
            return 1, out.shape[0]
        first = getattr(module, "batch_first", False)
        return (out.shape[0], out.shape[1]) if first else (out.shape[1], out.shape[0])


ADAPTERS.add("timm.layers.attention.Attention", TimmAttentionHeads())
ADAPTERS.add(qualified_name(nn.MultiheadAttention), MultiheadAttentionHeads())
ADAPTERS.add(qualified_name(HeadPrunedMultiheadAttention), MultiheadAttentionHeads())


def attention_heads(
    model: nn.Module, ignored: Sequence[nn.Module], called: dict[nn.Module, float]
) -> list[tuple[nn.Module, HeadSpec]]:
    """The attention layers whose heads can be pruned, with their heads: an adapter's, exact,
    more than one head, run by the example (``called``: per-head MACs per sample), and none
    of their projections among the ``ignored`` layers."""
    ignored_ids = set(map(id, ignored))
    found = []
    for module in model.modules():
        adapter = adapter_of(module)
        if adapter is None or module not in called or id(module) in ignored_ids:
            continue
        spec = adapter.heads(module)
        whole = any(id(s.owner) in ignored_ids for s in spec.slots)
        if spec.exact and spec.count > 1 and not whole:
            spec.macs = called[module]
            found.append((module, spec))
    return found


def removed_head_macs(groups: Sequence[Any], removed: Tensor) -> tuple[float, set[int]]:
    """The MACs per sample that removing the ``removed`` neurons' heads saves, and the ids of
    every parameter the layout's head groups slice (whose MACs this is, not their weights')."""
    macs, params = 0.0, set()
    for g in groups:
        if g.heads is not None:
            macs += float(removed[g.offset : g.offset + g.size].sum()) * g.heads.macs
            params.update(id(s.param) for s in g.slices)
    return macs, params


def _sequence_macs(spec: HeadSpec, sequences: int, tokens: int) -> float:
    """One head's attention-matrix MACs: q scaling, q k^T, softmax, attention @ v."""
    return sequences * tokens * (tokens * (2 * spec.head_dim + 1) + spec.head_dim)


def head_macs_hooks(model: nn.Module, samples: int, store: dict[nn.Module, float]) -> list[Any]:
    """Forward hooks adding each adapted layer's MACs per head, per sample, into ``store``:
    what its projections' head slices and attention matrices cost (:func:`count_macs`)."""

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        adapter = adapter_of(module)
        spec = adapter.heads(module)
        sequences, tokens = adapter.shape(module, output)
        weights = sum(s.param.numel() for s in spec.slots if s.macs) / spec.count
        macs = sequences * tokens * weights + _sequence_macs(spec, sequences, tokens)
        store[module] = store.get(module, 0.0) + macs / samples

    return [m.register_forward_hook(record) for m in model.modules() if adapter_of(m) is not None]


def count_macs(module: nn.Module, _inputs: Any, output: Any) -> None:
    """Torch-Pruning's MACs counter for an adapted attention layer (self-attention): every
    token through its projections, plus each head's attention matrices. It counts what
    Torch-Pruning's own counters count for an unpruned layer, whose output projection they
    take for square (``vdim x vdim``): wrong once heads are gone."""
    adapter = adapter_of(module)
    spec = adapter.heads(module)
    sequences, tokens = adapter.shape(module, output)
    weights = sum(p.numel() for p in spec.projections)
    total = sequences * tokens * weights + spec.count * _sequence_macs(spec, sequences, tokens)
    module.__flops__ += int(total)


_COUNTERS = tp.utils.op_counter.MODULES_MAPPING
for _cls in list(_COUNTERS):  # timm's class, where Torch-Pruning imported timm
    if qualified_name(_cls) == "timm.layers.attention.Attention":
        _COUNTERS[_cls] = count_macs
_COUNTERS[HeadPrunedMultiheadAttention] = count_macs


def _module(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name) if name else model
    if adapter_of(module) is None:
        raise ValueError(f"{name[:80]!r} is no attention layer whose heads adasap prunes")
    return module


def head_count(model: nn.Module, entry_name: str) -> int | None:
    """The heads left in the layer a history entry names; None if it names no such layer."""
    try:
        module = _module(model, entry_name.removesuffix(HEADS_SUFFIX))
    except (AttributeError, ValueError):
        return None
    spec = adapter_of(module).heads(module)
    return spec.count if spec.exact else None


def is_head_entry(entry: Sequence[Any]) -> bool:
    """Whether a pruning-history entry removes heads (:func:`remove_heads`)."""
    return str(entry[0]).endswith(HEADS_SUFFIX)


@torch.no_grad()
def remove_heads(model: nn.Module, name: str, heads: Sequence[int]) -> list[Any]:
    """Remove ``heads`` (indices) of the attention layer ``name``: slice every slot, set the
    new count (replacing the layer where its class cannot hold it). Returns the history entry.
    """
    module = _module(model, name)
    adapter = adapter_of(module)
    spec, heads = adapter.heads(module), sorted(set(int(h) for h in heads))
    if not (spec.exact and heads and 0 <= heads[0] and heads[-1] < spec.count > len(heads)):
        raise ValueError(f"cannot remove heads {heads[:8]} of {name!r}: it has {spec.count}")
    gone = torch.isin(torch.arange(spec.count), torch.tensor(heads))
    for slot in spec.slots:
        p = slot.param
        keep = torch.nonzero(~gone[slot.head_of_channel(spec.count)]).flatten().to(p.device)
        kept = nn.Parameter(p.index_select(slot.dim, keep), p.requires_grad)
        setattr(slot.owner, slot.attr, kept)
        if isinstance(slot.owner, nn.Linear):
            slot.owner.out_features, slot.owner.in_features = slot.owner.weight.shape
    replacement = adapter.set_heads(module, spec.count - len(heads))
    if replacement is not module:
        if not name:
            raise UserError("the model itself is an attention layer: wrap it in a module")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, replacement)
    return [name + HEADS_SUFFIX, True, heads]


def replay_heads(model: nn.Module, entry: Sequence[Any]) -> None:
    """Apply one recorded head removal (:func:`remove_heads`' entry) to ``model``."""
    remove_heads(model, str(entry[0]).removesuffix(HEADS_SUFFIX), entry[2])
