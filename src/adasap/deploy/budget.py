"""Latency budgets (AdaSAP_L): predict a pruned model's latency from its table, and prune to it.

Following HALP (Shen et al., 2022), the model's latency after a removal is predicted as the sum
of its layers' table entries (bilinear in the kept channel counts) plus the rest of the model,
anchored on its measured latency (see :func:`latency_predictor`); neurons are ranked by
importance per millisecond they save, and :func:`adasap.method.pruning.select_neurons` removes
the lowest-ranked ones until the prediction meets the budget.

Latency is that of the runtime the model will be deployed to (``TimingSettings.runtime``):
the table, the dense model and the final check are all timed there.

Wiring ``PruneSettings.keep_kind == "latency"`` into an iterative pipeline::

    budget = latency_budget(layout, example_inputs, keep, round_to=16)  # on the dense model
    target = budget.dense_ms - (budget.dense_ms - budget.target_ms) * step / steps
    chosen = budget.select(layout, scores, target, min_channels, 16)  # at each pruning step
    remove_neurons(layout, chosen)  # then rebuild the layout as for any other target

``budget.select`` calls ``select_neurons(layout, latency_ranking(layout, scores, table),
target, latency_predictor(layout, table, budget.current_ms), "ms", min_channels, round_to)``
and keeps ``budget.current_ms`` (the predicted latency of the pruned model) for the next step.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adasap.alignment import RoundTo, check_rounding, resolve_round_to
from adasap.deploy.table import LatencyTable
from adasap.deploy.timing import DEFAULT_TIMING, TimingSettings, measure_latency, time_models
from adasap.errors import UserError
from adasap.method.importance import magnitude_scores, normalize_scores
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import UnreachableTarget, remove_neurons, select_neurons, sliced_axes

# Groups whose removal saves less than this get ranked as if they saved this much (no 1/0).
_MIN_SAVING_MS = 1e-6
# A spread p90 / p10 above this means other processes disturb the timings.
_NOISY = 1.5


@dataclass(frozen=True)
class _TabledLayer:
    """A table layer in a layout: its channel counts and the neurons that own its channels."""

    name: str
    in_size: int
    out_size: int
    in_ids: Tensor | None
    out_ids: Tensor | None


def _tabled_layers(layout: NeuronLayout, table: LatencyTable) -> list[_TabledLayer]:
    owners = {
        (id(p), dim): torch.cat(axis.neuron_of_channel)
        for p, dim, axis in sliced_axes(layout).values()
    }
    modules = dict(layout.model.named_modules())
    layers = []
    for name in table.layers:
        if name not in modules:
            raise UserError(
                f"the latency table has layer {name!r}, which this model lacks: measure the "
                "table on this model"
            )
        weight = modules[name].weight
        layers.append(
            _TabledLayer(
                name,
                weight.shape[1],
                weight.shape[0],
                owners.get((id(weight), 1)),
                owners.get((id(weight), 0)),
            )
        )
    return layers


def _layers_ms(layers: list[_TabledLayer], table: LatencyTable, removed: Tensor) -> float:
    total = 0.0
    for layer in layers:
        cin = layer.in_size - (int(removed[layer.in_ids].sum()) if layer.in_ids is not None else 0)
        cout = layer.out_size - (
            int(removed[layer.out_ids].sum()) if layer.out_ids is not None else 0
        )
        total += table.layer_ms(layer.name, cin, cout)
    return total


def latency_predictor(
    layout: NeuronLayout, table: LatencyTable, current_latency: float
) -> Callable[[Tensor], float]:
    """``removed mask -> predicted latency (ms)`` for :func:`select_neurons`.

    ``current_latency`` is the latency of ``layout.model`` as it is (measured, or predicted by
    the previous step), so the prediction for no removal equals it. The table's layers are
    summed at their kept channel counts; the rest of the model (``current_latency`` minus the
    layers: activations, additions, pooling) is part per-call overhead, which stays, and part
    per-element work, which shrinks with the layers. It is split in the proportion the table
    shows for the layers themselves, whose latency at one channel is their overhead: a constant
    alone overestimates pruned models with large feature maps (ResNet-50 at 224 px: -20%
    measured vs budget), a share alone underestimates overhead-bound ones (ResNet-20 at batch
    1: +10%). Should the layers, timed alone, add up to more than the whole model, they are
    scaled down to fit and the rest is zero.
    """
    layers = _tabled_layers(layout, table)
    full = _layers_ms(layers, table, torch.zeros(layout.num_neurons, dtype=torch.bool))
    if full <= 0:
        return lambda removed: current_latency
    scale = min(1.0, current_latency / full)
    rest = current_latency - scale * full
    fixed = _layers_ms(layers, table, torch.ones(layout.num_neurons, dtype=torch.bool)) / full

    def predict(removed: Tensor) -> float:
        share = _layers_ms(layers, table, removed) / full
        return (scale * full + rest * (1 - fixed)) * share + rest * fixed

    return predict


def latency_ranking(layout: NeuronLayout, scores: Tensor, table: LatencyTable) -> Tensor:
    """Importance per millisecond saved: the order in which to remove neurons for latency.

    HALP approximates its knapsack greedily by value per cost; here a neuron's cost is the
    latency its group saves per removed channel, taken over removing half the group (the
    table's slope at a single channel can be flat). Pass normalised scores, as for any target.
    """
    layers = _tabled_layers(layout, table)
    nothing = torch.zeros(layout.num_neurons, dtype=torch.bool)
    full = _layers_ms(layers, table, nothing)
    saving = torch.empty(len(layout.groups))
    for k, group in enumerate(layout.groups):
        count = max(1, group.size // 2)
        removed = nothing.clone()
        removed[group.offset : group.offset + count] = True
        saving[k] = (full - _layers_ms(layers, table, removed)) / count
    return scores / saving.clamp(min=_MIN_SAVING_MS)[layout.group_index()]


@dataclass
class LatencyBudget:
    """A latency target (``keep`` x the dense latency) and the running latency prediction."""

    table: LatencyTable
    keep: float
    dense_ms: float
    current_ms: float

    @property
    def target_ms(self) -> float:
        return self.keep * self.dense_ms

    def select(
        self,
        layout: NeuronLayout,
        scores: Tensor,
        target_ms: float | None = None,
        min_channels: int = 1,
        round_to: int = 1,
    ) -> Tensor:
        """The neurons to remove to reach ``target_ms`` (default: the final budget).

        ``min_channels`` and ``round_to`` are as in :func:`select_neurons`. Updates
        :attr:`current_ms` to the predicted latency once they are removed.
        """
        target = self.target_ms if target_ms is None else target_ms
        predict = latency_predictor(layout, self.table, self.current_ms)
        ranking = latency_ranking(layout, scores, self.table)
        try:
            chosen = select_neurons(layout, ranking, target, predict, "ms", min_channels, round_to)
        except UnreachableTarget as exc:
            rounded = f" in multiples of {round_to}" if round_to > 1 else ""
            fix = ", or any channel count with --round-to 1" if round_to > 1 else ""
            raise UnreachableTarget(
                f"a latency of {target:.3g} ms ({target / self.dense_ms:.0%} of the dense "
                f"{self.dense_ms:.3g} ms) cannot be reached without emptying a layer{rounded} "
                f"(the floor is {exc.smallest:.3g} ms, {exc.smallest / self.dense_ms:.0%}): "
                f"keep a larger fraction of the latency{fix}",
                exc.smallest,
            ) from exc
        removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
        removed[chosen] = True
        self.current_ms = predict(removed)
        return chosen


def _check_keep(keep: float) -> None:
    if not 0 < keep <= 1:
        raise UserError(
            f"latency budget must be a fraction in (0, 1], got {keep}: e.g. 0.5 keeps half "
            "the dense latency"
        )


def latency_budget(
    layout: NeuronLayout,
    example_inputs: Tensor,
    keep: float,
    *,
    timing: TimingSettings = DEFAULT_TIMING,
    table: LatencyTable | None = None,
    round_to: int | None = None,
) -> LatencyBudget:
    """Measure the dense model (and its latency table, unless given) and set the budget.

    Timing happens as ``timing`` says (by default on the CPU at batch 1, in its runtime),
    whatever device the model trains on; a given ``table`` sets the runtime and batch size
    instead. ``round_to`` is the channel multiple the removals will keep, where the table's
    grid points lie (:meth:`LatencyTable.measure`).
    """
    _check_keep(keep)
    if table is None:
        table = LatencyTable.measure(layout, example_inputs, timing, round_to)
    (dense,) = measure_latency(
        layout.model,
        tuple(example_inputs.shape[1:]),
        batch_sizes=(table.batch_size,),
        runtime=table.runtime,
        device=timing.device,
        warmup=timing.warmup,
        repeats=timing.repeats,
    )
    if dense.p90_ms > _NOISY * dense.p10_ms:
        warnings.warn(
            f"latency on this machine is noisy (p10 {dense.p10_ms:.3g} ms, p90 "
            f"{dense.p90_ms:.3g} ms): other processes compete for it, so the budget may be "
            "missed; time on an idle machine or raise repeats",
            stacklevel=2,
        )
    return LatencyBudget(table, keep, dense.median_ms, dense.median_ms)


@dataclass(frozen=True)
class LatencyPruneReport:
    """Budget, predicted and measured latency of a model pruned to a latency budget.

    All relative to ``dense_ms``, the dense model timed beside the pruned one at the end.
    """

    dense_ms: float
    budget_ms: float
    predicted_ms: float
    measured_ms: float
    batch_size: int
    removed: int
    pruning_history: list[list[Any]]

    @property
    def error(self) -> float:
        """Measured over budget, minus one: 0.05 means 5% slower than the budget."""
        return self.measured_ms / self.budget_ms - 1

    def within(self, tolerance: float = 0.1) -> bool:
        return abs(self.error) <= tolerance

    def to_dict(self) -> dict[str, Any]:
        values = {k: v for k, v in asdict(self).items() if k != "pruning_history"}
        return {**values, "error": self.error}

    def __str__(self) -> str:
        return (
            f"latency at batch {self.batch_size}: dense {self.dense_ms:.3f} ms, budget "
            f"{self.budget_ms:.3f} ms, predicted {self.predicted_ms:.3f} ms, measured "
            f"{self.measured_ms:.3f} ms ({self.error:+.1%} vs budget); "
            f"{self.removed} neurons removed"
        )


def time_dense_and_pruned(
    dense: nn.Module,
    pruned: nn.Module,
    input_shape: Sequence[int],
    budget: LatencyBudget,
    timing: TimingSettings = DEFAULT_TIMING,
) -> tuple[float, float]:
    """Median milliseconds of ``dense`` and ``pruned`` timed now as ``budget`` was: in its
    table's runtime and at its batch size (taking turns where the runtime allows)."""
    (dense_now,), (pruned_now,) = time_models(
        [dense, pruned],
        tuple(input_shape),
        batch_sizes=(budget.table.batch_size,),
        runtime=budget.table.runtime,
        device=timing.device,
        warmup=timing.warmup,
        repeats=timing.repeats,
    )
    return dense_now.median_ms, pruned_now.median_ms


def default_scores(layout: NeuronLayout) -> Tensor:
    """L2 magnitude, normalised by each group's mean (the pipeline's default criterion)."""
    return normalize_scores(magnitude_scores(layout), layout)


def prune_to_latency(
    model: nn.Module,
    example_inputs: Tensor,
    keep_latency: float,
    *,
    scores_fn: Callable[[NeuronLayout], Tensor] = default_scores,
    ignored_layers: Sequence[nn.Module] | None = None,
    min_channels: int = 1,
    round_to: RoundTo = "auto",
    timing: TimingSettings = DEFAULT_TIMING,
    table: LatencyTable | None = None,
) -> LatencyPruneReport:
    """Prune ``model`` in place, in one shot, to ``keep_latency`` x its measured latency.

    ``ignored_layers`` defaults to the last linear layer (the classifier). ``round_to: auto``
    keeps the channel multiple of ``timing.runtime`` on ``timing.device``
    (:func:`adasap.alignment.channel_alignment`; 1: any count). The report compares the pruned
    model's latency with the budget; both are timed again at the end, so that the machine's
    drift since the first measurement does not count as error. Its ``pruning_history`` is
    what :func:`adasap.deploy.serialization.save_model` stores.
    """
    _check_keep(keep_latency)
    check_rounding(timing.runtime, round_to)
    round_to = resolve_round_to(round_to, timing.runtime, timing.device)
    if ignored_layers is None:
        ignored_layers = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    dense = copy.deepcopy(model)
    layout = NeuronLayout(model, example_inputs, ignored_layers)
    budget = latency_budget(
        layout, example_inputs, keep_latency, timing=timing, table=table, round_to=round_to
    )
    chosen = budget.select(layout, scores_fn(layout), min_channels=min_channels, round_to=round_to)
    remove_neurons(layout, chosen)
    dense_ms, pruned_ms = time_dense_and_pruned(
        dense, model, tuple(example_inputs.shape[1:]), budget, timing
    )
    return LatencyPruneReport(
        dense_ms=dense_ms,
        budget_ms=keep_latency * dense_ms,
        predicted_ms=budget.current_ms / budget.dense_ms * dense_ms,
        measured_ms=pruned_ms,
        batch_size=budget.table.batch_size,
        removed=len(chosen),
        pruning_history=layout.graph.pruning_history(),
    )
