"""The classification job: a dataset by name, a classifier by name, accuracy on clean and
corrupted test images (rendered, or official pre-rendered sets), ImageNet-V2 for shift."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from adasap.data import (
    DataBundle,
    batches,
    dataset_options,
    evaluation_source,
    get_spec,
    load_dataset,
)
from adasap.deploy.comparison import LatencyComparison, run_latency
from adasap.devices import autocast_dtype, resolve_device
from adasap.distributed import is_distributed, on_main, shard
from adasap.errors import UserError
from adasap.experiments.bench import run_bench
from adasap.experiments.bench_report import write_report
from adasap.experiments.config import ExperimentConfig
from adasap.experiments.dense import loader_workers, safe_name
from adasap.experiments.grid import Parallel
from adasap.experiments.job import JOBS, Job
from adasap.experiments.presets import PRESETS
from adasap.experiments.reporting import ACCURACY_SCORES
from adasap.experiments.results import ResultRow
from adasap.io import cache_root
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size
from adasap.models.builders import build_model, find_classifier
from adasap.robustness.corruptions import CORRUPTIONS
from adasap.robustness.evaluation import evaluate_corruptions
from adasap.robustness.official import load_imagenet_v2, official_sets
from adasap.tasks import ClassificationTask, Task
from adasap.tasks.evaluate import evaluate_accuracy
from adasap.training.loop import steps_per_epoch
from adasap.training.pipeline import check_target_reachable, latency_budget_for

QUICK_CORRUPTIONS = ("gaussian_noise", "gaussian_blur")
# training images that calibrate an INT8 model's activation ranges
CALIBRATION_IMAGES = 256


def corruption_names(config: ExperimentConfig) -> tuple[str, ...] | None:
    """The corruptions ``config.corruptions`` names: all, the quick two, or none."""
    return {"all": tuple(CORRUPTIONS), "quick": QUICK_CORRUPTIONS, "none": None}[config.corruptions]


def example_images(data: DataBundle) -> torch.Tensor:
    """Two test images: the example input that traces and measures a model."""
    return evaluation_source(data.test).example(2)


def load_classification_data(config: ExperimentConfig) -> DataBundle:
    """The config's dataset, split and limited as the config says."""
    options = {}
    if config.workers is not None and "num_workers" in dataset_options(config.dataset):
        options["num_workers"] = config.workers
    return load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        seed=config.prune.seed,
        train_limit=config.train_limit,
        test_limit=config.test_limit,
        **options,
    )


def classifier_architecture(config: ExperimentConfig, data: DataBundle) -> dict[str, Any]:
    """The model-building arguments of the config's model for the data's images and classes."""
    spec = data.spec
    return dict(
        name=config.model,
        num_classes=spec.num_classes,
        in_channels=spec.channels,
        image_size=spec.image_size,
        mean=list(spec.mean),
        std=list(spec.std),
    )


def check_keep_reachable(config: ExperimentConfig, data: DataBundle) -> None:
    """Fail before any work (and before the run directory exists) when ``keep`` would empty
    a layer: :func:`adasap.training.pipeline.check_target_reachable` on the untrained dense
    architecture.

    A latency budget is measured here as the run would measure it, on the training device;
    the run then reuses the cached latency table.
    """
    s = config.prune
    device = resolve_device(s.device) if s.keep_kind == "latency" else torch.device("cpu")
    model = build_model(**classifier_architecture(config, data)).to(device).eval()
    example = example_images(data).to(device)
    classifier = find_classifier(model, data.spec.num_classes)
    layout = NeuronLayout(model, example, [classifier] if classifier is not None else [])
    budget = None
    if s.keep_kind == "latency":
        with warnings.catch_warnings():  # a noisy machine: the run measures again and says so
            warnings.simplefilter("ignore")
            budget = latency_budget_for(layout, example, s)
    check_target_reachable(layout, s, measure_size(model, example), budget)


class ClassificationJob(Job):
    scores = ACCURACY_SCORES
    title = "adasap results"
    bench_presets = PRESETS

    def claims(self, config: ExperimentConfig) -> str | None:
        """Any model or dataset name may be a classifier's: the other tasks' say no first."""
        return None

    def validate(self, config: ExperimentConfig) -> None:
        if config.image_size is not None:
            raise UserError("image_size is a detection setting: drop it, or pass --task detection")
        spec = get_spec(config.dataset)
        build_model(
            config.model,
            num_classes=spec.num_classes,
            in_channels=spec.channels,
            image_size=spec.image_size,
            mean=spec.mean,
            std=spec.std,
        )

    def load_data(self, config: ExperimentConfig) -> DataBundle:
        return load_classification_data(config)

    def check(self, config: ExperimentConfig, data: DataBundle) -> None:
        steps_per_epoch(
            ClassificationTask().training_source(
                data.train, batch_size=config.prune.batch_size, seed=0, shard=shard()
            )
        )
        check_keep_reachable(config, data)

    def note(self, config: ExperimentConfig, data: DataBundle) -> str | None:
        if not config.reduced:
            return None
        limit = config.corruption_limit
        return (
            f"Reduced setting: {len(data.train)} training images, {len(data.test)} test images"
            + (f" ({limit} for corruptions)" if limit else "")
            + "; numbers are for a quick comparison, not for publication."
        )

    def architecture(self, config: ExperimentConfig, data: DataBundle) -> dict[str, Any]:
        return classifier_architecture(config, data)

    def build(self, architecture: dict[str, Any]) -> nn.Module:
        return build_model(**architecture)

    def recipe(self, config: ExperimentConfig, data: DataBundle) -> dict[str, Any]:
        s = config.prune
        recipe = dict(
            architecture=classifier_architecture(config, data),
            dataset=config.dataset,
            train_limit=config.train_limit,
            epochs=config.dense_epochs,
            lr=config.dense_lr,
            batch_size=s.batch_size,
            label_smoothing=s.label_smoothing,
            seed=s.seed,
        )
        precision = autocast_dtype(s.amp, resolve_device(s.device))
        if precision is not None:  # float32 keeps the earlier key: its cached models still count
            recipe["precision"] = str(precision)
        if s.sync_bn and is_distributed():  # other statistics, another model
            recipe["sync_bn"] = True
        return recipe

    def training_task(self, config: ExperimentConfig, data: DataBundle) -> Task:
        return ClassificationTask(label_smoothing=config.prune.label_smoothing)

    def example(self, config: ExperimentConfig, data: DataBundle) -> torch.Tensor:
        return example_images(data)

    def evaluate(
        self,
        model: nn.Module,
        data: DataBundle,
        config: ExperimentConfig,
        out_dir: Path,
        label: str,
        official: tuple[str, str] | None = None,
        shifted: Any = None,
    ) -> ResultRow:
        """Clean test accuracy, and accuracy on corrupted test images: rendered from the first
        ``corruption_limit`` test images (once, cached), or read from official pre-rendered
        files with ``official=(root, name)``, e.g. ``("data/CIFAR-10-C", "cifar10-c")``, the
        only numbers comparable with published ones; ``shifted``: ImageNet-V2 images."""
        device = resolve_device(config.prune.device)
        model.to(device).eval()
        clean = evaluate_accuracy(model, data.test, device=device, sharded=True)
        row = ResultRow(method=label, clean_accuracy=clean)
        if shifted is not None:
            shift = evaluate_accuracy(model, shifted, device=device, sharded=True)
            row = replace(row, shift_accuracy=shift)
        names = corruption_names(config)
        if names is None:
            return row
        subset = data.test
        if official is None and config.corruption_limit is not None:
            subset = subset.subset(torch.arange(min(config.corruption_limit, len(subset))))
        report = evaluate_corruptions(
            model,
            subset,
            corruptions=names,
            # imagefolder:/a/b names its render cache folder imagefolder-a-b-...
            dataset_key=safe_name(f"{config.dataset}-test{len(data.test)}-n{len(subset)}"),
            device=device,
            seed=config.prune.seed,
            cache_dir=cache_root(config.cache_dir) / "corruptions",
            corrupted=(
                official_sets(*official, num_workers=loader_workers(config))
                if official is not None
                else None
            ),
            progress=config.progress,
            sharded=True,
        )
        on_main(lambda: report.save(out_dir / label))
        return replace(
            row,
            corruption_accuracy=report.corruption_accuracy,
            extra_accuracy=report.extra_accuracy,
            relative_robustness=report.relative_robustness,
            corruption_source=report.source,
        )

    def shifted_data(self, config: ExperimentConfig, data: DataBundle, folder: str | Path) -> Any:
        """ImageNet-V2 style images (``<root>/<class index>/<image>``), resized and
        centre-cropped as the validation images are."""
        size = data.spec.image_size
        return load_imagenet_v2(
            folder, resize=round(size * 256 / 224), crop=size, num_workers=loader_workers(config)
        )

    def check_fits(
        self, architecture: dict[str, Any], config: ExperimentConfig, data: DataBundle, at: Path
    ) -> None:
        spec = data.spec
        model_side = (
            int(architecture["in_channels"]),
            int(architecture["image_size"]),
            architecture.get("num_classes"),
        )
        data_side = (spec.channels, spec.image_size, spec.num_classes)
        if model_side != data_side:
            raise UserError(
                f"the model in {at} takes {_images_and_classes(*model_side)}, but dataset "
                f"{spec.name} has {_images_and_classes(*data_side)}: pass the --dataset the model "
                "was trained on"
            )

    def eval_config(self, config: ExperimentConfig, model_dir: Path) -> ExperimentConfig:
        return config

    def timing_inputs(
        self, config: ExperimentConfig, data: DataBundle
    ) -> tuple[tuple[int, ...], torch.Tensor | None]:
        return tuple(example_images(data).shape[1:]), None

    def calibration_images(self, config: ExperimentConfig, data: DataBundle) -> torch.Tensor:
        """The first :data:`CALIBRATION_IMAGES` of the training images in an order seeded by
        the run's seed, without augmentation (as the test images are prepared)."""
        order = torch.Generator().manual_seed(config.prune.seed)
        images, _ = next(batches(data.train, CALIBRATION_IMAGES, shuffle=True, generator=order))
        return images

    def latency(
        self,
        run_dir: Path,
        models: dict[str, Path],
        *,
        batch_sizes: Sequence[int],
        runtimes: Sequence[str],
        device: str,
        repeats: int,
        console: Console,
    ) -> LatencyComparison:
        """Fresh dense weights and random inputs: a classifier's time depends on neither."""
        return run_latency(
            run_dir, batch_sizes=batch_sizes, runtimes=runtimes, device=device, repeats=repeats
        )

    def bench(
        self, preset: str, out: Path, console: Console, parallel: Parallel, report_only: bool
    ) -> Path:
        if not report_only:
            run_bench(preset, out, console=console, parallel=parallel)
        return write_report(out) / "report.md"


def _images_and_classes(channels: int, size: int, classes: Any) -> str:
    return f"{channels}x{size}x{size} images (channels x height x width) and {classes} classes"


JOBS.add("classification", ClassificationJob())
