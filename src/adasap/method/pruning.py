"""Physical structured pruning to a size target, and carrying optimizer state across it."""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import Tensor, nn

from adasap.errors import UserError, exception_summary
from adasap.method.examples import Example, first_sample
from adasap.method.failures import check_pruned_forward, layer_in_traceback, uncopyable
from adasap.method.grouped import neuron_block, root_channels
from adasap.method.heads import is_head_entry, remove_heads, removed_head_macs, replay_heads
from adasap.method.neurons import NeuronLayout
from adasap.method.whole import dependency_graph

SizeKind = Literal["params", "macs"]


@dataclass(frozen=True)
class ModelSize:
    params: int
    macs: int

    def of(self, kind: SizeKind) -> int:
        return self.params if kind == "params" else self.macs


# Torch-Pruning counts BatchNorm's MACs but not SyncBatchNorm's, whose arithmetic is the same:
# counted alike, a MACs target prunes a --sync-bn model as its BatchNorm twin.
tp.utils.op_counter.MODULES_MAPPING.setdefault(
    nn.SyncBatchNorm, tp.utils.op_counter.bn_flops_counter_hook
)


def measure_size(
    model: nn.Module, example_inputs: Example, part: nn.Module | None = None
) -> ModelSize:
    """Parameters and multiply-accumulates per sample, counted by Torch-Pruning.

    With ``part`` (a submodule, such as a detector's backbone), the size of that part alone.
    """
    was_training = model.training
    model.eval()
    sample = first_sample(example_inputs)
    # Torch-Pruning's counter unpacks a list into arguments: a list of images goes in wrapped
    args = sample if isinstance(sample, Tensor) else (sample,)
    try:
        macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(
            model, args, layer_wise=True
        )
    except TypeError as exc:  # counting works on a deep copy of the model
        raise uncopyable("to count its size", exc) from exc
    finally:
        model.train(was_training)
    if part is not None:
        macs, params = layer_macs[part], layer_params[part]
    return ModelSize(params=int(params), macs=int(macs))


@dataclass
class _SlicedAxis:
    """Every slice that cuts ``param`` along ``dim``: how many channels its neurons hold."""

    size: int
    neuron_of_channel: list[Tensor]


def sliced_axes(layout: NeuronLayout) -> dict[tuple[int, int], tuple[Tensor, int, _SlicedAxis]]:
    axes: dict[tuple[int, int], tuple[Tensor, int, _SlicedAxis]] = {}
    for group in layout.groups:
        for s in group.slices:
            p = s.param
            key = (id(p), s.dim)
            if key not in axes:
                axes[key] = (p, s.dim, _SlicedAxis(p.shape[s.dim], []))
            axes[key][2].neuron_of_channel.append(s.roots + group.offset)
    return axes


def predict_size(
    layout: NeuronLayout, removed: Tensor, current: ModelSize
) -> tuple[ModelSize, dict[int, float]]:
    """The size after removing the neurons where ``removed`` (a bool mask) is true.

    Exact for convolutions (grouped too), linear layers and norms: a parameter keeps
    ``numel * prod_d(kept_d / size_d)`` elements, and a weight's MACs scale the same way. An
    attention head's MACs are its own (``HeadSpec.macs``: projections and attention matrices).
    """
    fraction_kept: dict[int, float] = defaultdict(lambda: 1.0)
    params: dict[int, Tensor] = {}
    for p, _dim, axis in sliced_axes(layout).values():
        gone = sum(int(removed[ids].sum()) for ids in axis.neuron_of_channel)
        fraction_kept[id(p)] *= (axis.size - gone) / axis.size
        params[id(p)] = p
    owners = {id(getattr(m, "weight", None)): m for m in layout.model.modules()}
    param_drop = 0.0
    mac_drop, in_heads = removed_head_macs(layout.groups, removed)
    for key, p in params.items():
        lost = p.numel() * (1.0 - fraction_kept[key])
        param_drop += lost
        module = owners.get(key)
        if key not in in_heads and module is not None and module in layout.output_pixels:
            mac_drop += lost * layout.output_pixels[module]
    size = ModelSize(round(current.params - param_drop), round(current.macs - mac_drop))
    return size, dict(fraction_kept)


def size_predictor(
    layout: NeuronLayout, current: ModelSize, kind: SizeKind
) -> Callable[[Tensor], float]:
    """``removed mask -> predicted parameters (or MACs)`` for :func:`select_neurons`."""
    return lambda removed: predict_size(layout, removed, current)[0].of(kind)


class UnreachableTarget(UserError):
    """A size target below what pruning can reach without emptying a layer.

    ``smallest`` is the lowest cost that is reachable, in the target's unit.
    """

    def __init__(self, message: str, smallest: float) -> None:
        super().__init__(message)
        self.smallest = smallest


def _format_cost(value: float, unit: str) -> str:
    return f"{value:.3g} {unit}" if unit == "ms" else f"{value:,.0f} {unit}"


def _rounded_removal(chosen: Tensor, round_to: Tensor, group_of: Tensor, sizes: Tensor) -> Tensor:
    """``chosen`` less the highest-ranked of them needed to keep a multiple of ``round_to``.

    ``chosen`` is ordered from the lowest rank up. A group keeps the smallest multiple of its
    ``round_to`` at or above what ``chosen`` leaves it, or all its neurons if that is fewer.
    """
    groups = group_of[chosen]
    removed = torch.bincount(groups, minlength=len(sizes))
    kept = sizes - removed
    give_back = torch.minimum(sizes, (kept + round_to - 1) // round_to * round_to) - kept
    by_group = torch.argsort(groups, stable=True)
    sorted_groups = groups[by_group]
    position = torch.arange(len(chosen)) - torch.searchsorted(sorted_groups, sorted_groups)
    from_the_top = removed[sorted_groups] - 1 - position
    return chosen[by_group][from_the_top >= give_back[sorted_groups]]


def _give_back_blocks(
    removal: Tensor,
    round_to: Tensor,
    group_of: Tensor,
    ranking_scores: Tensor,
    cost: Callable[[Tensor], float],
    target: float,
) -> Tensor:
    """``removal`` less the blocks of ``round_to`` neurons it can give back and stay on target.

    The rounded removal overshoots by up to a block of one group (the last neuron added to the
    lowest-ranked completes a block), a large share of a small model: a 50% MACs target landed
    at 34% with ``round_to`` 8 on ResNet-20. Each group's highest-ranked removed block goes
    back, the best-ranked first, while ``cost`` of what stays removed is at most ``target``;
    a group keeps a multiple of its ``round_to`` (or all its neurons) throughout.
    """
    removed = torch.zeros(len(group_of), dtype=torch.bool)
    removed[removal] = True
    stacks: dict[int, list[int]] = defaultdict(list)  # per group, lowest-ranked first
    for neuron in removal[torch.argsort(ranking_scores[removal], stable=True)].tolist():
        stacks[int(group_of[neuron])].append(neuron)
    candidates: list[tuple[float, int]] = []

    def offer(group: int) -> None:
        if stacks[group]:  # ranked by the block's best neuron
            heapq.heappush(candidates, (-float(ranking_scores[stacks[group][-1]]), group))

    for group in list(stacks):
        offer(group)
    while candidates:
        _, group = heapq.heappop(candidates)
        block = stacks[group][-int(round_to[group]) :]
        removed[block] = False
        if cost(removed) <= target:
            del stacks[group][-len(block) :]
            offer(group)
        else:
            removed[block] = True  # the group's lower blocks save as much: it is done
    return torch.nonzero(removed).flatten()


def select_neurons(
    layout: NeuronLayout,
    ranking_scores: Tensor,
    target: float,
    predict: Callable[[Tensor], float],
    unit: str = "params",
    min_channels: int = 1,
    round_to: int = 1,
) -> Tensor:
    """The fewest lowest-ranked neurons whose removal brings the predicted cost to ``target``.

    ``predict`` maps a bool mask of removed neurons to the cost after removal (parameters,
    MACs, latency, ...; see :func:`size_predictor`) and must not grow as more are removed.
    Each layer keeps at least ``min_channels`` of the highest-ranked neurons of its group, so
    no layer is ever emptied, and, with ``round_to`` > 1, each group a multiple of
    ``round_to`` neurons (or all of them, when it has fewer): runtimes such as onnxruntime
    are fastest with channel counts that are multiples of 8 or 16
    (:func:`adasap.alignment.channel_alignment`); blocks are then given back while the target
    stays met, so the cost lands just under it. Raises
    :class:`UnreachableTarget` when the target cannot be met under these rules. An attention
    layer's heads are ``head_dim`` channels each: it keeps ``ceil(min_channels / head_dim)``
    heads (at least 1) and ignores ``round_to``; a grouped conv's neuron is a channel per group
    (its block: :func:`~adasap.method.grouped.neuron_block`).
    """
    if min_channels < 1 or round_to < 1:
        raise UserError(
            f"min_channels and round_to must be >= 1, got {min_channels} and {round_to}"
        )
    nothing = torch.zeros(layout.num_neurons, dtype=torch.bool)
    if predict(nothing) <= target:
        return torch.zeros(0, dtype=torch.long)
    protected = nothing.clone()
    for g in layout.groups:
        least = min_channels if g.heads is None else g.heads.min_heads(min_channels)
        # each layer of a group keeps some: one concatenated into a wider tensor owns only
        # part of the group's neurons (timm's CSPNeXt)
        for part in {tuple(s.roots.unique().tolist()) for s in g.slices if s.is_output}:
            neurons = torch.tensor(part, dtype=torch.long) + g.offset
            top = torch.topk(ranking_scores[neurons], min(least, len(part))).indices
            protected[neurons[top]] = True
    candidates = torch.nonzero(~protected).flatten()
    order = candidates[torch.argsort(ranking_scores[candidates], stable=True)]
    group_of = layout.group_index()
    sizes = torch.tensor([g.size for g in layout.groups], dtype=torch.long)
    blocks = torch.tensor([neuron_block(round_to, g) for g in layout.groups])

    def removal(count: int) -> Tensor:
        if round_to == 1:
            return order[:count]
        return _rounded_removal(order[:count], blocks, group_of, sizes)

    def cost_after(count: int) -> float:
        removed = nothing.clone()
        removed[removal(count)] = True
        return predict(removed)

    smallest = cost_after(len(order))
    if smallest > target:
        rounding, fix = "", "keep a larger fraction or prune fewer layers"
        if round_to > 1:
            rounding = f" and keeping multiples of {round_to}"
            fix = "keep a larger fraction, or any channel count with --round-to 1 (round_to=1)"
        raise UnreachableTarget(
            f"cannot reach {_format_cost(target, unit)} without emptying a layer{rounding} "
            f"(smallest reachable is {_format_cost(smallest, unit)}); {fix}",
            smallest,
        )
    low, high = 0, len(order)
    while low < high:
        mid = (low + high) // 2
        if cost_after(mid) <= target:
            high = mid
        else:
            low = mid + 1
    if round_to == 1:
        return removal(low)
    return _give_back_blocks(removal(low), blocks, group_of, ranking_scores, predict, target)


def remove_neurons(layout: NeuronLayout, neuron_ids: Tensor) -> dict[str, dict[int, Tensor]]:
    """Physically remove neurons; return, per parameter name, the kept indices per dimension.

    The returned map is what :func:`transfer_optimizer_state` needs to carry momentum over to
    the new, smaller parameter tensors. A failure inside Torch-Pruning, or a pruned model that
    no longer runs on the layout's example input (:func:`check_pruned_forward`), is a
    :class:`UserError` naming the layer; the model may then be half pruned or broken
    (``adasap.prune`` prunes a copy).
    """
    removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
    removed[neuron_ids] = True
    names = {id(p): n for n, p in layout.model.named_parameters()}
    kept: dict[str, dict[int, Tensor]] = {}
    for p, dim, axis in sliced_axes(layout).values():
        keep = torch.ones(axis.size, dtype=torch.bool)
        for group in layout.groups:
            for s in group.slices:
                if s.param is p and s.dim == dim:
                    keep[s.idxs[removed[s.roots + group.offset]]] = False
        if not keep.all() and id(p) in names:
            kept.setdefault(names[id(p)], {})[dim] = torch.nonzero(keep).flatten()
    pruned = []
    heads = []
    for group in layout.groups:
        local = neuron_ids[(neuron_ids >= group.offset) & (neuron_ids < group.offset + group.size)]
        if len(local) == 0:
            continue
        pruned.append(group)
        if group.heads is not None:  # Torch-Pruning's groups never touch attention layers
            heads.append((group.name, (local - group.offset).tolist()))
            continue
        prune_out = layout.graph.get_pruner_of_module(group.root).prune_out_channels
        channels = root_channels(group.neuron_of_root, local - group.offset)  # grouped convs
        try:
            layout.graph.get_pruning_group(group.root, prune_out, channels).prune()
        except Exception as exc:  # Torch-Pruning raises whatever its code meets
            where = layer_in_traceback(exc, {m: n for n, m in layout.model.named_modules()})
            raise UserError(
                f"Torch-Pruning failed removing channels of {group.name} at {where} "
                f"({exception_summary(exc)}): leave that layer "
                f"unpruned with ignored_layers=[model.{where.split(' ')[0]}]"
            ) from exc
    for name, local in heads:
        # recorded with Torch-Pruning's entries, so every reader of the graph's history (the
        # Pruner, the latency budget, a saved model) has the heads too
        layout.graph.pruning_history().append(remove_heads(layout.model, name, local))
    if pruned:
        check_pruned_forward(layout.model, layout.example_inputs, pruned)
    return kept


def transfer_optimizer_state(
    old_state: Mapping[str, dict[str, Any]],
    kept: Mapping[str, dict[int, Tensor]],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Load the surviving channels' optimizer state (momentum, Adam moments) into ``optimizer``.

    ``old_state`` maps parameter names to the old optimizer's per-parameter state. A state
    tensor shaped like its old parameter is sliced with the kept indices; one that no longer
    fits (a layer Torch-Pruning changed in a way we do not model) is dropped, which restarts
    that parameter's momentum rather than corrupting it.
    """
    for name, p in model.named_parameters():
        if name not in old_state:
            continue
        new_state: dict[str, Any] = {}
        for key, value in old_state[name].items():
            if isinstance(value, Tensor) and value.dim() > 0:
                for dim, idxs in kept.get(name, {}).items():
                    if dim < value.dim():
                        value = value.index_select(dim, idxs.to(value.device))
                if value.shape != p.shape:
                    continue
            new_state[key] = value
        if new_state:
            optimizer.state[p] = new_state


def named_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, dict[str, Any]]:
    """The optimizer's per-parameter state keyed by parameter name (which survives pruning)."""
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: dict(s) for p, s in optimizer.state.items() if p in names}


def replay_pruning(
    model: nn.Module,
    history: list[list[Any]],
    example_inputs: Example,
    ignored_layers: Sequence[nn.Module] = (),
) -> None:
    """Apply a recorded pruning history to an unpruned copy of the same model, entry by
    entry in its order: Torch-Pruning's, and attention heads (:func:`heads.replay_heads`).

    ``ignored_layers`` are traced as :class:`NeuronLayout` traced them (a detector's heads).
    """
    if not history:
        return
    channels_last = is_channels_last(model)
    was_training = model.training
    model.eval()
    graph = None
    for entry in history:  # a history that checks its entries does so as they are applied
        if is_head_entry(entry):
            replay_heads(model, entry)
            graph = None  # traced again for what follows: a layer may have been replaced
            continue
        if graph is None:
            graph = dependency_graph(model, example_inputs, ignored_layers)
        graph.load_pruning_history([entry])
    model.train(was_training)
    if channels_last:
        model.to(memory_format=torch.channels_last)


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-D weights are channels-last (a 1-channel weight is both ways)."""
    return any(
        p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
        if p.dim() == 4
    )
