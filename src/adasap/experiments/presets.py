"""Benchmark presets: a base flat config (the keys of
:data:`adasap.experiments.config.SCHEMA`) and a grid, as data.

:data:`PRESETS` are the benchmark grids (:func:`adasap.experiments.bench.run_bench`);
:func:`estimate_seconds` plans a benchmark's wall time. The tuning sweeps are in
:mod:`adasap.experiments.sweep_presets`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from adasap.errors import UserError
from adasap.experiments.config import ExperimentConfig, from_flat
from adasap.method.pruner import METHODS
from adasap.robustness.corruptions import CORRUPTIONS

# Throughputs of a 2-core CPU on ResNet-20 at 28 px (images/s), for estimate_seconds().
SGD_RATE, SAM_RATE, EVAL_RATE = 700.0, 380.0, 2000.0
HVP_COST = 3.0  # a Hessian-vector product costs about 3 forward/backward passes (measured)
VAL_FRACTION = 0.1  # load_dataset's default validation split


@dataclass(frozen=True)
class Cell:
    """One run of the grid; ``method == "dense"`` is the seed's unpruned reference, and
    ``criterion`` None the base config's criterion (the detection grid's cells)."""

    method: str
    criterion: str | None
    keep: float
    seed: int

    @property
    def id(self) -> str:
        if self.method == "dense":
            return f"dense-seed{self.seed}"
        criterion = "" if self.criterion is None else f"{self.criterion}-"
        return f"{self.method}-{criterion}keep{self.keep:g}-seed{self.seed}"

    @property
    def reference(self) -> Cell:
        """The dense reference of the cell's seed."""
        return Cell("dense", None, 1.0, self.seed)


@dataclass(frozen=True)
class BenchPreset:
    """A benchmark: a base flat config and the grid (method, criterion) x keeps x seeds.

    ``pairs`` lists (method, criterion) combinations, since not every method runs with every
    criterion. A base with ``task: detection`` starts from the detection defaults
    (:mod:`adasap.experiments.detection_bench`). Sharpness (classification only) is measured
    on ``sharpness_batches`` fixed training batches of ``sharpness_batch_size`` images at the
    base config's ``rho``.
    """

    name: str
    description: str
    base: Mapping[str, Any]
    pairs: tuple[tuple[str, str | None], ...]
    keeps: tuple[float, ...]
    seeds: tuple[int, ...]
    sharpness_batches: int = 4
    sharpness_batch_size: int = 128
    hessian_iterations: int = 20
    latency_repeats: int = 50

    def with_base(self, **values: Any) -> BenchPreset:
        """The same grid with some base config keys replaced (e.g. fewer epochs)."""
        return replace(self, base={**self.base, **values})

    def cells(self) -> list[Cell]:
        """The grid in run order: seed-major, so one dense model serves a block of cells."""
        return [
            Cell(method, criterion, keep, seed)
            for seed in self.seeds
            for keep in self.keeps
            for method, criterion in self.pairs
        ]

    def config(self, cell: Cell) -> ExperimentConfig:
        """The cell's config, validated."""
        values = {**self.base, "seed": cell.seed}
        if cell.method != "dense":
            values.update(methods=[cell.method], keep=cell.keep)
        if cell.criterion is not None:
            values["criterion"] = cell.criterion
        return from_flat(values).validate()

    def identity(self) -> dict[str, Any]:
        """The preset as JSON data, less what does not change results (progress bars).

        ``resolved`` is the base with every default filled in, so that results made under
        other defaults (say, radii before a sweep changed them) are never mixed in.
        """
        data = json.loads(json.dumps(asdict(self)))
        data["base"].pop("progress", None)
        data["resolved"] = from_flat(self.base).to_flat()
        data["resolved"].pop("progress", None)
        return data


SMALL_BASE: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "model": "resnet20",
    "train_limit": 10000,  # 9000 to train, 1000 for validation
    "test_limit": 2000,
    "corruption_limit": 300,
    "corruptions": "all",
    "dense_epochs": 10.0,
    "dense_lr": 0.1,
    "keep_kind": "params",
    # as the committed rows were measured: exact channel counts, latency in PyTorch
    "round_to": 1,
    "runtime": "torch",
    "warmup_epochs": 2.0,
    "prune_epochs": 3.0,
    "finetune_epochs": 5.0,
    "prune_steps": 4,
    "batch_size": 128,
    "lr": 0.05,
    # rho, rho_min and rho_max are PrunerSettings' defaults: the `small` sweep chose them.
}

MEDIUM_BASE = {**SMALL_BASE, "train_limit": 30000, "test_limit": None, "corruption_limit": 2000}

PRESETS: dict[str, BenchPreset] = {
    "smoke": BenchPreset(
        name="smoke",
        description="Checks that the whole benchmark runs (about a minute on 2 CPU cores): "
        "sklearn digits (8 px), ResNet-20, keep 50%, sgd vs adasap, one seed, 2 corruptions "
        "(gaussian_noise, gaussian_blur) on 100 test images. The numbers mean nothing.",
        base={
            "dataset": "digits",
            "model": "resnet20",
            "train_limit": 1200,
            "test_limit": None,
            "corruption_limit": 100,
            "corruptions": "quick",
            "dense_epochs": 4.0,
            "dense_lr": 0.1,
            "keep_kind": "params",
            "round_to": 1,  # as the small presets
            "runtime": "torch",
            "warmup_epochs": 1.0,
            "prune_epochs": 1.0,
            "finetune_epochs": 1.0,
            "prune_steps": 2,
            "batch_size": 64,
            "lr": 0.05,
            "rho": 0.05,
            "rho_min": 0.02,
            "rho_max": 0.2,
        },
        pairs=(("sgd", "magnitude"), ("adasap", "magnitude")),
        keeps=(0.5,),
        seeds=(0,),
        sharpness_batches=2,
        sharpness_batch_size=64,
        hessian_iterations=5,
        latency_repeats=20,
    ),
    "small": BenchPreset(
        name="small",
        description="A CPU-sized comparison (at most 3 hours on 2 cores): Fashion-MNIST "
        "(9000 training images), ResNet-20, keep 80/50/30% of the parameters; sgd, sam and "
        "adasap with magnitude scores, sgd and adasap with Taylor scores; 2 seeds; all "
        "19 corruptions x 5 severities on 300 test images.",
        base=SMALL_BASE,
        pairs=(
            ("sgd", "magnitude"),
            ("sam", "magnitude"),
            ("adasap", "magnitude"),
            ("sgd", "taylor"),
            ("adasap", "taylor"),
        ),
        keeps=(0.8, 0.5, 0.3),
        seeds=(0, 1),
        sharpness_batches=4,
        sharpness_batch_size=64,
    ),
    "medium": BenchPreset(
        name="medium",
        description="Enough seeds and images to resolve a 1-2 point difference (about 9 hours "
        "on 2 CPU cores with --jobs 2, docs/benchmark.md): Fashion-MNIST (27000 training "
        "images, 3000 for validation, all 10000 test images for clean accuracy and the first "
        "2000 for the 19 corruptions x 5 severities), ResNet-20, the small preset's schedule; keep "
        "50/30/20% of the parameters; sgd, sam and adasap with magnitude and with Taylor "
        "scores, so every comparison is at one criterion; 4 seeds, reported as paired "
        "differences from sgd (and adasap's from sam) with 95% intervals.",
        base=MEDIUM_BASE,
        pairs=tuple((m, c) for c in ("magnitude", "taylor") for m in ("sgd", "sam", "adasap")),
        keeps=(0.5, 0.3, 0.2),
        seeds=(0, 1, 2, 3),
        sharpness_batches=4,
        sharpness_batch_size=64,
    ),
    "focused": BenchPreset(
        name="focused",
        description="Issue #30's focused rerun: the medium setting (same data sizes and "
        "schedule) at Taylor scores, keep 50/30% of the parameters, sgd, sam and adasap, 4 "
        "paired seeds, with phase 3's ASAM radius at 0.2 instead of the default 2.0: the "
        "point of adasap's validation front nearest the clean bar (docs/tuning.md, the #30 "
        "sweeps). The defaults themselves did not change, so `medium`'s cells are the rerun at "
        "them; this measures the other end of the trade-off with seeds.",
        base={**MEDIUM_BASE, "finetune_rho": 0.2},
        pairs=(("sgd", "taylor"), ("sam", "taylor"), ("adasap", "taylor")),
        keeps=(0.5, 0.3),
        seeds=(0, 1, 2, 3),
        sharpness_batches=4,
        sharpness_batch_size=64,
    ),
    "paper": BenchPreset(
        name="paper",
        description="The paper's ImageNet setting as far as it is known, for a GPU machine "
        "(days of GPU time; not run on a CPU). ResNet-50 on an ImageFolder tree "
        "(train/ and val/ under data/imagenet: pass another path with with_base(dataset=...)); "
        "keep ~40% and ~20% of the parameters (the paper's 0.40x and 0.20x sizes); magnitude "
        "and Taylor (HALP's BatchNorm form); 90 epochs in all with HALP's recipe (NVlabs/HALP "
        "rn50_imagenet_prune.yaml: lr 1.024 at batch 1024, here scaled to 0.256 at 256, "
        "momentum 0.875, weight decay 3.05e-5, cosine with 8 warm-up epochs, label smoothing "
        "0.1, 30 removal steps). The phase split (5 adaptive warm-up, 5 removal, 80 uniform "
        "SAM fine-tuning) and the radii (SAM's usual ImageNet rho 0.05; AdaSAP 0.02..0.2, the "
        "project defaults) are our choices: the paper's exact values are not confirmed. "
        "Corruptions are rendered on the fly from 5000 validation images, so the numbers are "
        "not comparable with published ImageNet-C ones (use adasap eval with the official "
        "files for those). The dense model is trained for 90 epochs unless a pretrained one "
        "is in the dense cache. On 8 GPUs run its cells with torchrun: docs/paper.md.",
        base={
            "dataset": "imagefolder:data/imagenet",
            "model": "resnet50",
            "train_limit": None,
            "test_limit": None,
            "corruption_limit": 5000,
            "corruptions": "all",
            "dense_epochs": 90.0,
            "dense_lr": 0.256,
            "keep_kind": "params",
            "round_to": 1,  # the paper prunes to exact channel counts
            "warmup_epochs": 5.0,
            "prune_epochs": 5.0,
            "finetune_epochs": 80.0,
            "prune_steps": 30,
            "batch_size": 256,
            "lr": 0.256,
            "momentum": 0.875,
            "weight_decay": 3.0517578125e-05,
            "label_smoothing": 0.1,
            "lr_warmup_epochs": 8.0,
            "taylor_form": "bn",
            "rho": 0.05,
            "rho_min": 0.02,
            "rho_max": 0.2,
            "amp": "auto",
        },
        pairs=(
            ("sgd", "magnitude"),
            ("sam", "magnitude"),
            ("adasap", "magnitude"),
            ("sgd", "taylor"),
            ("adasap", "taylor"),
        ),
        keeps=(0.4, 0.2),
        seeds=(0,),
        sharpness_batches=4,
        sharpness_batch_size=64,
    ),
}


def resolve_preset(
    preset: str | BenchPreset, presets: Mapping[str, BenchPreset] = PRESETS, what: str = "preset"
) -> BenchPreset:
    """``preset`` itself, or the one of ``presets`` it names (``what``, in the error)."""
    if isinstance(preset, BenchPreset):
        return preset
    if preset not in presets:
        raise UserError(f"no {what} {preset!r}: choose one of {', '.join(presets)}")
    return presets[preset]


def estimate_seconds(
    preset: BenchPreset,
    train_images: int | None = None,
    *,
    sgd_rate: float = SGD_RATE,
    sam_rate: float = SAM_RATE,
    eval_rate: float = EVAL_RATE,
) -> float:
    """A planning estimate of the whole preset's wall time from images/s throughputs.

    Counts dense training, every pruning run (a sharpness-aware phase at ``sam_rate``),
    validation every epoch, clean and corrupted test images, and the sharpness probes. It
    ignores that pruned models train faster and the one-off rendering of corruptions.
    ``train_images`` defaults to the training part of ``train_limit``.
    """
    config = preset.config(preset.cells()[0])
    if train_images is None:
        if config.train_limit is None:
            raise UserError(f"preset {preset.name} has no train_limit: pass train_images")
        train_images = training_images(config)
    per_corruption = {"all": len(CORRUPTIONS), "quick": 2, "none": 0}[config.corruptions]
    eval_images = (config.test_limit or 10000) + (
        (config.corruption_limit or config.test_limit or 10000) * per_corruption * 5
    )
    probe = preset.sharpness_batches * preset.sharpness_batch_size
    sharpness = probe * (3 + HVP_COST * preset.hessian_iterations) / sgd_rate
    per_model = eval_images / eval_rate + sharpness
    rates = (sgd_rate, sam_rate, eval_rate)
    total = 0.0
    for seed in preset.seeds:
        total += dense_seconds(config, train_images, *rates) + per_model
        for cell in (c for c in preset.cells() if c.seed == seed):
            total += pruning_seconds(config, cell.method, train_images, *rates) + per_model
    return total


def training_images(config: ExperimentConfig) -> int:
    """The training part of the config's ``train_limit`` (the rest is validation)."""
    if config.train_limit is None:
        raise UserError("the config has no train_limit: pass the number of training images")
    return round(config.train_limit * (1 - VAL_FRACTION))


def dense_seconds(
    config: ExperimentConfig, train_images: int, sgd_rate: float, sam_rate: float, eval_rate: float
) -> float:
    """Planned dense training: every epoch at ``sgd_rate``, then validation."""
    val_images = train_images * VAL_FRACTION / (1 - VAL_FRACTION)
    return config.dense_epochs * (train_images / sgd_rate + val_images / eval_rate)


def pruning_seconds(
    config: ExperimentConfig,
    method: str,
    train_images: int,
    sgd_rate: float,
    sam_rate: float,
    eval_rate: float,
) -> float:
    """Planned pruning with ``method``: phases 1-2 and phase 3 each at their optimizer's rate
    (a sharpness-aware one at ``sam_rate``), with validation every epoch."""
    s = config.prune
    val_images = train_images * VAL_FRACTION / (1 - VAL_FRACTION)
    phases = (s.warmup_epochs + s.prune_epochs, s.finetune_epochs)
    return sum(
        epochs * (train_images / (sgd_rate if kind == "sgd" else sam_rate) + val_images / eval_rate)
        for kind, epochs in zip(METHODS[method], phases, strict=True)
    )
