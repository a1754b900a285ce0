"""The settings of a pruning run (``adasap run``, ``adasap.prune``), validated in one place."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from adasap.devices import check_amp, resolve_device
from adasap.distributed import is_distributed
from adasap.errors import UserError, quote
from adasap.method.base_optimizer import base_optimizer_class
from adasap.method.importance import DEFAULT_CRITERION, criteria
from adasap.method.pruner import METHODS, PrunerSettings
from adasap.method.pruner_settings import EFFORT_SETTINGS
from adasap.settings import check_field_types, flat_schema, replace_flat, section, to_flat
from adasap.training.loop import OptimizerSettings

# The run's own keep_kind and seed are also the pruner's, so the pruner section's are not keys.
_RUN_SETS = ("keep_kind", "seed")


@dataclass(frozen=True)
class PruneSettings:
    """Everything that defines a pruning run; the defaults are the documented choices.

    Epoch counts may be fractional (a reduced setting trains on part of an epoch). ``pruner``
    is what the :class:`~adasap.method.pruner.Pruner` takes, its ``keep_kind`` and ``seed``
    set from the run's.
    """

    method: str = "adasap"
    criterion: str = DEFAULT_CRITERION
    keep: float = 0.5
    keep_kind: Literal["params", "macs", "latency"] = "macs"  # params gave no speed (pruner)
    warmup_epochs: float = 1.0
    prune_epochs: float = 2.0
    finetune_epochs: float = 2.0
    prune_steps: int = 4
    batch_size: int = 128
    label_smoothing: float = 0.1
    lr_warmup_epochs: float = 0.2
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    pruner: PrunerSettings = section(PrunerSettings, omit=_RUN_SETS)
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pruner, PrunerSettings):
            return  # validate() names the wrong type
        # a latency budget is the pipeline's LatencyTarget: the pruner's own kind goes unused
        kind = "macs" if self.keep_kind == "macs" else "params"
        pruner = replace(self.pruner, keep_kind=kind, seed=self.seed)
        object.__setattr__(self, "pruner", pruner)  # frozen: set once, here

    def validate(self) -> PruneSettings:
        """Raise :class:`UserError` naming the first bad value and what is allowed (the
        pruner's own checks ran when it was built)."""
        check_field_types(self)
        if not 0 <= self.seed < 2**32:  # a generator's seed, also scaled per epoch
            raise UserError(f"seed must be in 0..{2**32 - 1}, got {self.seed:.3g}: e.g. --seed 0")
        if self.method not in METHODS:
            raise UserError(
                f"unknown method {quote(self.method)}: choose one of {', '.join(METHODS)}"
            )
        if self.criterion not in criteria():
            raise UserError(
                f"unknown criterion {quote(self.criterion)}: choose one of {', '.join(criteria())}"
            )
        if not 0 < self.keep <= 1:
            raise UserError(f"keep fraction must be in (0, 1], got {self.keep}: e.g. --keep 0.5")
        flat = to_flat(self)
        for name in ("warmup_epochs", "prune_epochs", "finetune_epochs", "lr_warmup_epochs"):
            if flat[name] < 0:
                raise UserError(f"{name} must be >= 0, got {flat[name]}: e.g. {name}=1 (epochs)")
        for name in ("prune_steps", "batch_size", "score_refresh", "min_channels"):
            if flat[name] < 1:
                raise UserError(f"{name} must be >= 1, got {flat[name]}: e.g. {name}=1")
        o, p = self.optimizer, self.pruner
        if o.lr <= 0 or p.rho < 0 or not 0 <= p.rho_min <= p.rho_max:
            raise UserError(
                f"need lr > 0, rho >= 0 and 0 <= rho_min <= rho_max; got lr={o.lr}, rho={p.rho}, "
                f"rho_min={p.rho_min}, rho_max={p.rho_max}"
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
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """:meth:`to_dict` less the settings that change no result (``EFFORT_SETTINGS``): what
        a checkpoint must have been written under to be resumed."""
        data = self.to_dict()
        data["pruner"] = {k: v for k, v in data["pruner"].items() if k not in EFFORT_SETTINGS}
        return data


def with_overrides(settings: PruneSettings, overrides: dict[str, Any]) -> PruneSettings:
    """Replace fields of ``settings`` at any depth by their flat names (keep, lr, rho_max ...)."""
    allowed = flat_schema(PruneSettings)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise UserError(
            f"unknown setting(s) {', '.join(unknown)}: allowed are {', '.join(sorted(allowed))}"
        )
    return replace_flat(settings, overrides)


def base_optimizer(settings: OptimizerSettings) -> tuple[type, dict[str, Any]]:
    """The base optimizer class and its arguments (momentum only where the class takes it)."""
    cls = base_optimizer_class(settings.base_optimizer)
    kwargs: dict[str, Any] = {"lr": settings.lr, "weight_decay": settings.weight_decay}
    if "momentum" in inspect.signature(cls).parameters:
        kwargs["momentum"] = settings.momentum
    return cls, kwargs
