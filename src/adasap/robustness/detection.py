"""Detection's robustness to corruptions (Michaelis et al. 2019).

mAP is :func:`adasap.tasks.detection.score_batches`. The corrupted-detection protocol
renders each benchmark corruption x severity from the clean test images with our suite
(:mod:`.corruptions`) through the cell loop every task shares
(:class:`~adasap.robustness.evaluation.CorruptionEvaluator`), keeps the boxes, and reports P
(clean), mPC (mean over the 15 x 5) and rPC = mPC / P in a
:class:`~adasap.robustness.detection_report.DetectionCorruptionReport`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adasap.data.detection import DetectionBatch, Target
from adasap.errors import UserError, quote
from adasap.robustness.corruptions import SEVERITIES, image_fingerprint, to_uint8
from adasap.robustness.detection_report import METRICS, DetectionCorruptionReport
from adasap.robustness.evaluation import CorruptionEvaluator, RenderPart, TaskImages
from adasap.tasks.detection import check_scored_batch, detection_batches, score_batches

# Images rendered by one render_cached call at most: its float copy of VOC-sized images then
# stays under about 600 MB.
_RENDER_GROUP = 256


class DetectionImages(TaskImages):
    """Detection's side of the cell loop: the test images as uint8 CHW (CPU), held in render
    parts by size, their targets (unchanged by corruptions), mAP over batches of ``batch_size``.

    Images of different sizes (VOC, COCO) are rendered per size, in parts of at most 256
    images (cache keys ``<dataset_key>-<H>x<W>-<part>``); a set of one size in one part keeps
    the plain key. The median shorter side picks the severity table for the whole set.
    """

    def __init__(self, data: Any, batch_size: int = 8) -> None:
        super().__init__(batch_size)
        images, self.targets = _gather(data, batch_size)
        if not images:
            raise UserError("no images to evaluate: the test set is empty")
        self._parts = _render_parts(images)
        self.images = images

    def clean(self) -> Iterator[DetectionBatch]:
        return self._batches(self.images)

    def parts(self) -> list[RenderPart]:
        return [part for part, _ in self._parts]

    def corrupted(self, rendered: Sequence[Tensor]) -> Iterator[DetectionBatch]:
        out = list(self.images)
        for (_, indices), part in zip(self._parts, rendered, strict=True):
            for i, image in zip(indices, part, strict=True):
                out[i] = image
        return self._batches(out)

    def score(
        self, model: nn.Module, data: Any, *, device: torch.device, sharded: bool = False
    ) -> tuple[dict[str, float], int]:
        # mAP does not add up over parts of the images: under torchrun every rank scores all
        return score_batches(model, data, device), len(self.images)

    def _batches(self, images: Sequence[Tensor]) -> Iterator[DetectionBatch]:
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            yield [x.float().div_(255) for x in images[start:end]], self.targets[start:end]


def _gather(data: Any, batch_size: int) -> tuple[list[Tensor], list[Target]]:
    """All test images as uint8 CHW (CPU) and their targets, in order."""
    if hasattr(data, "uint8_image") and hasattr(data, "targets"):
        images = [data.uint8_image(i) for i in range(len(data))]
        return images, [dict(t) for t in data.targets]
    images, targets = [], []
    for batch in detection_batches(data, batch_size):
        xs, ts = check_scored_batch(batch)
        images += [x.cpu() if x.dtype == torch.uint8 else to_uint8(x.detach().cpu()) for x in xs]
        targets += ts
    return images, targets


def _render_parts(images: list[Tensor]) -> list[tuple[RenderPart, list[int]]]:
    """The images by size, in parts of at most ``_RENDER_GROUP`` (bounding the float copy a
    render holds), each with the indices of its images; one part of one size keeps the plain
    dataset key. Each image in ``images`` becomes a view of its part: the set is held once."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_shape[tuple(image.shape)].append(i)
    parts = [
        (shape, n, indices[start : start + _RENDER_GROUP])
        for shape, indices in by_shape.items()
        for n, start in enumerate(range(0, len(indices), _RENDER_GROUP))
    ]
    out = []
    for shape, n, indices in parts:
        suffix = "" if len(parts) == 1 else f"-{shape[1]}x{shape[2]}-{n}"
        stack = torch.stack([images[i] for i in indices])
        for k, i in enumerate(indices):
            images[i] = stack[k]
        out.append((RenderPart(stack, suffix, image_fingerprint(stack)), indices))
    return out


def evaluate_detection_corruptions(
    model: nn.Module,
    data: Any,
    *,
    dataset_key: str,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    metric: str = "map_50",
    batch_size: int = 8,
    device: torch.device | str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    params: str = "auto",
    progress: bool = True,
    console: Any = None,
) -> DetectionCorruptionReport:
    """mAP of ``model`` on the clean test images of ``data`` and on every corruption x severity.

    The protocol of Michaelis et al. 2019 ("Benchmarking Robustness in Object Detection"):
    each corruption is applied to the test images, the boxes stay as they are. ``metric``
    ("map_50" for VOC, "map" for COCO) makes the headline numbers: P on clean images, mPC the
    mean over the 15 benchmark corruptions x 5 severities, rPC = mPC / P; the 4 extra
    corruptions and any held-out family named in ``corruptions`` (e.g. ``CBAR_CORRUPTIONS``)
    are averaged apart. ``corruptions`` defaults to the 15 benchmark and 4 extra ones.

    Images are rendered once per (``dataset_key``, corruption, severity, seed) by
    :func:`~adasap.robustness.corruptions.render_cached`, one file per image size (VOC's
    images vary; in parts of 256 images), so every model sees identical images. ``params``
    ("auto": by the median shorter image side) picks one severity table for the whole set.
    """
    if metric not in METRICS:
        raise UserError(f"unknown metric {quote(metric)}: choose one of {', '.join(METRICS)}")
    evaluator = CorruptionEvaluator(
        dataset_key, corruptions, severities, seed, cache_dir, params, progress, console
    )
    found = evaluator(model, DetectionImages(data, batch_size), device=device)
    return DetectionCorruptionReport(
        dataset_key=dataset_key,
        source=getattr(data, "source", None) or "user-provided images",
        metric=metric,
        clean=found.clean,
        results=found.results,
        num_images=found.num_images,
        params_table=found.params_table,
        seed=seed,
    )
