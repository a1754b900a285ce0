"""What pruning aims at: a fraction of the parameters or MACs, or a latency budget.

A target chooses which neurons go at each removal step (moving from the dense size to the
final one in equal steps), tracks the current size, and says up front when the final target
cannot be reached without emptying a layer. :class:`SizeTarget` counts parameters or MACs;
:class:`LatencyTarget` adapts a latency budget (``adasap.deploy.latency``) to the same
interface, so the pruner needs no timing code.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from adasap.errors import UserError
from adasap.method.examples import Example
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import (
    ModelSize,
    measure_size,
    predict_size,
    select_neurons,
    size_predictor,
)

SizeKind = Literal["params", "macs"]
# a removal that leaves more than this times its predicted size, or a last removal that leaves
# less than its target divided by this, missed its target
MISSED_BY = 1.05


class OffTarget(UserWarning):
    """A removal that missed its target (:data:`MISSED_BY`), either way: ``kept`` is the
    fraction of the dense size it reached, ``aimed`` the one it aimed at."""

    def __init__(self, message: str, kept: float, aimed: float) -> None:
        super().__init__(message)
        self.kept, self.aimed = kept, aimed


class PruningTarget(Protocol):
    def select(
        self,
        layout: NeuronLayout,
        scores: Tensor,
        progress: float,
        min_channels: int,
        round_to: int,
    ) -> Tensor:
        """Neurons to remove now so that the size is ``progress`` (0-1] of the way down."""

    def removed(self, layout: NeuronLayout, size: ModelSize) -> None:
        """Called after a removal, with the new layout and the model's measured size."""

    def check(self, layout: NeuronLayout, min_channels: int, round_to: int) -> None:
        """Raise :class:`UserError` if the final target would empty a layer."""

    def fraction(self) -> float:
        """The current size as a fraction of the dense size."""

    def describe(self) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def fitting_round_to(
    target: PruningTarget, layout: NeuronLayout, min_channels: int, round_to: int, *, auto: bool
) -> int:
    """``round_to`` once ``target`` is known to be reachable with it; with ``auto`` (the
    runtime's channel block, not the user's choice) the largest of ``round_to``,
    ``round_to / 2``, ... 1 that reaches it, since blocks of 16 cannot take a small network
    (ResNet-20's 16-channel stage) below about half its MACs, and 8 or 4 still beat odd counts.
    An unreachable target is :meth:`PruningTarget.check`'s one-line error."""
    while auto and round_to > 1:
        try:
            target.check(layout, min_channels, round_to)
            return round_to
        except UserError:
            round_to //= 2
    target.check(layout, min_channels, round_to)
    return round_to


def check_keep(keep: float) -> None:
    if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0 < keep <= 1:
        raise UserError(f"keep fraction must be in (0, 1], got {keep!r}: e.g. keep=0.5")


class SizeTarget:
    """Keep ``keep`` of the dense model's parameters (or MACs), measured by Torch-Pruning."""

    def __init__(self, keep: float, kind: SizeKind = "params") -> None:
        check_keep(keep)
        if kind not in ("params", "macs"):
            raise UserError(f"size kind must be params or macs, got {kind!r}")
        self.keep, self.kind = keep, kind
        self.dense: ModelSize | None = None
        self.current: ModelSize | None = None
        self.step_target: int | None = None  # what the last selection predicted it reaches
        self.predicted: float | None = None  # the size its removal was predicted to leave
        self.last_step, self.round_to = False, 1  # whether it was the last, and its blocks
        self.missed: OffTarget | None = None  # what the last removal warned, if it missed

    def bind(self, dense: ModelSize) -> None:
        """Start from the dense model's measured size."""
        self.dense = self.current = dense

    @property
    def final(self) -> int:
        return int(self.keep * self.dense.of(self.kind))

    def select(
        self,
        layout: NeuronLayout,
        scores: Tensor,
        progress: float,
        min_channels: int,
        round_to: int,
    ) -> Tensor:
        dense = self.dense.of(self.kind)
        target = self.step_target = round(dense - (dense - self.final) * progress)
        predict = self._predictor(layout, self.current)
        chosen = select_neurons(layout, scores, target, predict, self.kind, min_channels, round_to)
        removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
        removed[chosen] = True
        self.predicted, self.last_step, self.round_to = predict(removed), progress >= 1, round_to
        return chosen

    def _predictor(self, layout: NeuronLayout, current: ModelSize) -> Callable[[Tensor], float]:
        """The size after removing a set of neurons, from the size ``current``."""
        return size_predictor(layout, current, self.kind)

    def removed(self, layout: NeuronLayout, size: ModelSize) -> None:
        self.current = self._measured(size)
        self.missed = self._missed()
        if self.missed is not None:
            warnings.warn(self.missed, stacklevel=2)

    def _measured(self, size: ModelSize) -> ModelSize:
        """The size the target counts after a removal, from the model's measured ``size``."""
        return size

    def _missed(self) -> OffTarget | None:
        """A missed target is never silent (the result's ``kept`` holds what was reached). The
        prediction follows Torch-Pruning's per-layer counts, and may not shrink as measured
        (MACs of some transformer and ConvNeXt layers); and the last removal, in whole neurons
        or blocks of ``round_to``, may land well under its target (0.373 for 0.5)."""
        if self.step_target is None:  # no removal since this target was made or restored
            return None
        dense, reached = self.dense.of(self.kind), self.current.of(self.kind)
        kept = reached / dense
        if reached > MISSED_BY * self.step_target:
            return OffTarget(
                f"the removal kept {kept:.1%} of the dense model's {self.kind}, not the "
                f"{self.step_target / dense:.1%} predicted: its size prediction misses for this "
                "model; prune by another keep kind (e.g. keep_kind='params') or give a smaller "
                "keep",
                kept,
                self.step_target / dense,
            )
        if not self.last_step or reached * MISSED_BY >= self.final:
            return None
        if self.predicted * MISSED_BY >= self.final:  # measured under the prediction
            cause = "its size prediction misses for this model; prune by another keep kind"
        else:
            blocks = f" in blocks of {self.round_to} (round_to)" if self.round_to > 1 else ""
            rounding = ", or round_to=1 for any channel count" if blocks else ""
            cause = (
                f"removing whole neurons{blocks} until the target was met went past it; give a "
                f"larger keep{rounding}"
            )
        return OffTarget(
            f"the pruned model keeps {kept:.1%} of the dense model's {self.kind}, under the "
            f"{self.keep:.1%} target: {cause}",
            kept,
            self.keep,
        )

    def check(self, layout: NeuronLayout, min_channels: int, round_to: int) -> None:
        equal = torch.ones(layout.num_neurons)
        predict = self._predictor(layout, self.dense)
        select_neurons(layout, equal, self.final, predict, self.kind, min_channels, round_to)

    def fraction(self) -> float:
        return self.current.of(self.kind) / max(self.dense.of(self.kind), 1)

    def describe(self) -> str:
        return f"size {self.fraction():.2f}"

    def state_dict(self) -> dict[str, Any]:
        return {"dense": [self.dense.params, self.dense.macs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense = ModelSize(*state["dense"])


class PartSizeTarget(SizeTarget):
    """Keep ``keep`` of one submodule's parameters (or MACs): a detector's backbone (+neck).

    The whole model is traced and measured as usual; this target counts ``part`` alone, bound
    to the part's own size from the start. Pair it with ``ignored_layers`` covering every layer
    outside ``part`` when only the part should lose neurons
    (:func:`adasap.method.output_layers.modules_outside`).
    """

    def __init__(
        self,
        keep: float,
        kind: SizeKind,
        model: nn.Module,
        part: nn.Module,
        example_inputs: Example,
    ) -> None:
        super().__init__(keep, kind)
        self.model, self.part, self.example = model, part, example_inputs
        self.dense = self.current = measure_size(model, example_inputs, part)

    def bind(self, dense: ModelSize) -> None:
        """Nothing: the reference is the part's own size, measured above, not the model's."""

    def _predictor(self, layout: NeuronLayout, current: ModelSize) -> Callable[[Tensor], float]:
        params = list(self.part.parameters())
        layers = [m for m in self.part.modules() if m in layout.output_pixels]

        def predict(removed: Tensor) -> float:
            kept = predict_size(layout, removed, current)[1]
            if self.kind == "params":
                lost = sum(p.numel() * (1.0 - kept.get(id(p), 1.0)) for p in params)
                return current.params - lost
            lost = sum(
                m.weight.numel() * (1.0 - kept.get(id(m.weight), 1.0)) * layout.output_pixels[m]
                for m in layers
            )
            return current.macs - lost

        return predict

    def _measured(self, size: ModelSize) -> ModelSize:
        return measure_size(self.model, self.example, self.part)

    def describe(self) -> str:
        return f"part size {self.fraction():.2f}"


class LatencyTarget:
    """A latency budget (``adasap.deploy.latency.LatencyBudget``) as a pruning target."""

    def __init__(self, budget: Any) -> None:
        self.budget = budget

    def select(
        self,
        layout: NeuronLayout,
        scores: Tensor,
        progress: float,
        min_channels: int,
        round_to: int,
    ) -> Tensor:
        dense = self.budget.dense_ms
        target = dense - (dense - self.budget.target_ms) * progress
        return self.budget.select(layout, scores, target, min_channels, round_to)

    def removed(self, layout: NeuronLayout, size: ModelSize) -> None:
        """The budget updated its prediction when it selected."""

    def check(self, layout: NeuronLayout, min_channels: int, round_to: int) -> None:
        equal = torch.ones(layout.num_neurons)
        copy.copy(self.budget).select(layout, equal, None, min_channels, round_to)

    def fraction(self) -> float:
        return self.budget.current_ms / self.budget.dense_ms

    def describe(self) -> str:
        return f"latency {self.fraction():.2f} (predicted)"

    def state_dict(self) -> dict[str, Any]:
        return {"latency_ms": [self.budget.dense_ms, self.budget.current_ms]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a resumed run keeps the budget it started with, not a new noisy measurement
        self.budget.dense_ms, self.budget.current_ms = state["latency_ms"]
