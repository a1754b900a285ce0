"""The detection job (``--task detection``): detection data by name, a detector by name, and
P (mAP@0.5 on clean test images), mPC and rPC = mPC / P on corrupted ones (Michaelis et al.
2019).

The default trains ``tiny_ssd`` on the Fashion-MNIST canvases (VOC and COCO folders:
:mod:`adasap.experiments.detection_data`) through the same drivers as classification.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from adasap.data.detection import DetectionBundle, FileDetectionSet
from adasap.deploy.comparison import LatencyComparison, run_latency
from adasap.deploy.serialization import detection_architecture, read_description
from adasap.distributed import on_main
from adasap.errors import UserError
from adasap.experiments.classification_job import corruption_names
from adasap.experiments.config import ExperimentConfig, from_flat
from adasap.experiments.dense import loader_workers
from adasap.experiments.detection_bench import DETECTION_PRESETS, run_detection_bench
from adasap.experiments.detection_data import (
    CANVAS_DATASET,
    DETECTION_DEFAULTS,
    DETECTION_KINDS,
    data_key,
    detection_dataset,
    image_side,
    load_detection_data,
    on_canvases,
    reduced_note,
    timing_images,
)
from adasap.experiments.grid import Parallel
from adasap.experiments.job import JOBS, Job
from adasap.experiments.reporting import DETECTION_SCORES
from adasap.experiments.results import ResultRow
from adasap.io import cache_root, read_json_mapping
from adasap.models.detection import build_detector, list_detectors
from adasap.robustness.detection import evaluate_detection_corruptions
from adasap.robustness.report import SOURCE_RENDERED
from adasap.tasks import DetectionTask, Task
from adasap.tasks.detection import evaluate_detection

EVAL_BATCH = 32


class DetectionJob(Job):
    scores = DETECTION_SCORES
    title = "adasap detection results"
    bench_presets = DETECTION_PRESETS
    defaults = DETECTION_DEFAULTS

    def claims(self, config: ExperimentConfig) -> str | None:
        if config.model.strip().lower() in list_detectors():
            return f"{config.model} is a detector"
        if config.dataset.strip().partition(":")[0].lower() in DETECTION_KINDS:
            return f"{config.dataset} is a detection data set"
        return None

    def validate(self, config: ExperimentConfig) -> None:
        detectors = list_detectors()
        if config.model.strip().lower() not in detectors:
            raise UserError(
                f"model {config.model} is not a detector: with --task detection use one of "
                f"{', '.join(detectors)}"
            )
        kind, _ = detection_dataset(config.dataset)
        if config.prune.keep_kind == "latency":
            raise UserError(
                "--keep-kind latency is not supported for detection: use params or macs"
            )
        if config.prune.pruner.distill_weight > 0:
            raise UserError(
                "distillation is not defined for detectors: drop --distill-weight (or set 0)"
            )
        for key in ("train_limit", "test_limit"):
            value, flag = getattr(config, key), f"--{key.replace('_', '-')}"
            if kind == CANVAS_DATASET and (value is None or value < 2):
                raise UserError(
                    f"{key}={value!r}: for detection it is the number of canvases to make; "
                    f"give a number >= 2 (e.g. {flag} 200)"
                )
            if value is not None and value < 1:
                raise UserError(
                    f"{key}={value!r}: it is the number of {kind} images to use; give a positive "
                    f"number (e.g. {flag} 200) or none for all"
                )
        if config.image_size is not None and config.image_size < 32:
            raise UserError(f"image_size={config.image_size} is too small: use 32 px or more")

    def load_data(self, config: ExperimentConfig) -> DetectionBundle:
        return load_detection_data(config)

    def check(self, config: ExperimentConfig, data: DetectionBundle) -> None:
        """The keep target is checked by the pruner: a detector's layout costs a trace."""

    def note(self, config: ExperimentConfig, data: DetectionBundle) -> str:
        return reduced_note(config, data)

    def architecture(self, config: ExperimentConfig, data: DetectionBundle) -> dict[str, Any]:
        return detection_architecture(config.model, data.spec.num_classes, image_side(config))

    def build(self, architecture: dict[str, Any]) -> nn.Module:
        return build_detector(
            architecture["name"],
            num_classes=architecture["num_classes"],
            image_size=architecture["image_size"],
        )

    def recipe(self, config: ExperimentConfig, data: DetectionBundle) -> dict[str, Any]:
        s = config.prune
        recipe = dict(
            architecture=self.architecture(config, data),
            dataset=config.dataset,
            train=len(data.train),
            epochs=config.dense_epochs,
            lr=config.dense_lr,
            batch_size=s.batch_size,
            seed=s.seed,
        )
        if not on_canvases(config):  # the canvases keep the key they had before VOC and COCO
            recipe["data"] = data_key(config)
        # trained through the shared epoch loop (full batches per epoch, per-epoch validation)
        recipe["loop"] = "epochs"
        return recipe

    def training_task(self, config: ExperimentConfig, data: DetectionBundle) -> Task:
        # image files are decoded by the config's workers; canvases in memory need none
        files = isinstance(data.train, FileDetectionSet)
        return DetectionTask(num_workers=loader_workers(config) if files else 0)

    def example(self, config: ExperimentConfig, data: DetectionBundle) -> list[torch.Tensor]:
        """One square of the detector's input side (training images may differ in shape;
        the same random one for every model)."""
        side = image_side(config)
        return [torch.rand(3, side, side, generator=torch.Generator().manual_seed(0))]

    def evaluate(
        self,
        model: nn.Module,
        data: DetectionBundle,
        config: ExperimentConfig,
        out_dir: Path,
        label: str,
        official: tuple[str, str] | None = None,
        shifted: Any = None,
    ) -> ResultRow:
        """P, mPC and rPC on the first ``corruption_limit`` test images (all of them with
        ``corruptions: none``, P alone)."""
        if official is not None or shifted is not None:
            raise UserError(
                "--official and --imagenet-v2 are classification test sets: drop them to "
                "evaluate detectors"
            )
        model.cpu().eval()
        names = corruption_names(config)
        if names is None:
            clean = evaluate_detection(model, data.test, batch_size=EVAL_BATCH)
            return ResultRow(method=label, clean_accuracy=clean["map_50"])
        test = data.test
        count = min(config.corruption_limit or len(test), len(test))
        report = evaluate_detection_corruptions(
            model,
            test.subset(range(count)),
            dataset_key=f"{data_key(config)}-seed{config.prune.seed}-test{len(test)}-n{count}",
            corruptions=names,
            batch_size=EVAL_BATCH,
            seed=config.prune.seed,
            cache_dir=cache_root(config.cache_dir) / "corruptions",
            progress=config.progress,
        )
        on_main(lambda: report.save(out_dir / label))
        return ResultRow(
            method=label,
            clean_accuracy=report.performance,
            corruption_accuracy=report.mpc,
            extra_accuracy=report.extra_mpc,
            relative_robustness=report.rpc,
            corruption_source=SOURCE_RENDERED,
        )

    def shifted_data(self, config: ExperimentConfig, data: DetectionBundle, folder: Any) -> Any:
        raise UserError("--imagenet-v2 is a classification test set: drop it for detectors")

    def check_fits(
        self,
        architecture: dict[str, Any],
        config: ExperimentConfig,
        data: DetectionBundle,
        at: Path,
    ) -> None:
        wanted = self.architecture(config, data)
        if {k: architecture.get(k) for k in wanted} != wanted:
            raise UserError(
                f"the detector in {at} was built for {architecture.get('num_classes')} "
                f"classes at {architecture.get('image_size')} px, the data have "
                f"{wanted['num_classes']} at {wanted['image_size']} px: evaluate it with the "
                "config of its run (adasap eval <run directory>)"
            )

    def eval_config(self, config: ExperimentConfig, model_dir: Path) -> ExperimentConfig:
        """``config`` when it is a detection config (a run's ``config.json`` with the eval
        flags), else that of the run directory holding the model, else the detection defaults
        at the model's image size."""
        return config if config.task == "detection" else saved_config(model_dir)

    def timing_inputs(
        self, config: ExperimentConfig, data: DetectionBundle
    ) -> tuple[tuple[int, ...], torch.Tensor | None]:
        side = image_side(config)
        return (3, side, side), timing_images(config, data)

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
        """The pruned detectors beside the run's trained dense one, all timed on the run's
        first test images: a detector's post-processing grows with the boxes above its score
        threshold, so neither fresh weights nor random images would be fair."""
        config = saved_config(next(iter(models.values()))).validate()
        images = timing_images(config, self.load_data(config), max(batch_sizes))
        return run_latency(
            run_dir, batch_sizes=batch_sizes, runtimes=runtimes, device=device, repeats=repeats,
            images=images,
        )  # fmt: skip

    def bench(
        self, preset: str, out: Path, console: Console, parallel: Parallel, report_only: bool
    ) -> Path:
        return run_detection_bench(preset, out, console, parallel, report_only)


def saved_config(model_dir: Path) -> ExperimentConfig:
    """The config of the run holding the detector saved in ``model_dir``, else the detection
    defaults at the detector's input size."""
    saved = model_dir.parent / "config.json"
    if saved.is_file():
        values = read_json_mapping(saved, "restore it, or pass a run directory")
        return from_flat(values, source=str(saved))
    architecture = read_description(model_dir)["architecture"]
    return from_flat({"task": "detection", "image_size": architecture["image_size"]})


JOBS.add("detection", DetectionJob())
