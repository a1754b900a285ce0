"""Tuning-sweep presets (:func:`adasap.experiments.sweep.run_sweep`): a base flat config and
grids whose cartesian products are run, as data; :func:`estimate_sweep_seconds` plans one.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adasap.experiments.config import from_flat
from adasap.experiments.presets import (
    EVAL_RATE,
    SAM_RATE,
    SGD_RATE,
    SMALL_BASE,
    dense_seconds,
    pruning_seconds,
    training_images,
)
from adasap.robustness.corruptions import CBAR_CORRUPTIONS, EXTRA_CORRUPTIONS


def sweep_settings(
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]],
) -> list[dict[str, Any]]:
    """Every combination of one grid, or of each grid in a list, in order."""
    grids = [grid] if isinstance(grid, Mapping) else list(grid)
    combos = []
    for g in grids:
        keys = list(g)
        combos += [
            dict(zip(keys, values, strict=True)) for values in itertools.product(*g.values())
        ]
    return combos


@dataclass(frozen=True)
class SweepPreset:
    """A tuning sweep: a base flat config and grids whose cartesian products are run."""

    name: str
    description: str
    base: Mapping[str, Any]
    grid: tuple[Mapping[str, Sequence[Any]], ...]


KEEP_HALF = {**SMALL_BASE, "keep": 0.5, "criterion": "magnitude", "seed": 0}
# The sweeps run before the `finetune` sweep set phase 3's default (ASAM), as they were run:
# phase 3 perturbs as phases 1-2 (SAM at rho). The `finetune` sweeps ran on it too: their
# adasap and sam runs set phase 3 themselves and sgd's does not perturb, so only their saved
# definition (which a rerun re-ranking the folder must match) depends on it.
BEFORE_ASAM = {**KEEP_HALF, "finetune_sharpness": None}
CRITERIA = ["magnitude", "taylor"]
# The sweeps of issue #30, ranked with the clean constraint (adasap.experiments.sweep.rank):
# the `small` base at the defaults the sweeps above chose (Taylor scores, phase-3 ASAM 2.0,
# set here so that a later change of default leaves these folders resumable). Each of them
# runs its sgd reference at the base's settings: the same run in all.
CHOSEN = {**KEEP_HALF, "criterion": "taylor", "finetune_sharpness": "asam", "finetune_rho": 2.0}

SWEEP_PRESETS: dict[str, SweepPreset] = {
    "small": SweepPreset(
        name="small",
        description="Defaults for small images (about 50 minutes on 2 CPU cores): the small "
        "benchmark's setting at keep 50% with magnitude scores and seed 0; AdaSAP's radii "
        "rho_max x rho_min (8 runs), then the uniform radius rho of SAM, which is also "
        "AdaSAP's phase 3 (3 runs). Scored on the 1000 validation images under the held-out "
        "cbar corruptions and the 4 extras, ranked by their mean (the time was measured when "
        "only the 4 extras were scored).",
        base=BEFORE_ASAM,
        grid=(
            {"methods": [["adasap"]], "rho_max": [0.1, 0.2, 0.5, 1.0], "rho_min": [0.01, 0.05]},
            {"methods": [["sam"]], "rho": [0.02, 0.05, 0.1]},
        ),
    ),
    "small-schedule": SweepPreset(
        name="small-schedule",
        description="AdaSAP's other choices at the radii the `small` sweep chose (about 40 "
        "minutes on 2 CPU cores): the defaults and sgd for reference; per-neuron instead of "
        "global perturbation normalisation; per-layer radii; max or no score normalisation; "
        "radii refreshed every step or every 50; the 10 epochs split 1/2/7 or 4/3/3 instead "
        "of 2/3/5. Same base and scoring as `small`.",
        base=BEFORE_ASAM,
        grid=(
            {"methods": [["adasap", "sgd"]]},
            {"methods": [["adasap"]], "normalization": ["neuron"]},
            {"methods": [["adasap"]], "per_layer_radii": [True]},
            {"methods": [["adasap"]], "score_normalization": ["max", "none"]},
            {"methods": [["adasap"]], "score_refresh": [1, 50]},
            {
                "methods": [["adasap"]],
                "warmup_epochs": [1.0],
                "prune_epochs": [2.0],
                "finetune_epochs": [7.0],
            },
            {
                "methods": [["adasap"]],
                "warmup_epochs": [4.0],
                "prune_epochs": [3.0],
                "finetune_epochs": [3.0],
            },
        ),
    ),
    "radii": SweepPreset(
        name="radii",
        description="AdaSAP's radii tuned separately for magnitude and for Taylor scores, with "
        "the sgd and sam baselines at both criteria (planned, docs/tuning.md): the `small` "
        "sweep's base; rho_max in 0.05..0.5 x rho_min 0.01/0.05 per criterion (rho_min = "
        "rho_max = 0.05 is uniform SAM in phases 1-2), sgd, and SAM's rho 0.02/0.05/0.1.",
        base=BEFORE_ASAM,
        grid=(
            {
                "methods": [["adasap"]],
                "criterion": CRITERIA,
                "rho_max": [0.05, 0.1, 0.2, 0.5],
                "rho_min": [0.01, 0.05],
            },
            {"methods": [["sgd"]], "criterion": CRITERIA},
            {"methods": [["sam"]], "criterion": CRITERIA, "rho": [0.02, 0.05, 0.1]},
        ),  # fmt: skip
    ),
    "finetune": SweepPreset(
        name="finetune",
        description="Phase 3 (fine-tuning) with ASAM at its own radius beside SAM, for adasap "
        "and the sam baseline alike, at both criteria (planned, docs/tuning.md): the `small` "
        "sweep's base; ASAM finetune_rho 0.2/0.5/1/2 (ASAM's radius is ~10x SAM's), SAM "
        "finetune_rho 0.02/0.05/0.1; sgd at both criteria for reference.",
        base=BEFORE_ASAM,
        grid=(
            {
                "methods": [["adasap", "sam"]],
                "criterion": CRITERIA,
                "finetune_sharpness": ["asam"],
                "finetune_rho": [0.2, 0.5, 1.0, 2.0],
            },
            {
                "methods": [["adasap", "sam"]],
                "criterion": CRITERIA,
                "finetune_sharpness": ["sam"],
                "finetune_rho": [0.02, 0.05, 0.1],
            },
            {"methods": [["sgd"]], "criterion": CRITERIA},
        ),  # fmt: skip
    ),
    "finetune-wide": SweepPreset(
        name="finetune-wide",
        description="Phase-3 ASAM beyond the `finetune` grid's edge, whose best radius was its "
        "largest (2.0): finetune_rho 3 and 4 for adasap and the sam baseline at Taylor scores, "
        "the default criterion; the `small` sweep's base otherwise.",
        base=BEFORE_ASAM,
        grid=(
            {
                "methods": [["adasap", "sam"]],
                "criterion": ["taylor"],
                "finetune_sharpness": ["asam"],
                "finetune_rho": [3.0, 4.0],
            },
        ),  # fmt: skip
    ),
    "long": SweepPreset(
        name="long",
        description="3x the fine-tuning (15 epochs instead of 5) beside the current 5, for sgd, "
        "sam and adasap at both criteria, at the defaults the `radii` and `finetune` sweeps "
        "chose (phase 3 of sam and adasap: ASAM); the `small` sweep's base otherwise.",
        base=KEEP_HALF,
        grid=(
            {
                "methods": [["sgd", "sam", "adasap"]],
                "criterion": CRITERIA,
                "finetune_epochs": [5.0, 15.0],
            },
        ),  # fmt: skip
    ),
    "distill": SweepPreset(
        name="distill",
        description="Distillation from the dense model (phases 2-3) for adasap and the sgd "
        "reference alike, ranked with the clean constraint (issue #30): distill_weight 0.5/0.9 "
        "x distill_temperature 2/4, and neither distilled; Taylor scores, phase-3 ASAM 2.0, "
        "the `small` sweep's base otherwise. Every run is held to sgd at its best recipe, "
        "distilled or not.",
        base=CHOSEN,
        grid=(
            {"methods": [["sgd", "adasap"]]},
            {
                "methods": [["sgd", "adasap"]],
                "distill_weight": [0.5, 0.9],
                "distill_temperature": [2.0, 4.0],
            },
        ),  # fmt: skip
    ),
    "finetune-clean": SweepPreset(
        name="finetune-clean",
        description="Phase 3's ASAM radius for adasap ranked with the clean constraint (issue "
        "#30): finetune_rho 0.05 to 2 (the default), down to plain fine-tuning (adasap-sgd), "
        "beside the sgd reference; Taylor scores, the `small` sweep's base otherwise.",
        base=CHOSEN,
        grid=(
            {"methods": [["sgd", "adasap-sgd"]]},
            {"methods": [["adasap"]], "finetune_rho": [0.05, 0.1, 0.2, 0.5, 1.0, 2.0]},
        ),  # fmt: skip
    ),
    "neuron-scaled": SweepPreset(
        name="neuron-scaled",
        description="AdaSAP's per-neuron perturbation scaled to the global form's norm "
        "(normalization neuron-scaled) beside the global form, at rho_max 0.1/0.2/0.5 "
        "(rho_min 0.05), ranked with the clean constraint (issue #30), with the sgd "
        "reference; Taylor scores, phase-3 ASAM 2.0, the `small` sweep's base otherwise.",
        base=CHOSEN,
        grid=(
            {"methods": [["sgd"]]},
            {
                "methods": [["adasap"]],
                "normalization": ["global", "neuron-scaled"],
                "rho_max": [0.1, 0.2, 0.5],
            },
        ),  # fmt: skip
    ),
}


def estimate_sweep_seconds(
    preset: SweepPreset,
    *,
    sgd_rate: float = SGD_RATE,
    sam_rate: float = SAM_RATE,
    eval_rate: float = EVAL_RATE,
) -> float:
    """A planning estimate of a sweep's serial wall time, by the throughputs of
    :func:`~adasap.experiments.presets.estimate_seconds`: each seed's dense model (trained
    once, or reused from the cache), every run's pruning, and its scoring on the validation
    images, clean and under the cbar and extra corruptions x 5 severities."""
    base = from_flat(preset.base)
    rates = (sgd_rate, sam_rate, eval_rate)
    tuning = len(CBAR_CORRUPTIONS) + len(EXTRA_CORRUPTIONS)
    total, seeds = 0.0, set()
    for settings in sweep_settings(preset.grid):
        config = from_flat(settings, base).validate()
        train = training_images(config)
        if config.prune.seed not in seeds:
            seeds.add(config.prune.seed)
            total += dense_seconds(config, train, *rates)
        val_images = config.train_limit - train
        for method in config.methods:
            total += pruning_seconds(config, method, train, *rates)
            total += val_images * (1 + 5 * tuning) / eval_rate
    return total
