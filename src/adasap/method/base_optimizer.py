"""The user's base optimizer, kept by parameter name so it can be rebuilt after a removal.

Removal replaces parameter tensors, so the pruner keeps the base optimizer as a class, its
keyword arguments and its parameter groups by name, and builds it again (wrapped in SAM or
AdaSAP as the phase needs) for the current parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from adasap.errors import UserError, quote
from adasap.method.optim import SAM, AdaSAP

OptimizerKind = Literal["sgd", "sam", "adasap"]
# A sharpness-aware kind's radius where none is given, chosen on validation data
# (docs/tuning.md): SAM's by the `small` sweep, phase-3 ASAM's by the `finetune` sweeps.
DEFAULT_RADIUS: dict[str, float] = {"sam": 0.05, "asam": 2.0}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: BatchNorm parameters and biases (1-D tensors) get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# torch.optim classes whose step adasap's training loop cannot make: why, for the message
UNDRIVABLE: dict[str, str] = {
    "lbfgs": "its step needs a closure that re-evaluates the model",
    "sparseadam": "it takes only sparse gradients",
}


def base_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """A ``torch.optim`` class by case-insensitive name (``sgd``, ``adamw``, ``rmsprop`` ...)."""
    classes = {
        n.lower(): c
        for n, c in vars(torch.optim).items()
        if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and n != "Optimizer"
    }
    choices = ", ".join(sorted(set(classes) - set(UNDRIVABLE)))
    if name.lower() in UNDRIVABLE:
        raise UserError(
            f"optimizer {name!r} cannot be used as adasap's base optimizer "
            f"({UNDRIVABLE[name.lower()]}): choose one of {choices}"
        )
    if name.lower() not in classes:
        raise UserError(f"unknown optimizer {quote(name)}: choose one of {choices}")
    return classes[name.lower()]


def check_finetune_settings(settings: Any) -> None:
    """Raise :class:`UserError` for a negative ``finetune_rho`` (its type and
    ``finetune_sharpness``: :class:`~adasap.method.pruner.PrunerSettings` checks them first)."""
    rho = settings.finetune_rho
    if rho is not None and rho < 0:
        raise UserError(f"finetune_rho must be a number >= 0 or none (rho), got {rho!r}: e.g. 0.5")


def phase_sharpness(settings: Any, finetuning: bool) -> tuple[float, bool]:
    """The uniform radius and whether the perturbation is ASAM's, in phases 1-2 or in phase 3
    (``finetune_sharpness`` where set; ``finetune_rho`` where set, else ``rho`` when phase 3
    perturbs as phases 1-2 do, else :data:`DEFAULT_RADIUS` of phase 3's kind)."""
    s = settings
    if not finetuning:
        return s.rho, s.asam
    asam = s.asam if s.finetune_sharpness is None else s.finetune_sharpness == "asam"
    if s.finetune_rho is not None:
        return s.finetune_rho, asam
    # ASAM's radius is on another scale than SAM's (~40x here), so rho only carries over to a
    # phase 3 of the same kind
    return (s.rho if asam == s.asam else DEFAULT_RADIUS["asam" if asam else "sam"]), asam


def finetune_differs(settings: Any) -> bool:
    """Whether phase 3's sharpness-aware optimizer differs from phases 1-2's."""
    return phase_sharpness(settings, True) != phase_sharpness(settings, False)


def base_of(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that makes the update (schedulers watch its ``step``)."""
    return optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer


@dataclass(frozen=True)
class BaseOptimizer:
    """A base optimizer class, its arguments, and its parameter groups by parameter name."""

    cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any]
    groups: tuple[tuple[dict[str, Any], tuple[str, ...]], ...]

    @classmethod
    def of(
        cls,
        model: nn.Module,
        optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        kwargs: Mapping[str, Any] | None = None,
    ) -> BaseOptimizer:
        """From a class and its arguments (no weight decay on 1-D parameters), or from a built
        optimizer (its class, defaults and parameter groups)."""
        if isinstance(optimizer, torch.optim.Optimizer):
            if isinstance(optimizer, SAM) or kwargs:
                raise UserError(
                    "pass a base optimizer (not SAM/AdaSAP) either built or as a class with "
                    "optimizer_kwargs, not both: the pruner adds the sharpness-aware part"
                )
            base, kwargs, groups = type(optimizer), dict(optimizer.defaults), optimizer.param_groups
        elif isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
            if issubclass(optimizer, SAM):
                raise UserError("pass the base optimizer class (e.g. torch.optim.SGD), not SAM")
            base, kwargs = optimizer, dict(kwargs or {})
            accepted = inspect.signature(base).parameters
            unknown = sorted(set(kwargs) - set(accepted))
            if unknown:
                raise UserError(
                    f"{base.__name__} does not take {', '.join(unknown)}: pass only its own "
                    f"arguments ({', '.join(n for n in accepted if n != 'params')})"
                )
            groups = parameter_groups(model, kwargs.get("weight_decay", 0.0))
        else:
            raise UserError(
                "optimizer must be a torch.optim class or optimizer, got "
                f"{type(optimizer).__name__}"
            )
        names = {p: n for n, p in model.named_parameters()}
        return cls(
            base,
            kwargs,
            tuple(
                (
                    {k: v for k, v in g.items() if k not in ("params", "initial_lr")},
                    tuple(names[p] for p in g["params"]),
                )
                for g in groups
            ),
        )

    def build(
        self, kind: OptimizerKind, model: nn.Module, sharpness: Any, finetuning: bool = False
    ) -> torch.optim.Optimizer:
        """The optimizer of ``kind`` for the model's current parameters.

        ``sharpness`` holds rho, rho_min, rho_max, normalization, asam, max_grad_norm and the
        finetune_* settings (a :class:`~adasap.method.pruner.PrunerSettings`); ``finetuning``
        builds phase 3's (:func:`phase_sharpness`).
        """
        names = dict(model.named_parameters())
        groups = [
            {**hyper, "params": [names[n] for n in members if n in names]}
            for hyper, members in self.groups
        ]
        if kind == "sgd":
            return self.cls(groups, **self.kwargs)
        s = sharpness
        rho, asam = phase_sharpness(s, finetuning)
        common = dict(adaptive=asam, max_grad_norm=s.max_grad_norm, **self.kwargs)
        if kind == "sam":
            return SAM(groups, self.cls, rho=rho, **common)
        return AdaSAP(groups, self.cls, s.rho_min, s.rho_max, s.normalization, **common)
