"""The :class:`~adasap.method.pruner.Pruner`'s settings and methods, validated when made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from adasap.alignment import DEFAULT_RUNTIME, RoundTo, check_rounding
from adasap.method.base_optimizer import (
    DEFAULT_RADIUS,
    OptimizerKind,
    check_finetune_settings,
)
from adasap.method.cheap_sam import check_cheap_settings
from adasap.method.distillation import check_distillation
from adasap.method.effort import (
    DEFAULT_MEMORY_GIB,
    DEFAULT_SECONDS,
    EffortBudget,
    check_budget,
)
from adasap.settings import check_field_types

# Settings that bound the work of pruning, never its result: what a resumed run or a results
# folder must match leaves them out, so raising a budget continues the same run.
EFFORT_SETTINGS = ("trace_seconds", "trace_memory_gib")

# The optimizer in phases 1-2 (warm-up and removal), then in phase 3 (fine-tuning); "sgd"
# means the base optimizer alone, whatever its class.
METHODS: dict[str, tuple[OptimizerKind, OptimizerKind]] = {
    "adasap": ("adasap", "sam"),
    "sam": ("sam", "sam"),
    "sgd": ("sgd", "sgd"),
    "adasap-sgd": ("adasap", "sgd"),
    "sgd-sam": ("sgd", "sam"),
}


@dataclass(frozen=True)
class PrunerSettings:
    """The method's scalar knobs; the defaults are the documented choices (docs/method.md).

    A run's settings hold them as one section (``PruneSettings.pruner``), so a new field here
    is a new config key and flag name of ``adasap run`` with no other edit.
    """

    keep_kind: Literal["params", "macs"] = "macs"  # params gave no speed (docs/method.md)
    # chosen on validation data by `adasap sweep` (docs/tuning.md)
    rho: float = DEFAULT_RADIUS["sam"]
    rho_min: float = 0.05
    rho_max: float = 0.1
    normalization: Literal["global", "neuron", "neuron-scaled"] = "global"
    asam: bool = False
    # Phase 3 of a method whose phase 3 is sharpness-aware (adasap, sam, sgd-sam): SAM, ASAM
    # or None (as phases 1-2), and its radius (None: base_optimizer.phase_sharpness).
    finetune_sharpness: Literal["sam", "asam"] | None = "asam"
    finetune_rho: float | None = None
    max_grad_norm: float | None = None
    score_refresh: int = 10
    score_normalization: Literal["mean", "max", "none"] = "mean"
    per_layer_radii: bool = False
    taylor_form: Literal["group", "bn"] = "group"
    min_channels: int = 1
    runtime: str = DEFAULT_RUNTIME  # where the pruned model will run (adasap.alignment) ...
    round_to: RoundTo = "auto"  # ... and its kernels' channel multiple there (1: any count)
    # Cheaper sharpness-aware steps (adasap.method.cheap_sam, docs/performance.md); the
    # defaults make every step of a SAM/AdaSAP phase a full two-pass step.
    sam_probability: float = 1.0  # RST: chance that a step is sharpness-aware ...
    sam_probability_end: float | None = None  # ... moving linearly to this over training
    sam_every: int = 1  # LookSAM: the ascent runs every k-th step ...
    looksam_alpha: float = 0.7  # ... and the steps between add alpha * the stored direction
    ascent_fraction: float = 1.0  # the first (ascent) pass on this fraction of the batch
    seed: int = 0  # of the pruner's own draws (which steps are sharpness-aware)
    sync_ascent: bool = False  # under DDP: average the ascent gradient too (docs/distributed.md)
    # Distillation from the dense model (adasap.method.distillation, docs/method.md): the
    # teacher's share of the loss (0: off, the step as without it), its temperature, and the
    # first phase distilled (the phases from it to the end are).
    distill_weight: float = 0.0
    distill_temperature: float = 4.0
    distill_from: Literal["warmup", "prune", "finetune"] = "prune"
    # The effort of each trace and dependency-group search (adasap.method.effort): past this
    # time, or this growth of the process's resident memory, a UserError names the layer whose
    # search ran over (Torch-Pruning ran for 10+ minutes on swin_t). None: no limit.
    trace_seconds: float | None = DEFAULT_SECONDS
    trace_memory_gib: float | None = DEFAULT_MEMORY_GIB

    def __post_init__(self) -> None:
        check_field_types(self)  # the Literal fields by value
        check_rounding(self.runtime, self.round_to)
        check_cheap_settings(self)
        check_finetune_settings(self)
        check_distillation(self.distill_weight, self.distill_temperature)
        check_budget(self.trace_seconds, self.trace_memory_gib)

    @property
    def trace_budget(self) -> EffortBudget:
        return EffortBudget(self.trace_seconds, self.trace_memory_gib)
