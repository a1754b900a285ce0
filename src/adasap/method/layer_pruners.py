"""Torch-Pruning 1.6's pruners, mended where they break a layer they prune, and pruners for
layers it does not know: used by adasap's dependency graphs only (:func:`mended_graph`,
:func:`customized_pruners`; :mod:`adasap.method.whole` builds every graph).

Each mend was found by the coverage benchmark (docs/models.md) and is tested in
tests/test_layer_pruners.py. One replaces a function of Torch-Pruning's in every graph, so
for anyone using it in the process: its concatenation mapping (:func:`map_concat`), which
maps as Torch-Pruning's does, in linear time and without its TypeError.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from torch_pruning.dependency import Node, constants, index_mapping, shape_infer
from torch_pruning.pruner import function


def map_concat(graph: tp.DependencyGraph, cat_node: Node) -> None:
    """Torch-Pruning 1.6's ``update_concat_index_mapping``, done again only where a part's
    width changed, and without its TypeError.

    It runs for every concatenation before each group search, and matched each input to its
    dependency by scanning the dependencies already matched: on DenseNet-201 (200 groups, 100
    concatenations of up to 48 parts) most of the layout's time, twice that with the removal
    check on a copy (:mod:`adasap.method.probe`). It also summed the parts' widths before
    checking them for an unknown one (None), where its answer is to leave the concat
    unmapped: a TypeError instead (timm's CoaT, CSPDarknet). Unmapped, the groups reaching the
    concat stay whole (``whole.moves_channels``)."""
    dim = getattr(cat_node.grad_fn, "_saved_dim", 1)
    if cat_node.type != ops.OPTYPE.CONCAT or dim != 1 and dim < constants.MAX_VALID_DIM:
        return
    concat = cat_node.module
    if concat.concat_sizes is None:
        concat.concat_sizes = [
            shape_infer.infer_channels_between(graph, n, cat_node) for n in cat_node.inputs
        ]
    widths = concat.concat_sizes
    if None in widths:
        return
    offsets = [0, *itertools.accumulate(widths)]
    if concat.offsets == offsets:
        return  # mapped for these widths already
    out = shape_infer.infer_in_channels_recursively(graph, cat_node, recursive_depth=[0])
    if out is not None and out != sum(widths):
        return  # concatenated along another dimension than the channels
    concat.offsets = offsets
    if not cat_node.enable_index_mapping:
        return
    pairs = [(cat_node, part, True) for part in cat_node.inputs]
    pairs += [(part, cat_node, False) for part in cat_node.inputs]
    matched: set[int] = set()
    for i, (source, target, reverse) in enumerate(pairs):
        part = i % len(cat_node.inputs)
        for dep in source.dependencies:  # the first one not matched yet
            if dep.target is target and id(dep) not in matched:
                matched.add(id(dep))
                dep.index_mapping[1] = index_mapping._ConcatIndexMapping(
                    offsets[part : part + 2], reverse
                )
                break


index_mapping.update_concat_index_mapping = map_concat


def output_parameters(conv: nn.modules.conv._ConvNd) -> list[str]:
    """The names of ``conv``'s parameters besides its weight with one entry per output
    channel: its bias, and a gain (timm's ``ScaledStdConv2d``)."""
    return [
        name
        for name, parameter in conv.named_parameters(recurse=False)
        if name != "weight" and parameter.shape[:1] == (conv.out_channels,)
    ]


class _AbsentStaysAbsent:
    """A pruner whose layer may lack a parameter: a norm without a bias (timm's
    ``GroupNorm1NoBias``, PoolFormerV2) has bias None, which Torch-Pruning slices all the
    same."""

    def _prune_parameter_and_grad(
        self, weight: nn.Parameter | None, keep_idxs: Sequence[int], pruning_dim: int
    ) -> nn.Parameter | None:
        if weight is None:
            return None
        return super()._prune_parameter_and_grad(weight, keep_idxs, pruning_dim)  # type: ignore[misc]


def _kept(size: int, idxs: Sequence[int]) -> list[int]:
    """The channels of ``size`` left after removing ``idxs``, in order."""
    return sorted(set(range(size)) - set(idxs))


def _without_gains(
    self: function.BasePruningFunc, layer: nn.Module, idxs: Sequence[int], prune: Any
) -> nn.Module:
    """``prune(layer, idxs)`` (Torch-Pruning's), then the layer's own other per-output-channel
    parameters cut too (the gain of timm's ``ScaledStdConv2d``, NF-Nets), which it leaves at
    their old size."""
    gains = [name for name in output_parameters(layer) if name != "bias"]
    keep = _kept(layer.out_channels, idxs)
    layer = prune(layer, idxs)
    for name in gains:
        setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 0))
    return layer


class ConvPruner(_AbsentStaysAbsent, function.ConvPruner):
    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return _without_gains(self, layer, idxs, super().prune_out_channels)


class DepthwiseConvPruner(_AbsentStaysAbsent, function.DepthwiseConvPruner):
    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return _without_gains(self, layer, idxs, super().prune_out_channels)

    prune_in_channels = prune_out_channels  # its input and output channels are one


class GroupNormPruner(_AbsentStaysAbsent, function.GroupNormPruner):
    pass


# stateless, as Torch-Pruning's own (one instance per kind in its ``PrunerBox``)
MENDED_PRUNERS: dict[ops.OPTYPE, function.BasePruningFunc] = {
    ops.OPTYPE.CONV: ConvPruner(),
    ops.OPTYPE.DEPTHWISE_CONV: DepthwiseConvPruner(),
    ops.OPTYPE.GN: GroupNormPruner(),
}


def mended_graph() -> tp.DependencyGraph:
    """A Torch-Pruning dependency graph using the pruners above for its convolutions and
    GroupNorms. Only adasap's graphs use them: Torch-Pruning's own functions stay as they are
    for anyone else using it in the same process."""
    graph = tp.DependencyGraph()
    graph.REGISTERED_PRUNERS.update(MENDED_PRUNERS)
    # the graph tells input from output pruning by these sets, made when it was created
    pruners = [p for p in graph.REGISTERED_PRUNERS.values() if p is not None]
    graph._in_channel_pruning_fn = {p.prune_in_channels for p in pruners}
    graph._out_channel_pruning_fn = {p.prune_out_channels for p in pruners}
    return graph


class BlurPoolPruner(function.BasePruningFunc):
    """timm's ``BlurPool2d`` (TResNet, anti-aliased ResNets): a depthwise blur whose filter is
    a buffer, one per channel, which Torch-Pruning would take for an element-wise op."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _kept(layer.channels, idxs)
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
        keep = _kept(layer.scale.numel(), idxs)
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


def layer_pruner(layer: nn.Module) -> function.BasePruningFunc | None:
    """The pruner adasap's graphs use for ``layer`` (its channel counts and removal), or None
    for a layer none prunes."""
    custom = customized_pruners(layer).get(type(layer))
    kind = ops.module2type(layer)
    return custom or MENDED_PRUNERS.get(kind) or function.PrunerBox.get(kind)
