"""Neurons, their parameter slices, and their importance scores.

A neuron is one channel index of a Torch-Pruning dependency group: an output channel of a
prunable layer together with every coupled slice (its BatchNorm entries, its bias, the input
columns of the layers it feeds, and the channels tied to it by residual additions), or one
head of an attention layer (:mod:`adasap.method.heads`). The layout built here is the single
source of truth for scoring, for the per-neuron perturbation radii and for physical removal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch_pruning._helpers import to_plain_idxs

from adasap.checks import check_input
from adasap.errors import UserError, exception_summary
from adasap.method import (
    maxvit_heads,  # noqa: F401  (registers MaxViT's heads adapter)
    window_heads,  # noqa: F401  (registers Swin's heads adapter)
)
from adasap.method.effort import DEFAULT_BUDGET, Effort, EffortBudget, checked_search
from adasap.method.examples import Example, run_example
from adasap.method.failures import layer_in_traceback
from adasap.method.grouped import grouped_supported, tie_grouped, tied_slices
from adasap.method.heads import HeadSpec, attention_heads, head_macs_hooks
from adasap.method.layer_pruners import is_channel_scale, output_parameters
from adasap.method.optim import NeuronOwnership
from adasap.method.probe import breaking_groups
from adasap.method.whole import (
    consumes_channels,
    dependency_graph,
    inside_attention,
    maps_copies_apart,
    moves_channels,
    reaches_channel_move,
)

NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.PReLU,
)


@dataclass
class ParamSlice:
    """Channels ``idxs`` along ``dim`` of ``module.<attr>`` belong to root channels ``roots``."""

    module: nn.Module
    attr: str
    dim: int
    idxs: Tensor
    roots: Tensor
    is_output: bool

    @property
    def param(self) -> Tensor:
        return getattr(self.module, self.attr)


@dataclass
class NeuronGroup:
    """One dependency group: ``size`` neurons whose global ids start at ``offset``."""

    name: str
    root: nn.Module
    size: int
    offset: int
    slices: list[ParamSlice] = field(default_factory=list)
    has_bn: bool = False
    heads: HeadSpec | None = None  # an attention layer's heads (adasap.method.heads)
    neuron_of_root: Tensor | None = None  # each root channel's neuron, where several share one


def _param_dims(module: nn.Module, is_output: bool) -> list[tuple[str, int]]:
    """Which (parameter, dimension) pairs a channel pruning of ``module`` slices."""
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if is_output or depthwise:
            dims = [("weight", 1 if module.transposed else 0)]
            return dims + [(name, 0) for name in output_parameters(module)]
        # a grouped conv's input: columns per group, tied into neurons by grouped.tie_grouped
        return [("weight", 0 if module.transposed else 1)]
    if isinstance(module, nn.Linear):
        if is_output:
            return [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
        return [("weight", 1)]
    if isinstance(module, nn.LSTM) and not is_output:  # an input: a column of every gate
        return [(f"weight_ih_l0{d}", 1) for d in ("", "_reverse")[: 1 + module.bidirectional]]
    if isinstance(module, NORM_TYPES) or is_channel_scale(module):
        return [(name, 0) for name, _ in module.named_parameters(recurse=False)]
    return []


class NeuronLayout:
    """The neurons of a model, from Torch-Pruning's dependency graph.

    A dependency group becomes neurons only when every slice it cuts is one we model exactly;
    groups reaching into attention layers, transposed grouped convolutions, GroupNorms
    of more than one group, channel-moving ops (shuffles) or parameters used outside standard
    layers are left whole, and so are the groups whose removal Torch-Pruning completes but
    leaves the model unable to run (found on a copy, :mod:`adasap.method.probe`; their roots
    in ``left_whole``). An attention layer's heads are neurons of their own (``heads``); a
    group reaching grouped (not depthwise) convolutions ties one channel index of every
    conv group into one neuron (:mod:`adasap.method.grouped`).

    Args:
        model: any module Torch-Pruning can trace.
        example_inputs: a batch the model accepts, a tensor or a detector's list of images
            (used for tracing and to record the spatial size of each layer's output, which
            MACs accounting needs).
        ignored_layers: modules whose output channels are never pruned (their inputs still are
            when the layer they read from is pruned). The classifier belongs here.
        budget: how long and how much memory tracing and the group search may take
            (:mod:`adasap.method.effort`); past it, a :class:`UserError` names the layer.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Example,
        ignored_layers: Sequence[nn.Module] = (),
        budget: EffortBudget = DEFAULT_BUDGET,
    ) -> None:
        self.model, self.example_inputs = model, example_inputs
        self.ignored_layers = list(ignored_layers)
        names = {m: n for n, m in model.named_modules()}
        effort = Effort(budget, type(model).__name__)
        was_training = model.training
        model.eval()  # tracing runs a forward pass: keep BatchNorm statistics untouched
        try:
            self.graph = dependency_graph(model, example_inputs, self.ignored_layers)
            self.output_pixels, head_macs = _output_pixels(model, example_inputs)
        except Exception as exc:  # Torch-Pruning raises anything from its tracer
            if isinstance(example_inputs, Tensor):  # the data do not fit?
                check_input(model, example_inputs, "the example inputs")
            raise UserError(
                f"Torch-Pruning cannot trace the model after {layer_in_traceback(exc, names)} "
                f"({exception_summary(exc)}): write what follows that layer with standard layers "
                "and tensor ops (a channel shuffle as nn.ChannelShuffle), or prune another model"
            ) from exc
        finally:
            model.train(was_training)
        effort.check()  # the graph's build is one call: checked once it returns
        order = {m: i for i, m in enumerate(names)}
        ignored = set(map(id, self.ignored_layers))
        untouchable = inside_attention(model)
        owners = {
            id(p): (m, attr)
            for m in model.modules()
            for attr, p in m.named_parameters(recurse=False)
        }
        unwrapped = {id(u.parameters): u.pruning_dim for u in self.graph.unwrapped_parameters}
        found: list[NeuronGroup] = []
        for root, tp_group, size in self._dependency_groups(names, effort, untouchable):
            slices = []
            exact = True
            for item in tp_group:
                node = item.dep.target
                module = node.module
                is_output = self.graph.is_out_channel_pruning_fn(item.dep.handler)
                if is_output and id(module) in ignored and not isinstance(module, NORM_TYPES):
                    exact = False
                if id(module) in untouchable or moves_channels(node):
                    exact = False
                if item.root_idxs is not None and maps_copies_apart(node, item):
                    exact = False
                if not grouped_supported(module):
                    exact = False
                if isinstance(module, nn.GroupNorm) and module.num_groups > 1:
                    exact = False  # its channel count must stay a multiple of its groups
                if isinstance(module, nn.RNNBase) and (
                    is_output or not isinstance(module, nn.LSTM) or module.num_layers > 1
                ):
                    exact = False  # Torch-Pruning cuts an LSTM's first input only
                if not exact:
                    break
                if item.root_idxs is None:
                    continue
                idxs = torch.as_tensor(to_plain_idxs(item.idxs))
                roots = torch.as_tensor(item.root_idxs)
                if isinstance(module, nn.Parameter):
                    dim = unwrapped.get(id(module))
                    if dim is None or sum(n > 1 for n in module.shape) != 1:
                        exact = False  # a weight used outside a layer: which dim is a channel?
                        break
                    owner, attr = owners[id(module)]
                    slices.append(ParamSlice(owner, attr, dim % module.dim(), idxs, roots, True))
                    continue
                if not isinstance(module, nn.Module):
                    continue
                for attr, dim in _param_dims(module, is_output):
                    slices.append(ParamSlice(module, attr, dim, idxs, roots, is_output))
            neuron_of_root, exact = tie_grouped(slices, size) if exact else (None, False)
            if not exact or not slices:
                continue
            if neuron_of_root is not None:  # grouped convs: a neuron is a channel of each group
                slices, size = tied_slices(slices, neuron_of_root), int(neuron_of_root.max()) + 1
            if any(s.idxs.numel() and int(s.idxs.max()) >= s.param.shape[s.dim] for s in slices):
                continue  # Torch-Pruning misread an op (a per-head parameter for a channel's)
            group = NeuronGroup(names.get(root, type(root).__name__), root, size, 0)
            group.slices, group.neuron_of_root = _deduplicate(slices), neuron_of_root
            group.has_bn = any(
                isinstance(s.module, nn.modules.batchnorm._BatchNorm) for s in group.slices
            )
            found.append(group)
        broken = breaking_groups(model, self.graph, found, example_inputs, effort)
        self.left_whole = [g.name for g in broken]  # removals Torch-Pruning gets wrong
        found = [g for g in found if all(g is not b for b in broken)]
        for module, spec in attention_heads(model, self.ignored_layers, head_macs):
            group = NeuronGroup(names[module], module, spec.count, 0, heads=spec)
            group.slices = [ParamSlice(*s) for s in spec.slices()]
            found.append(group)
        # Module order makes neuron ids stable and readable (first layer first).
        self.groups = sorted(found, key=lambda g: order.get(g.root, len(order)))
        offset = 0
        for group in self.groups:
            group.offset = offset
            offset += group.size
        self.num_neurons = offset

    def _dependency_groups(
        self, names: dict[nn.Module, str], effort: Effort, untouchable: set[int]
    ) -> list[tuple[nn.Module, Any, int]]:
        """Torch-Pruning's group of each conv or linear layer not yet in one (its
        ``get_all_groups``) and its channel count, without those meeting a channel-moving op;
        failures and a spent ``effort`` as UserErrors naming the layer. A list, not a
        generator: the search's checks end with it, not whenever a generator is collected."""
        graph = self.graph
        # a group from a layer inside attention (``untouchable``) holds that layer's own
        # channels, which stay whole, and the search through the heads' reshapes may not end
        ignored = set(map(id, self.ignored_layers + graph.IGNORED_LAYERS_IN_TRACING))
        ignored |= untouchable
        visited: set[int] = set()
        groups = []
        with checked_search(graph, effort):
            # the model's order: a layer roots its group before the layers fed by it, where
            # Torch-Pruning maps a channel and its copies (GhostNet's concatenation) as one
            for module in names:
                node = graph.module2node.get(module)
                if node is None or id(module) in ignored or id(module) in visited:
                    continue
                if not consumes_channels(module):
                    continue
                if reaches_channel_move(node):
                    continue
                name = names.get(module, "?")
                effort.part = (name, type(module).__name__)
                effort.check()
                try:
                    pruner = graph.get_pruner_of_module(module)
                    size = None if pruner is None else pruner.get_out_channels(module)
                    if size is None:
                        continue
                    group = graph.get_pruning_group(module, pruner.prune_out_channels, range(size))
                    coupled = [
                        d.target.module
                        for d, _ in group
                        if graph.is_out_channel_pruning_fn(d.handler)
                    ]
                except UserError:  # the effort spent
                    raise
                except Exception as exc:  # Torch-Pruning mis-handles something in this group
                    raise UserError(
                        f"Torch-Pruning cannot group the channels of {name} "
                        f"({type(module).__name__}) ({exception_summary(exc)}): leave them "
                        f"unpruned with ignored_layers=[model.{name}] (the module itself)"
                    ) from exc
                visited.update(map(id, coupled))
                groups.append((module, group, size))
        return groups

    def ownership(self) -> NeuronOwnership:
        """Which neuron owns each output channel: the map AdaSAP's radii are applied through."""
        owners: dict[Tensor, tuple[int, Tensor]] = {}
        for group in self.groups:
            for s in group.slices:
                if not s.is_output:
                    continue
                p = s.param
                if p not in owners:
                    # -1 marks channels owned by no group (cannot happen for a traced layer).
                    owners[p] = (s.dim, torch.full((p.shape[s.dim],), -1, dtype=torch.long))
                owners[p][1][s.idxs] = s.roots + group.offset
        return NeuronOwnership(
            self.num_neurons,
            {p: (dim, ids) for p, (dim, ids) in owners.items() if (ids >= 0).all()},
        )

    def group_index(self) -> Tensor:
        """For each neuron, the index of its group."""
        return torch.cat(
            [torch.full((g.size,), i, dtype=torch.long) for i, g in enumerate(self.groups)]
        )

    def scatter(self, per_slice: Callable[[ParamSlice], Tensor | None]) -> Tensor:
        """Sum ``per_slice(slice)`` (a value per channel of the slice's dim) into neurons."""
        total = torch.zeros(self.num_neurons)
        for group in self.groups:
            for s in group.slices:
                values = per_slice(s)
                if values is None:
                    continue
                picked = values.detach().float().cpu()[s.idxs]
                total.index_add_(0, s.roots + group.offset, picked)
        return total

    def neuron_costs(self, kind: Literal["params", "macs"]) -> Tensor:
        """How many parameters (or MACs) each neuron's slices hold, counted per slice."""

        def cost(s: ParamSlice) -> Tensor:
            p = s.param
            per_channel = p.numel() / p.shape[s.dim]
            if kind == "macs" and s.attr == "weight" and not isinstance(s.module, NORM_TYPES):
                per_channel *= self.output_pixels.get(s.module, 1)
            elif kind == "macs":
                per_channel = 0.0
            return torch.full((p.shape[s.dim],), float(per_channel))

        costs = self.scatter(cost)
        for g in self.groups:  # a head's MACs include its attention matrices
            if kind == "macs" and g.heads is not None:
                costs[g.offset : g.offset + g.size] = g.heads.macs
        return costs


def _deduplicate(slices: list[ParamSlice]) -> list[ParamSlice]:
    """A BatchNorm reached as both input and output of a group is one slice, not two."""
    seen: set[tuple[int, str, int]] = set()
    unique = []
    for s in slices:
        key = (id(s.module), s.attr, s.dim)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


def _output_pixels(
    model: nn.Module, example_inputs: Example
) -> tuple[dict[nn.Module, int], dict[nn.Module, float]]:
    """Output positions per sample of each layer, over all its calls: a conv's spatial
    positions; a linear layer's rows per sample (1 for a classifier, a transformer's tokens,
    a detector's regions of interest in its box head). A detector's head applied to each
    feature map adds up. Also each attention layer's MACs per head (:mod:`heads`)."""
    pixels: dict[nn.Module, int] = {}
    head_macs: dict[nn.Module, float] = {}
    samples = len(example_inputs)

    def record(module: nn.Module, _inputs: object, output: Tensor) -> None:
        if isinstance(module, nn.Linear):  # channels last: every other element is a row
            positions = max(1, round(output.numel() / output.shape[-1] / samples))
        elif output.dim() > 2:
            positions = int(output[0, 0].numel())
        else:
            positions = max(1, round(output.shape[0] / samples))
        pixels[module] = pixels.get(module, 0) + positions

    hooks = [
        m.register_forward_hook(record)
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
    ] + head_macs_hooks(model, samples, head_macs)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            run_example(model, example_inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return pixels, head_macs
