"""Neuron importance: criteria as callables on a :class:`NeuronLayout`, and what uses scores.

An importance is a callable ``importance(layout) -> Tensor`` giving one raw score per neuron
(Torch-Pruning's ``Importance`` is the model: a callable on what gets pruned). Criteria that
need gradients (Taylor) also have ``accumulate(layout)`` (called after each backward pass at
the unperturbed weights), ``reset(layout)`` (after a removal) and ``state_dict`` /
``load_state_dict``. A plain function ``layout -> Tensor`` is accepted wherever a criterion is.

Adding a criterion is one registration::

    @register_criterion("my_criterion")
    def my_scores(layout: NeuronLayout) -> Tensor: ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from adasap.errors import UserError
from adasap.method.neurons import NeuronLayout, ParamSlice
from adasap.registry import Registry

ScoreNormalization = Literal["mean", "max", "none"]
# The criterion when none is named: first-order Taylor scores beat weight magnitude for sgd,
# sam and adasap alike in the validation sweeps (docs/tuning.md, "The radii sweep").
DEFAULT_CRITERION = "taylor"


@runtime_checkable
class Importance(Protocol):
    """Scores every neuron of a layout; higher means more important (kept longer)."""

    def __call__(self, layout: NeuronLayout) -> Tensor: ...


@runtime_checkable
class GradientImportance(Importance, Protocol):
    """An importance that accumulates gradient information between removals."""

    def accumulate(self, layout: NeuronLayout) -> None: ...

    def reset(self, layout: NeuronLayout) -> None: ...

    @property
    def ready(self) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


_CRITERIA: Registry[Callable[..., Importance]] = Registry("criterion")


def register_criterion(name: str) -> Callable[[Callable], Callable]:
    """Register a criterion under ``name``: a scoring function, or a class built with options."""
    return _CRITERIA.register(name)


def criteria() -> tuple[str, ...]:
    """The names of the registered criteria."""
    return _CRITERIA.names()


def make_importance(criterion: str | Importance, **options: Any) -> Importance:
    """An importance from a registered name (with its options) or a user's callable as it is.

    Options a criterion does not take are ignored, so one settings object serves all.
    """
    if not isinstance(criterion, str):
        if not callable(criterion):
            raise UserError(
                f"criterion must be a name ({', '.join(_CRITERIA)}) or a callable "
                f"layout -> scores, got {type(criterion).__name__}"
            )
        return criterion
    factory = _CRITERIA.get(criterion)
    if isinstance(factory, type):
        accepted = factory.__init__.__code__.co_varnames
        return factory(**{k: v for k, v in options.items() if k in accepted})
    return factory


def needs_gradients(importance: Importance) -> bool:
    return isinstance(importance, GradientImportance)


def _reduce_except(t: Tensor, dim: int) -> Tensor:
    dims = [d for d in range(t.dim()) if d != dim]
    return t.sum(dim=dims) if dims else t


def magnitude_scores(layout: NeuronLayout, p: int = 2) -> Tensor:
    """The L_p norm of all weights of each neuron's group slices (L2: the paper's default)."""
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    total = layout.scatter(lambda s: _reduce_except(s.param.detach().abs().pow(p), s.dim))
    return total.sqrt() if p == 2 else total


@register_criterion("magnitude")
def l2_scores(layout: NeuronLayout) -> Tensor:
    """L2 norm of each neuron's whole dependency group (the paper's default, AdaSAP_P)."""
    return magnitude_scores(layout, p=2)


@register_criterion("l1")
def l1_scores(layout: NeuronLayout) -> Tensor:
    """L1 norm of each neuron's whole dependency group."""
    return magnitude_scores(layout, p=1)


@register_criterion("bn_scale")
def bn_scale_scores(layout: NeuronLayout) -> Tensor:
    """|gamma| of each neuron's BatchNorm entries; groups without BatchNorm fall back to L2."""

    def gamma(s: ParamSlice) -> Tensor | None:
        if isinstance(s.module, nn.modules.batchnorm._BatchNorm) and s.attr == "weight":
            return s.param.detach().abs()
        return None

    scores = layout.scatter(gamma)
    fallback = magnitude_scores(layout)
    for group in layout.groups:
        if not group.has_bn:
            span = slice(group.offset, group.offset + group.size)
            scores[span] = fallback[span]
    return scores


@register_criterion("taylor")
class TaylorImportance:
    """First-order Taylor importance ``|sum over the group of w * dL/dw|``, averaged over batches.

    Call :meth:`accumulate` after each backward pass at the unperturbed weights.
    ``taylor_form="bn"`` is HALP's BatchNorm form ``|gamma dL/dgamma + beta dL/dbeta|``; groups
    without BatchNorm use the full group form.
    """

    def __init__(self, taylor_form: Literal["group", "bn"] = "group") -> None:
        if taylor_form not in ("group", "bn"):
            raise ValueError(f"taylor_form must be 'group' or 'bn', got {taylor_form!r}")
        self.form = taylor_form
        self.total: Tensor | None = None
        self.batches = 0
        # set by Pruner.distribute: averages each batch's contribution over the ranks, so the
        # scores are those of the global batch and the same on every rank
        self.reduce: Callable[[Tensor], Tensor] | None = None

    @property
    def ready(self) -> bool:
        return self.batches > 0

    def reset(self, layout: NeuronLayout) -> None:
        self.total = torch.zeros(layout.num_neurons)
        self.batches = 0

    @staticmethod
    def _contribution(s: ParamSlice, bn_only: bool) -> Tensor | None:
        p = s.param
        if p.grad is None:
            return None
        if bn_only and not isinstance(s.module, nn.modules.batchnorm._BatchNorm):
            return None
        return _reduce_except(p.detach() * p.grad.detach(), s.dim)

    @torch.no_grad()
    def accumulate(self, layout: NeuronLayout) -> None:
        if self.total is None or self.total.numel() != layout.num_neurons:
            self.reset(layout)
        full = layout.scatter(lambda s: self._contribution(s, bn_only=False))
        if self.form == "bn":
            bn = layout.scatter(lambda s: self._contribution(s, bn_only=True))
            bn_groups = torch.zeros(layout.num_neurons, dtype=torch.bool)
            for g in layout.groups:
                bn_groups[g.offset : g.offset + g.size] = g.has_bn
            full = torch.where(bn_groups, bn, full)
        if self.reduce is not None:
            full = self.reduce(full)
        self.total += full.abs()
        self.batches += 1

    def __call__(self, layout: NeuronLayout) -> Tensor:
        if not self.ready:
            raise ValueError("taylor scores need gradients: accumulate at least one batch first")
        return self.total / self.batches

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.batches = state["total"], state["batches"]


def normalize_scores(
    scores: Tensor, layout: NeuronLayout, how: ScoreNormalization = "mean"
) -> Tensor:
    """Make scores comparable across groups before they are ranked globally.

    ``"mean"`` divides each group's scores by their mean (Torch-Pruning's default normaliser),
    ``"max"`` by their maximum, ``"none"`` leaves them as they are.
    """
    if how == "none":
        return scores.clone()
    if how not in ("mean", "max"):
        raise ValueError(f"normalization must be 'mean', 'max' or 'none', got {how!r}")
    index = layout.group_index()
    count = len(layout.groups)
    if how == "mean":
        sums = torch.zeros(count).index_add_(0, index, scores)
        scale = sums / torch.bincount(index, minlength=count).clamp(min=1)
    else:
        scale = torch.full((count,), -torch.inf).scatter_reduce(0, index, scores, "amax")
    return scores / (scale[index] + 1e-12)


def radii_from_scores(
    scores: Tensor,
    rho_min: float,
    rho_max: float,
    group_index: Tensor | None = None,
) -> Tensor:
    """``rho_i = rho_max - (s_i - s_min) / (s_max - s_min) * (rho_max - rho_min)``.

    The least important neuron gets ``rho_max``, the most important ``rho_min``. With
    ``group_index`` the min and max are taken per group instead of over the whole network.
    Where all scores are equal, every neuron gets the midpoint.
    """
    if group_index is None:
        group_index = torch.zeros(scores.numel(), dtype=torch.long)
    count = int(group_index.max()) + 1 if scores.numel() else 0
    lows = torch.full((count,), torch.inf).scatter_reduce(0, group_index, scores, "amin")
    highs = torch.full((count,), -torch.inf).scatter_reduce(0, group_index, scores, "amax")
    low, span = lows[group_index], (highs - lows)[group_index]
    fraction = torch.where(span > 0, (scores - low) / span.clamp(min=1e-30), 0.5)
    return rho_max - fraction * (rho_max - rho_min)


def check_scores(scores: Tensor, layout: NeuronLayout) -> Tensor:
    """A user's criterion must give one finite score per neuron."""
    if not isinstance(scores, Tensor) or scores.shape != (layout.num_neurons,):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise UserError(
            f"the criterion returned {shape}, not one score per neuron ({layout.num_neurons},): "
            "return a 1-D tensor indexed like layout.groups (see NeuronLayout.scatter)"
        )
    if not torch.isfinite(scores).all():
        raise UserError("the criterion returned non-finite scores: return finite numbers")
    return scores.detach().float().cpu()
