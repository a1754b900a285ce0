"""Grouped convolutions (not depthwise: RegNet's and ResNeXt's 3x3 convolutions) as neurons.

A grouped convolution with ``G`` groups splits its ``C`` channels (on either side) into ``G``
runs of ``C / G``, and each run of outputs reads only its run of inputs. Removing channels
keeps the layer a grouped convolution only when every group loses as many, and its weight
``[C_out, C_in / G, k, k]`` stays one tensor only when every group loses the same *local*
inputs (its columns are shared by position). So a neuron of a dependency group reaching one
is a channel index ``j`` within a group, taken in every group at once: channels
``{g * C / G + j}``. The dependency group's root channels are tied into such neurons here
(several channels of a slice then belong to one neuron, as a head's do); removal goes through
Torch-Pruning, whose convolution pruner does exactly this when the removed indices are the
same local ones in every group: it cuts output rows (``groups`` stays) and keeps the first
``C_in / G`` of the kept input indices, which are then every group's kept local indices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn


def is_grouped_conv(module: object) -> bool:
    """A grouped convolution that is not depthwise."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and not module.groups == module.in_channels == module.out_channels
    )


def grouped_supported(module: object) -> bool:
    """Whether a dependency group may reach ``module`` (true for any other module). A
    transposed grouped convolution keeps its output channels per group along the weight's
    second dimension, which Torch-Pruning slices as if whole: its groups stay whole."""
    return not (is_grouped_conv(module) and getattr(module, "transposed", False))


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def _channels(module: nn.modules.conv._ConvNd, is_output: bool) -> int:
    return module.out_channels if is_output else module.in_channels


def tie_grouped(slices: Sequence[Any], size: int) -> tuple[Tensor | None, bool]:
    """The neuron of each of a dependency group's ``size`` root channels, where its ``slices``
    (:class:`~adasap.method.neurons.ParamSlice`, roots still root channels) cut a grouped
    convolution: root channels at the same local index of a grouped convolution's groups are
    one neuron (transitively, across several such layers). ``(None, True)`` when no slice
    cuts one; ``(_, False)`` when a slice covers only some of a grouped convolution's channels
    (a concatenation feeding it): its groups could not lose equally."""
    tied = _UnionFind(size)
    found = False
    for s in slices:
        module = s.module
        if not is_grouped_conv(module):
            continue
        found = True
        channels = _channels(module, s.is_output)
        idxs, roots = s.idxs.tolist(), s.roots.tolist()
        if sorted(idxs) != list(range(channels)):
            return None, False
        width = channels // module.groups
        first: dict[int, int] = {}
        for i, r in zip(idxs, roots, strict=True):
            tied.union(first.setdefault(i % width, r), r)
    if not found:
        return None, True
    components = [tied.find(r) for r in range(size)]
    numbering = {c: n for n, c in enumerate(dict.fromkeys(components))}
    return torch.tensor([numbering[c] for c in components], dtype=torch.long), True


def local_input_slice(
    module: nn.modules.conv._ConvNd, idxs: Tensor, neurons: Tensor
) -> tuple[Tensor, Tensor]:
    """A grouped convolution's input columns (the weight's dim 1, ``C_in / G`` wide) and
    their neurons, from its input channels ``idxs`` (``C_in`` of them) and theirs: column ``j``
    is input ``j`` of every group, all one neuron (:func:`tie_grouped`)."""
    width = module.in_channels // module.groups
    local = torch.full((width,), -1, dtype=torch.long)
    local[idxs % width] = neurons
    return torch.arange(width), local


Slice = TypeVar("Slice")


def tied_slices(slices: Sequence[Slice], neuron_of_root: Tensor) -> list[Slice]:
    """``slices`` (:class:`~adasap.method.neurons.ParamSlice`) with their root channels
    replaced by the neurons that tie them (:func:`tie_grouped`), and a grouped convolution's
    input columns each once (:func:`local_input_slice`): summed per neuron, scores and sizes
    count each parameter element once."""
    tied = []
    for s in slices:
        one: Any = s
        idxs, roots = one.idxs, neuron_of_root[one.roots]
        if is_grouped_conv(one.module) and not one.is_output:
            idxs, roots = local_input_slice(one.module, idxs, roots)
        tied.append(dataclasses.replace(one, idxs=idxs, roots=roots))
    return tied


def neuron_block(round_to: int, group: Any) -> int:
    """How many of ``group``'s neurons make a block of ``round_to`` channels: a grouped conv's
    neuron holds a channel of each of its ``G`` groups, so ``round_to / gcd(G, round_to)`` of
    them keep the channel count a multiple of ``round_to``; a head is a block of its own."""
    if group.heads is not None:
        return 1
    if group.neuron_of_root is None:
        return round_to
    return round_to // math.gcd(len(group.neuron_of_root) // group.size, round_to)


def root_channels(neuron_of_root: Tensor | None, neurons: Tensor) -> list[int]:
    """The root channels Torch-Pruning removes for the group's local ``neurons``."""
    if neuron_of_root is None:
        return neurons.tolist()
    return torch.nonzero(torch.isin(neuron_of_root, neurons)).flatten().tolist()
