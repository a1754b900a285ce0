"""Cheaper sharpness-aware steps: randomized (RST), LookSAM, and the ascent on a sub-batch.

A sharpness-aware step takes two forward/backward passes where plain training takes one. The
three savings here keep SAM's perturbation formula, so AdaSAP's per-neuron radii carry over
unchanged (docs/performance.md):

- randomized sharpness (RST, Zhao et al. 2022): a step is sharpness-aware with probability
  ``p`` (constant, or linear from ``p`` to ``p_end`` over training), otherwise the base
  optimizer steps on the plain gradient; the draws come from a seeded generator whose state
  is saved, so a resumed run draws the same;
- LookSAM (Liu et al. 2022): the ascent runs at every ``k``-th step; at that step the part of
  the sharpness-aware gradient ``g_s`` orthogonal to the plain gradient ``g``,
  ``g_v = g_s - (g.g_s / ||g||^2) g``, is kept in the optimizer state, and the steps between
  update with ``g + alpha ||g|| / ||g_v|| g_v`` from a single pass;
- sub-batch ascent: the first gradient only sets the perturbation's direction, so it is taken
  on the first ``fraction`` of the batch. The pruner asks for it by calling the closure with
  ``fraction=...``; the first rows of a shuffled batch are a random sub-batch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from adasap.errors import UserError

StepKind = Literal["plain", "ascent", "reuse"]
# the optimizer-state key of LookSAM's stored direction (saved and sliced with the momentum)
DIRECTION = "looksam_direction"


def check_cheap_settings(settings: Any) -> None:
    """Raise :class:`UserError` for a ``sam_probability``, ``sam_every`` ... of settings out of
    range (their types: :class:`~adasap.method.pruner.PrunerSettings` checks them first)."""
    s = settings
    for name in ("sam_probability", "sam_probability_end"):
        value = getattr(s, name)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f"{name} must be in [0, 1], got {value}: e.g. {name}=0.5")
    if s.sam_every < 1:
        raise UserError(f"sam_every must be an integer >= 1, got {s.sam_every!r}: e.g. 5")
    if s.looksam_alpha < 0:
        raise UserError(f"looksam_alpha must be >= 0, got {s.looksam_alpha}: e.g. 0.7")
    if not 0 < s.ascent_fraction <= 1:
        raise UserError(f"ascent_fraction must be in (0, 1], got {s.ascent_fraction}: e.g. 0.5")


def takes_fraction(closure: Callable[..., Any]) -> bool:
    """Whether ``closure`` can be called as ``closure(fraction=0.5)``."""
    try:
        parameters = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        return False
    return any(
        p.kind is p.VAR_KEYWORD
        or p.name == "fraction"
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        for p in parameters
    )


def check_fraction_closure(closure: Callable[..., Any], fraction: float) -> None:
    if not takes_fraction(closure):
        raise UserError(
            f"ascent_fraction={fraction} needs a closure that takes the fraction of the batch "
            "to use: def closure(fraction=1.0): x, y = adasap.method.cheap_sam.sub_batch("
            "fraction, images, labels); return loss_fn(model(x), y)  (or set ascent_fraction=1)"
        )


def sub_batch(fraction: float, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The first ``ceil(fraction * n)`` rows (at least one) of each of ``tensors``."""
    if fraction >= 1:
        return tensors
    return tuple(t[: max(1, math.ceil(fraction * len(t)))] for t in tensors)


class StepPlan:
    """Which kind of step each training step is: plain, ascent (two passes) or LookSAM reuse.

    ``settings`` holds ``sam_probability``, ``sam_probability_end``, ``sam_every`` and
    ``seed`` (a :class:`~adasap.method.pruner.PrunerSettings`); ``total_steps`` is the length
    of training, over which a scheduled probability moves.
    """

    def __init__(self, settings: Any, total_steps: int) -> None:
        self.settings, self.total_steps = settings, total_steps
        self.generator = torch.Generator().manual_seed(settings.seed)

    def probability(self, step: int) -> float:
        """The chance that ``step`` is sharpness-aware: linear from start to end value."""
        start, end = self.settings.sam_probability, self.settings.sam_probability_end
        if end is None:
            return start
        return start + (end - start) * min(step / max(self.total_steps - 1, 1), 1.0)

    def kind(self, step: int, has_direction: bool) -> StepKind:
        """The kind of a sharpness-aware optimizer's step ``step``.

        A LookSAM step without a stored direction (the first, or after the optimizer became
        sharpness-aware) is an ascent.
        """
        p = self.probability(step)
        if p < 1 and not (p > 0 and torch.rand((), generator=self.generator) < p):
            return "plain"
        every = self.settings.sam_every
        return "ascent" if every == 1 or step % every == 0 or not has_direction else "reuse"

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def has_direction(state: Mapping[Tensor, dict[str, Any]]) -> bool:
    """Whether the optimizer state holds a LookSAM direction."""
    return any(DIRECTION in s for s in state.values())


def gradients(params: list[Tensor]) -> dict[Tensor, Tensor]:
    """The current gradients by parameter (references: zero_grad(set_to_none) keeps them)."""
    return {p: p.grad for p in params if p.grad is not None}


def _total(values: list[Tensor]) -> Tensor:
    return torch.stack([v.float() for v in values]).sum()


@torch.no_grad()
def store_direction(state: dict[Tensor, dict[str, Any]], plain: Mapping[Tensor, Tensor]) -> None:
    """Keep ``g_v = g_s - (g.g_s / ||g||^2) g``, ``g`` from ``plain``, ``g_s`` in ``.grad``.

    A non-finite gradient (an AMP overflow) keeps the previous direction.
    """
    pairs = [(p, g, p.grad) for p, g in plain.items() if p.grad is not None]
    if not pairs:
        return
    dot = _total([(g * s).sum() for _, g, s in pairs])
    squared = _total([g.pow(2).sum() for _, g, _ in pairs])
    ratio = dot / squared.clamp_min(1e-30)
    if not bool(torch.isfinite(ratio) & torch.isfinite(_total([s.sum() for *_, s in pairs]))):
        return
    for p, g, s in pairs:
        state[p][DIRECTION] = s - ratio.to(g.dtype) * g


@torch.no_grad()
def add_direction(
    state: Mapping[Tensor, dict[str, Any]], params: list[Tensor], alpha: float
) -> None:
    """``g += alpha ||g|| / ||g_v|| g_v`` with the stored direction (the LookSAM reuse step)."""
    pairs = [
        (p.grad, state[p][DIRECTION])
        for p in params
        if p.grad is not None and DIRECTION in state.get(p, {})
    ]
    if not pairs:
        return
    grad_norm = _total([g.pow(2).sum() for g, _ in pairs]).sqrt()
    direction_norm = _total([v.pow(2).sum() for _, v in pairs]).sqrt()
    scale = alpha * grad_norm / (direction_norm + 1e-12)
    for g, v in pairs:
        g.add_(v * scale.to(g.dtype))
