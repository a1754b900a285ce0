"""The settings of a pruning run (``adasap run``, ``adasap.prune``), validated in one place."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from adasap.devices import check_amp, resolve_device
from adasap.distributed import is_distributed
from adasap.errors import UserError
from adasap.method.base_optimizer import base_optimizer_class
from adasap.method.importance import DEFAULT_CRITERION, criteria
from adasap.method.pruner import METHODS, PrunerSettings
from adasap.settings import check_field_types
from adasap.training.loop import OptimizerSettings


@dataclass(frozen=True)
class PruneSettings:
    """Everything that defines a pruning run; the defaults are the documented choices.

    Epoch counts may be fractional (a reduced setting trains on part of an epoch).
    """

    method: str = "adasap"
    criterion: str = DEFAULT_CRITERION
    keep: float = 0.5
    keep_kind: str = "params"
    warmup_epochs: float = 1.0
    prune_epochs: float = 2.0
    finetune_epochs: float = 2.0
    prune_steps: int = 4
    batch_size: int = 128
    label_smoothing: float = 0.1
    lr_warmup_epochs: float = 0.2
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    score_refresh: int = 10
    score_normalization: str = "mean"
    per_layer_radii: bool = False
    taylor_form: str = "group"
    min_channels: int = 1
    round_to: int = 1
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False

    def validate(self) -> PruneSettings:
        """Raise :class:`UserError` naming the first bad value and what is allowed."""
        check_field_types(self)
        check_field_types(self.optimizer)
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.criterion not in criteria():
            raise UserError(
                f"unknown criterion {self.criterion!r}: choose one of {', '.join(criteria())}"
            )
        if not 0 < self.keep <= 1:
            raise UserError(f"keep fraction must be in (0, 1], got {self.keep}: e.g. --keep 0.5")
        if self.keep_kind not in ("params", "macs", "latency"):
            raise UserError(f"keep kind must be params, macs or latency, got {self.keep_kind!r}")
        for name in ("warmup_epochs", "prune_epochs", "finetune_epochs", "lr_warmup_epochs"):
            if getattr(self, name) < 0:
                raise UserError(
                    f"{name} must be >= 0, got {getattr(self, name)}: e.g. {name}=1 (epochs)"
                )
        for name in ("prune_steps", "batch_size", "score_refresh", "min_channels", "round_to"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}: e.g. {name}=1")
        if self.score_normalization not in ("mean", "max", "none"):
            raise UserError(
                f"score normalization must be mean, max or none, got {self.score_normalization!r}"
            )
        if self.taylor_form not in ("group", "bn"):
            raise UserError(f"taylor form must be 'group' or 'bn', got {self.taylor_form!r}")
        o = self.optimizer
        if o.lr <= 0 or o.rho < 0 or not 0 <= o.rho_min <= o.rho_max:
            raise UserError(
                f"need lr > 0, rho >= 0 and 0 <= rho_min <= rho_max; got lr={o.lr}, rho={o.rho}, "
                f"rho_min={o.rho_min}, rho_max={o.rho_max}"
            )
        if o.normalization not in ("global", "neuron"):
            raise UserError(
                f"perturbation normalization must be global or neuron, got {o.normalization!r}"
            )
        check_amp(self.amp)
        base_optimizer_class(o.base_optimizer)
        if is_distributed() and (self.compile or self.keep_kind == "latency"):
            raise UserError(
                "compile and keep kind latency do not run under torchrun yet: "
                "leave them off, or run in one process"
            )
        if self.sync_bn and is_distributed() and resolve_device(self.device).type != "cuda":
            raise UserError(
                "sync_bn needs CUDA: SyncBatchNorm runs on GPUs only, not on the CPU (Gloo); "
                "drop --sync-bn, or run on GPUs"
            )
        pruner_settings(self)  # the method's own checks (the cheaper sharpness-aware steps)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def with_overrides(settings: PruneSettings, overrides: dict[str, Any]) -> PruneSettings:
    """Replace fields of ``settings`` or of its ``optimizer`` (lr, rho, ...) by name."""
    optimizer_fields = {f.name for f in fields(OptimizerSettings)}
    own_fields = {f.name for f in fields(PruneSettings)}
    unknown = sorted(set(overrides) - optimizer_fields - own_fields)
    if unknown:
        allowed = sorted(optimizer_fields | own_fields)
        raise UserError(
            f"unknown setting(s) {', '.join(unknown)}: allowed are {', '.join(allowed)}"
        )
    optimizer = replace(
        settings.optimizer, **{k: v for k, v in overrides.items() if k in optimizer_fields}
    )
    own = {k: v for k, v in overrides.items() if k in own_fields and k != "optimizer"}
    return replace(settings, optimizer=optimizer, **own)


def pruner_settings(settings: PruneSettings) -> PrunerSettings:
    """The method's knobs of a run, as the :class:`~adasap.method.pruner.Pruner` takes them."""
    s, o = settings, settings.optimizer
    return PrunerSettings(
        keep_kind="macs" if s.keep_kind == "macs" else "params",
        rho=o.rho,
        rho_min=o.rho_min,
        rho_max=o.rho_max,
        normalization=o.normalization,
        asam=o.asam,
        finetune_sharpness=o.finetune_sharpness,
        finetune_rho=o.finetune_rho,
        max_grad_norm=o.max_grad_norm,
        score_refresh=s.score_refresh,
        score_normalization=s.score_normalization,
        per_layer_radii=s.per_layer_radii,
        taylor_form=s.taylor_form,
        min_channels=s.min_channels,
        round_to=s.round_to,
        sam_probability=o.sam_probability,
        sam_probability_end=o.sam_probability_end,
        sam_every=o.sam_every,
        looksam_alpha=o.looksam_alpha,
        ascent_fraction=o.ascent_fraction,
        sync_ascent=o.sync_ascent,
        seed=s.seed,
    )


def base_optimizer(settings: OptimizerSettings) -> tuple[type, dict[str, Any]]:
    """The base optimizer class and its arguments (momentum only where the class takes it)."""
    cls = base_optimizer_class(settings.base_optimizer)
    kwargs: dict[str, Any] = {"lr": settings.lr, "weight_decay": settings.weight_decay}
    if "momentum" in inspect.signature(cls).parameters:
        kwargs["momentum"] = settings.momentum
    return cls, kwargs
