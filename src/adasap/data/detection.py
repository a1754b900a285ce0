"""Object detection data: the spec, image sets with boxes, checks, the flip and batches.

A batch is torchvision's: ``(images, targets)``, ``images`` a list of float CHW tensors in
[0, 1] (sizes may differ), ``targets`` a list of dicts with ``boxes`` (float32 [N, 4], xyxy in
absolute pixels) and ``labels`` (int64 [N], classes 1..K; 0 is the background). Evaluation sets
also carry ``iscrowd`` (int64 [N]): objects the metric ignores (VOC's "difficult", COCO's
crowds), which torchvision's detectors do not read. The sets themselves live in
:mod:`.detection_canvas` (the offline default) and :mod:`.detection_files` (VOC, COCO).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from adasap.data.batching import SINGLE, Shard, num_batches
from adasap.data.folders import read_image
from adasap.data.sources import BatchSource, IterableSource, epoch_generator
from adasap.errors import UserError

Target = dict[str, Tensor]
DetectionBatch = tuple[list[Tensor], list[Target]]


@dataclass(frozen=True)
class DetectionSpec:
    """What a detector needs to know: ``class_names`` of labels 1..K, the image size.

    ``num_classes`` counts the background (K + 1), as torchvision's detectors are built.
    ``image_size`` is the side of square images, or None when sizes vary (VOC, COCO).
    """

    name: str
    class_names: tuple[str, ...]
    image_size: int | None = None
    channels: int = 3

    @property
    def num_classes(self) -> int:
        return len(self.class_names) + 1


def check_target(
    boxes: Tensor, labels: Tensor, width: int, height: int, num_labels: int, where: str
) -> None:
    """A :class:`UserError` for non-finite boxes, boxes outside the ``width`` x ``height``
    image, boxes without area, or labels outside 1..``num_labels``; ``where`` names the image
    or file."""
    if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != (boxes.shape[0],):
        raise UserError(
            f"{where}: boxes of shape {tuple(boxes.shape)} and labels of shape "
            f"{tuple(labels.shape)} do not match: give boxes [N, 4] (xyxy) and N labels"
        )
    # NaN compares false, so a NaN box would pass the checks below and surface only as a
    # diverged training run; an infinite one would be reported as outside with a useless box.
    finite = torch.isfinite(boxes).all(dim=1)
    if not finite.all():
        box = [round(float(v), 1) for v in boxes[~finite][0]]
        raise UserError(
            f"{where}: box {box} has a NaN or infinite coordinate: fix the annotation "
            "(finite xyxy in absolute pixels)"
        )
    bad_label = (labels < 1) | (labels > num_labels)
    if bad_label.any():
        raise UserError(
            f"{where}: class id {int(labels[bad_label][0])} is out of range: "
            f"use 1..{num_labels} (0 is the background)"
        )
    outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
    if outside.any():
        box = [round(float(v), 1) for v in boxes[outside][0]]
        raise UserError(
            f"{where}: box {box} lies outside the {width}x{height} image: "
            "fix the annotation (xyxy in absolute pixels, 0 <= x <= width, 0 <= y <= height)"
        )
    flat = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if flat.any():
        box = [round(float(v), 1) for v in boxes[flat][0]]
        raise UserError(f"{where}: box {box} has no area: fix it (x2 > x1 and y2 > y1, xyxy)")


def make_target(boxes: Any, labels: Any, iscrowd: Any = None) -> Target:
    """A target dict in the contract's dtypes (``iscrowd`` only when given)."""
    target = {
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
    }
    if iscrowd is not None:
        target["iscrowd"] = torch.as_tensor(iscrowd, dtype=torch.int64).reshape(-1)
    return target


def _copy(target: Target) -> Target:
    return {key: value.clone() for key, value in target.items()}


class DetectionSet(Dataset):
    """Images with boxes held in memory: ``images`` uint8 CHW tensors (or one NCHW tensor).

    Item ``i`` is ``(image, target)``: the image as float32 CHW in [0, 1], a copy of its target.
    Every target is checked against its image (:func:`check_target`).
    """

    def __init__(
        self,
        images: Tensor | Sequence[Tensor],
        targets: Sequence[Target],
        spec: DetectionSpec,
        source: str | None = None,
    ) -> None:
        if len(images) != len(targets):
            raise UserError(
                f"{len(images)} images but {len(targets)} targets: give one target per image"
            )
        for i, (image, target) in enumerate(zip(images, targets, strict=True)):
            if image.dtype != torch.uint8 or image.dim() != 3:
                raise UserError(
                    f"image {i} is {image.dtype} {tuple(image.shape)}, not uint8 CHW: "
                    "convert with (x * 255).round().to(torch.uint8)"
                )
            h, w = image.shape[-2:]
            check_target(
                target["boxes"], target["labels"], w, h, len(spec.class_names), f"image {i}"
            )
        self.images, self.targets, self.spec, self.source = images, list(targets), spec, source

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        return self.images[index].float().div_(255), _copy(self.targets[index])

    def uint8_image(self, index: int) -> Tensor:
        """Image ``index`` as stored (uint8 CHW), without the float conversion."""
        return self.images[index]

    def subset(self, indices: Sequence[int]) -> DetectionSet:
        """The images at ``indices``, in that order (the same tensors, not copies)."""
        images = [self.images[i] for i in indices]
        return DetectionSet(images, [self.targets[i] for i in indices], self.spec, self.source)


class FileDetectionSet(Dataset):
    """Images read from files on access (JPEG/PNG, as RGB), with targets read beforehand."""

    def __init__(
        self,
        paths: Sequence[Path],
        targets: Sequence[Target],
        spec: DetectionSpec,
        source: str | None = None,
        fix: str = "restore it or remove its annotation",
    ) -> None:
        for path in paths:
            if not Path(path).is_file():
                raise UserError(f"image {path} is missing: {fix}")
        self.paths, self.targets, self.spec = list(paths), list(targets), spec
        self.source, self.fix = source, fix

    def __len__(self) -> int:
        return len(self.targets)

    def uint8_image(self, index: int) -> Tensor:
        """Image ``index`` decoded as uint8 RGB CHW."""
        return read_image(self.paths[index])

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        return self.uint8_image(index).float().div_(255), _copy(self.targets[index])

    def subset(self, indices: Sequence[int]) -> FileDetectionSet:
        """The images at ``indices``, in that order."""
        return FileDetectionSet(
            [self.paths[i] for i in indices],
            [self.targets[i] for i in indices],
            self.spec,
            self.source,
            self.fix,
        )


AnyDetectionSet = DetectionSet | FileDetectionSet


@dataclass(eq=False)
class DetectionBundle:
    """A detection dataset's spec and its three splits."""

    spec: DetectionSpec
    train: AnyDetectionSet
    val: AnyDetectionSet
    test: AnyDetectionSet


def flip_horizontal(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """The image mirrored left-right and its boxes with it (x -> width - x)."""
    width = image.shape[-1]
    boxes = target["boxes"]
    flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    return image.flip(-1), {**target, "boxes": flipped}


def detection_collate(items: Sequence[tuple[Tensor, Target]]) -> DetectionBatch:
    """``[(image, target), ...]`` as the contract's ``(images, targets)`` lists."""
    return [image for image, _ in items], [target for _, target in items]


class DetectionBatches:
    """Batches ``(images, targets)`` of a detection set, in order (one pass = one epoch), for
    evaluation; ``num_workers`` processes decode image files. Training batches, shuffled and
    flipped per epoch: :class:`DetectionSource`."""

    def __init__(self, data: Dataset, batch_size: int, *, num_workers: int = 0) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch size {batch_size!r} is invalid: use a positive integer")
        self.loader = DataLoader(
            data, batch_size=batch_size, num_workers=num_workers, collate_fn=detection_collate
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[DetectionBatch]:
        return iter(self.loader)


_CONTRACT = (
    "yield (images, targets): a list of C x H x W tensors and a list of dicts with boxes "
    "[N, 4] (x1, y1, x2, y2) and int64 labels [N] >= 1"
)


def check_detection_batch(batch: Any) -> DetectionBatch:
    """``batch`` itself if it follows the contract in the module docstring; else UserError."""
    if not (isinstance(batch, list | tuple) and len(batch) == 2):
        raise UserError(
            f"a detection batch is a {type(batch).__name__}, not (images, targets): {_CONTRACT}"
        )
    images, targets = batch
    if not images or len(images) != len(targets):
        raise UserError(
            f"a detection batch has {len(images)} images, {len(targets)} targets: {_CONTRACT}"
        )
    for image, target in zip(images, targets, strict=True):
        if not isinstance(image, Tensor) or image.dim() != 3 or not image.is_floating_point():
            raise UserError(f"a detection image is not a float C x H x W tensor: {_CONTRACT}")
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise UserError(f"a target's boxes are not an [N, 4] tensor: {_CONTRACT}")
        if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1]:
            raise UserError(f"a target's labels are not one per box: {_CONTRACT}")
        if len(labels) and int(labels.min()) < 1:
            raise UserError(
                f"a target has label {int(labels.min())}, but 0 is the background: {_CONTRACT}"
            )
        if bool((boxes[:, 2:] <= boxes[:, :2]).any()):
            raise UserError(f"a target has a box of zero or negative width or height: {_CONTRACT}")
    return list(images), list(targets)


def detection_to_device(batch: DetectionBatch, device: torch.device | None) -> DetectionBatch:
    images, targets = batch
    if device is None:
        return list(images), list(targets)
    return (
        [image.to(device, non_blocking=True) for image in images],
        [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets],
    )


class DetectionSource(BatchSource):
    """Training batches of a map-style detection set: shuffled and flipped per epoch.

    Epoch ``e``'s order and flips are drawn up front from :func:`epoch_generator` (seed, e), in
    this process, so they do not depend on ``num_workers``; with ``shard`` each rank loads its
    rows of every global batch, flipped as a single process would flip them. The last short
    batch is dropped (BatchNorm in training needs more than one image).
    """

    what = "the detection set"
    drop_last = True

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        *,
        seed: int = 0,
        hflip: bool = True,
        num_workers: int = 0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch size {batch_size!r} is invalid: use a positive integer")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.hflip, self.num_workers = hflip, num_workers

    def __len__(self) -> int:
        return num_batches(range(len(self.data)), self.batch_size, drop_last=True, shard=self.shard)

    def epoch(self, index: int, device: torch.device | None = None) -> Iterator[DetectionBatch]:
        generator = epoch_generator(self.seed, index)
        order = torch.randperm(len(self.data), generator=generator).tolist()
        flips = torch.rand(len(self.data), generator=generator) < 0.5
        (rank, world), size = self.shard, self.batch_size
        parts = [
            order[start + rank * size : start + (rank + 1) * size]
            for start in range(0, len(self) * size * world, size * world)
        ]
        loader = DataLoader(
            self.data,
            batch_sampler=parts,
            num_workers=self.num_workers,
            collate_fn=detection_collate,
        )
        for part, (images, targets) in zip(parts, loader, strict=True):
            if self.hflip:
                pairs = [
                    flip_horizontal(x, t) if bool(flips[i]) else (x, t)
                    for i, x, t in zip(part, images, targets, strict=True)
                ]
                images, targets = detection_collate(pairs)
            yield detection_to_device((images, targets), device)

    def example(self, count: int = 1) -> list[Tensor]:
        return [self.data[i][0] for i in range(min(count, len(self.data)))]

    def _raw(self) -> Iterable[Any]:
        return [detection_collate([self.data[0]])] if len(self.data) else []

    def check(self) -> None:
        first = self._first()
        if first is None:
            raise UserError(f"{self.what} is empty: give it at least one image")
        check_detection_batch(first)


class DetectionBatchList(IterableSource):
    """A DataLoader or list of ``(images, targets)`` batches, used as given."""

    what = "the loader or list of detection batches"

    def __init__(self, data: Iterable[Any]) -> None:
        super().__init__(data, train=True)

    def epoch(self, index: int, device: torch.device | None = None) -> Iterator[DetectionBatch]:
        rank, world = self.shard
        for number, batch in enumerate(self.data):
            if number // world >= len(self):
                break  # every rank trains on as many batches
            if number % world == rank:
                yield detection_to_device(check_detection_batch(batch), device)

    def example(self, count: int = 1) -> list[Tensor]:
        images, _ = check_detection_batch(next(iter(self.data)))
        return [image.cpu() for image in images[:count]]

    def check(self) -> None:
        first = self._first()
        if first is None:
            raise UserError(f"{self.what} is empty: give it at least one batch")
        check_detection_batch(first)


def detection_source(
    data: Any, *, batch_size: int, seed: int = 0, num_workers: int = 0, shard: Shard = SINGLE
) -> BatchSource:
    """Training batches of any detection data: a detection set (or any map-style Dataset of
    ``(image, target)`` items), or a DataLoader / list of ``(images, targets)`` batches."""
    if isinstance(data, DetectionBundle):
        raise UserError(
            "a whole DetectionBundle was passed: pass its .train to train, its .val or .test "
            "to evaluate"
        )
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        source: BatchSource = DetectionSource(data, batch_size, seed=seed, num_workers=num_workers)
    elif isinstance(data, Iterable) and not isinstance(data, str | bytes | dict | Tensor):
        source = DetectionBatchList(data)
    else:
        raise UserError(
            f"cannot read detection batches from a {type(data).__name__}: pass a detection "
            "set, a map-style Dataset of (image, target) items, or a DataLoader / list of "
            "(images, targets) batches"
        )
    return source.sharded(shard)
