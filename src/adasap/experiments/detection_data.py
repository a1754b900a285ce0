"""The data of ``adasap run --task detection``: the canvases, Pascal VOC or a COCO-format folder.

``--dataset`` names the set (:func:`adasap.experiments.config.detection_dataset`): ``canvas``
(made from Fashion-MNIST, ``--data-dir`` holding its files), ``voc[:<years>]`` or
``coco[:<train>,<test>]`` (``--data-dir`` holding ``VOCdevkit/``, or ``annotations/`` and the
split folders). ``train_limit``/``test_limit`` are the numbers of canvases made, or of VOC and
COCO images drawn (seeded) from their splits. Real images keep their sizes: the detectors resize
them to ``image_size`` themselves.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adasap.data.detection import AnyDetectionSet, DetectionBundle
from adasap.data.detection_canvas import load_canvas_detection
from adasap.data.detection_files import load_coco_detection, load_voc_detection
from adasap.data.files import data_root
from adasap.errors import UserError
from adasap.experiments.config import ExperimentConfig
from adasap.experiments.dense import safe_name
from adasap.tasks.detection import DetectionTask

# The detection data set of ``adasap run --task detection``: Fashion-MNIST garments on canvases
CANVAS_DATASET = "canvas"
# Its other data sets (``--data-dir``: the folder holding them): Pascal VOC, trained on the
# trainval sets of the years (default: 2007, and 2012 when present) and tested on VOC2007
# test; a COCO-format folder, trained on one split and tested on another.
DETECTION_KINDS = (CANVAS_DATASET, "voc", "coco")
DETECTION_DATASETS = (CANVAS_DATASET, "voc[:<year>+<year>]", "coco[:<train split>,<test split>]")
COCO_SPLITS = ("train2017", "val2017")
# ``--task detection``'s defaults in place of the classification ones: tiny_ssd on a reduced
# canvas set, sized so that the whole job fits 15 minutes on a 2-core CPU (README, Detection).
# train_limit and test_limit are the numbers of canvases made; corruption_limit the number
# of test canvases corrupted. Criterion, phase 3 and precision are the detection task's.
DETECTION_DEFAULTS: dict[str, Any] = {
    **DetectionTask.defaults,
    "task": "detection",
    "dataset": CANVAS_DATASET,
    "model": "tiny_ssd",
    "image_size": 96,
    "train_limit": 2000,
    "test_limit": 100,
    "corruption_limit": 100,
    "dense_epochs": 10.0,
    "dense_lr": 0.02,
    "batch_size": 16,
    "lr": 0.01,
    "warmup_epochs": 2.0,
    "prune_epochs": 2.0,
    "finetune_epochs": 2.0,
    "prune_steps": 4,
}


CANVAS_SIDE = 128  # the canvases' side when the config leaves image_size unset
# what --data-dir must hold, by kind of dataset
_LAYOUTS = {
    "voc": "VOCdevkit/VOC<year>/ (torchvision's VOCDetection layout)",
    "coco": "annotations/instances_<split>.json and a folder <split>/ of images per split",
}


def detection_dataset(name: str) -> tuple[str, tuple[str, ...]]:
    """A detection ``dataset`` as its kind and parts: ``("canvas", ())``, ``("voc", years)``
    (none given: the loader's default) or ``("coco", (train split, test split))``."""
    kind, colon, rest = name.strip().partition(":")
    kind = kind.lower()
    if kind == CANVAS_DATASET and not colon:
        return kind, ()
    if kind == "voc":
        years = tuple(rest.split("+")) if colon else ()
        if not all(re.fullmatch(r"\d{4}", year) for year in years):
            raise UserError(
                f"dataset {name!r}: give VOC years as four digits joined by +, e.g. "
                "voc:2007+2012 (or voc for 2007, and 2012 when present)"
            )
        return kind, years
    if kind == "coco":
        splits = tuple(rest.split(",")) if colon else COCO_SPLITS
        if len(splits) != 2 or not all(splits):
            raise UserError(
                f"dataset {name!r}: name the COCO training and test splits, e.g. "
                f"coco:{','.join(COCO_SPLITS)} (or coco for those two)"
            )
        return kind, splits
    raise UserError(
        f"--task detection runs on {', '.join(DETECTION_DATASETS)}, not {name!r}: pass one "
        "of them as --dataset (docs/detection.md)"
    )


def on_canvases(config: ExperimentConfig) -> bool:
    """Whether the config's data are the canvases (not VOC or COCO images)."""
    return detection_dataset(config.dataset)[0] == CANVAS_DATASET


def image_side(config: ExperimentConfig) -> int:
    """The detector's input side (and the canvases' side)."""
    return config.image_size or CANVAS_SIDE


def load_detection_data(config: ExperimentConfig) -> DetectionBundle:
    """The data set the config names, limited to ``train_limit``/``test_limit`` images."""
    kind, parts = detection_dataset(config.dataset)
    seed = config.prune.seed
    if kind == CANVAS_DATASET:
        train, test = int(config.train_limit or 0), int(config.test_limit or 0)
        return load_canvas_detection(
            data_dir=config.data_dir,
            cache_dir=config.cache_dir,
            seed=seed,
            num_train=train,
            num_val=max(1, train // 10),
            num_test=test,
            image_size=image_side(config),
        )
    root = _root(config)
    if kind == "voc":
        bundle = load_voc_detection(root, years=parts or None, seed=seed)
    else:
        bundle = load_coco_detection(root, train=parts[0], test=parts[1], seed=seed)
    return replace(
        bundle,
        train=_drawn(bundle.train, config.train_limit, seed),
        test=_drawn(bundle.test, config.test_limit, seed),
    )


def _root(config: ExperimentConfig) -> Path:
    """The folder holding a VOC or COCO set: ``--data-dir`` (else ``$ADASAP_DATA``)."""
    kind, _ = detection_dataset(config.dataset)
    root = data_root(config.data_dir)
    if not root.is_dir():
        raise UserError(
            f"{root} is not a folder: pass --data-dir <the folder holding {_LAYOUTS[kind]}>"
        )
    return root.resolve()


def _drawn(data: AnyDetectionSet, limit: int | None, seed: int) -> AnyDetectionSet:
    """``limit`` images of ``data`` drawn with ``seed`` (kept in their order), or all."""
    if limit is None or limit >= len(data):
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(sorted(order[:limit].tolist()))


def timing_images(config: ExperimentConfig, data: DetectionBundle, count: int = 1) -> torch.Tensor:
    """The first ``count`` test images, resized to the detector's square input side: what
    detectors are timed on. Random images would not do: a detector's post-processing time
    grows with the boxes above its score threshold, which noise inflates for some models."""
    side = image_side(config)
    images = [data.test[k][0] for k in range(min(count, len(data.test)))]
    return torch.cat(
        [F.interpolate(image[None], size=(side, side), mode="bilinear", antialias=True)
         for image in images]
    )  # fmt: skip


def data_key(config: ExperimentConfig) -> str:
    """What names the images in cache keys: the canvases' side, or the dataset and its folder
    (two COCO-format folders are two data sets)."""
    if on_canvases(config):
        return f"canvas{image_side(config)}"
    return safe_name(f"{config.dataset}-{_root(config)}")


def reduced_note(config: ExperimentConfig, data: DetectionBundle | None = None) -> str:
    """The reduced setting in words: the image counts of ``data``, else the config's limits."""
    train = len(data.train) if data is not None else config.train_limit
    test = len(data.test) if data is not None else config.test_limit
    corrupted = test if config.corruption_limit is None else config.corruption_limit
    if test is not None and corrupted is not None:
        corrupted = min(corrupted, test)
    side = image_side(config)
    images = (
        f"canvases of {side} px"
        if on_canvases(config)
        else f"{config.dataset} images, resized by the detector to {side} px"
    )

    def count(value: int | None) -> str:
        return "all" if value is None else str(value)

    if config.corruptions != "none":
        images += f" ({count(corrupted)} corrupted)"
    return (
        f"Reduced setting: {count(train)} training and {count(test)} test {images}, "
        f"{config.dense_epochs:g} dense epochs, "
        f"{config.prune.warmup_epochs:g} + {config.prune.prune_epochs:g} + "
        f"{config.prune.finetune_epochs:g} pruning epochs; numbers are for a quick comparison, "
        "not for publication."
    )
