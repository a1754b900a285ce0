"""Torch-Pruning 1.6's pruning functions, mended where they break a layer they prune, and
pruners for layers they do not know.

Each mend is found by the coverage benchmark (docs/models.md) and tested in
tests/test_layer_pruners.py; the module is imported by :mod:`adasap.method.whole`, which
builds every dependency graph, so the mends are in place before any graph exists.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import Node, index_mapping
from torch_pruning.pruner import function

_map_concat = index_mapping.update_concat_index_mapping


def _map_concat_of_unknown_widths(graph: tp.DependencyGraph, cat_node: Node) -> None:
    # Torch-Pruning sums the concatenated parts' widths before it checks them for an
    # unknown one (None), where its answer is to leave the concat unmapped: a TypeError
    # instead (timm's CoaT, CSPDarknet). Unmapped, its groups stay whole
    # (whole.moves_channels).
    try:
        _map_concat(graph, cat_node)
    except TypeError:
        if None not in (cat_node.module.concat_sizes or ()):
            raise


index_mapping.update_concat_index_mapping = _map_concat_of_unknown_widths

_prune_parameter = function.BasePruningFunc._prune_parameter_and_grad


def _prune_present_parameter(
    self: function.BasePruningFunc, weight: nn.Parameter | None, keep: Sequence[int], dim: int
) -> nn.Parameter | None:
    # a norm without a bias (timm's GroupNorm1NoBias, PoolFormerV2) has bias None, which
    # Torch-Pruning's GroupNorm pruner slices all the same
    return None if weight is None else _prune_parameter(self, weight, keep, dim)


function.BasePruningFunc._prune_parameter_and_grad = _prune_present_parameter

ConvPruning = Callable[[function.BasePruningFunc, nn.Module, Sequence[int]], nn.Module]


def output_parameters(conv: nn.modules.conv._ConvNd) -> list[str]:
    """The names of ``conv``'s parameters besides its weight with one entry per output
    channel: its bias, and a gain (timm's ``ScaledStdConv2d``)."""
    return [
        name
        for name, parameter in conv.named_parameters(recurse=False)
        if name != "weight" and parameter.shape[:1] == (conv.out_channels,)
    ]


def _with_output_gains(prune_out_channels: ConvPruning) -> ConvPruning:
    """``prune_out_channels`` of a convolution that also cuts the convolution's own other
    per-output-channel parameters (the gain of timm's ``ScaledStdConv2d``, NF-Nets), which
    Torch-Pruning leaves at their old size."""

    def prune(self: function.BasePruningFunc, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        gains = [name for name in output_parameters(layer) if name != "bias"]
        keep = sorted(set(range(layer.out_channels)) - set(idxs))
        layer = prune_out_channels(self, layer, idxs)
        for name in gains:
            setattr(layer, name, _prune_parameter(self, getattr(layer, name), keep, 0))
        return layer

    return prune


function.ConvPruner.prune_out_channels = _with_output_gains(function.ConvPruner.prune_out_channels)
function.DepthwiseConvPruner.prune_out_channels = _with_output_gains(
    function.DepthwiseConvPruner.prune_out_channels
)
function.DepthwiseConvPruner.prune_in_channels = function.DepthwiseConvPruner.prune_out_channels


class BlurPoolPruner(function.BasePruningFunc):
    """timm's ``BlurPool2d`` (TResNet, anti-aliased ResNets): a depthwise blur whose filter is
    a buffer, one per channel, which Torch-Pruning would take for an element-wise op."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.channels)) - set(idxs))
        layer.filt = torch.index_select(layer.filt, 0, torch.tensor(keep, device=layer.filt.device))
        layer.channels = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.channels

    get_in_channels = get_out_channels


class ScalePruner(function.BasePruningFunc):
    """timm's MetaFormer ``Scale`` (PoolFormerV2, ConvFormer, CAFormer): a per-channel scale
    viewed to its ``shape``, which Torch-Pruning cuts but leaves at its old size."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.scale.numel())) - set(idxs))
        layer.scale = self._prune_parameter_and_grad(layer.scale, keep, 0)
        layer.shape = (len(keep), *layer.shape[1:])
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.scale.numel()

    get_in_channels = get_out_channels


def is_channel_scale(module: nn.Module) -> bool:
    """A layer scaling each channel it reads by a parameter of its own (:class:`ScalePruner`)."""
    return type(module) is getattr(sys.modules.get("timm.models.metaformer"), "Scale", None)


def customized_pruners(model: nn.Module) -> dict[type, function.BasePruningFunc]:
    """Pruners for the layers of ``model`` Torch-Pruning does not know (their libraries are
    looked up only if already imported: a model using them has imported them)."""
    pruners: dict[type, function.BasePruningFunc] = {}
    scales = [m for m in model.modules() if is_channel_scale(m)]
    if scales:
        pruners[type(scales[0])] = ScalePruner()
    blur = getattr(sys.modules.get("timm.layers"), "BlurPool2d", None)
    blurs = [m for m in model.modules() if blur is not None and isinstance(m, blur)]
    # one without channels blurs whatever it reads: element-wise, as Torch-Pruning takes it
    if blurs and all(m.channels is not None for m in blurs):
        pruners[blur] = BlurPoolPruner()
    return pruners
