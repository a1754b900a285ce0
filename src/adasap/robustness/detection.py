"""Detection accuracy (mAP) and its robustness to corruptions (Michaelis et al. 2019).

mAP comes from torchmetrics' ``MeanAveragePrecision`` on the pycocotools backend: ``map_50``
(IoU 0.5, the VOC threshold) and ``map`` (COCO's mean over IoU 0.50:0.95), both with COCO's
101-point interpolation and up to 100 detections per image. The corrupted-detection protocol
renders each benchmark corruption x severity from the clean test images with our suite
(:mod:`.corruptions`), keeps the boxes, and reports P (clean), mPC (mean over the 15 x 5) and
rPC = mPC / P in a :class:`~adasap.robustness.detection_report.DetectionCorruptionReport`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import torch
from torch import Tensor, nn

from adasap.data.detection import DetectionBatch, DetectionBatches, Target
from adasap.errors import UserError, exception_reason
from adasap.robustness.corruptions import (
    SEVERITIES,
    image_fingerprint,
    render_cached,
    resolve_param_table,
    to_uint8,
)
from adasap.robustness.detection_report import METRICS, DetectionCorruptionReport
from adasap.robustness.official import check_request
from adasap.training.evaluate import model_device
from adasap.training.progress import cell_progress

# Images rendered by one render_cached call at most: its float copy of VOC-sized images then
# stays under about 600 MB.
_RENDER_GROUP = 256
_SUPPORTED = (
    "a detection set (adasap.data.detection), a map-style Dataset of (image, target) items, "
    "or a DataLoader / list of (images, targets) batches"
)


def _batches(data: Any, batch_size: int) -> Iterable[DetectionBatch]:
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        return DetectionBatches(data, batch_size)
    if isinstance(data, Iterable):
        return data
    raise UserError(f"cannot evaluate {type(data).__name__}: pass {_SUPPORTED}")


def _check_batch(batch: Any) -> DetectionBatch:
    ok = isinstance(batch, tuple | list) and len(batch) == 2
    images, targets = batch if ok else (None, None)
    if not (
        ok
        and isinstance(images, list | tuple)
        and isinstance(targets, list | tuple)
        and len(images) == len(targets)
        and all(isinstance(x, Tensor) and x.dim() == 3 for x in images)
        and all(isinstance(t, dict) and {"boxes", "labels"} <= set(t) for t in targets)
    ):
        raise UserError(
            "a detection batch must be (images, targets): a list of CHW float images and a list "
            "of dicts with boxes and labels, one per image; use adasap.data.detection's batches"
        )
    return list(images), list(targets)


def _metric_target(target: Target) -> Target:
    keys = ("boxes", "labels", "iscrowd") if "iscrowd" in target else ("boxes", "labels")
    return {k: target[k].cpu() for k in keys}


def score_batches(
    model: nn.Module, batches: Iterable[Any], device: torch.device | str | None = None
) -> dict[str, float]:
    """mAP of ``model`` over ``batches`` of ``(images, targets)``: ``map_50``, ``map``,
    ``map_75`` in [0, 1] (-1 when there is no ground truth). Eval mode (restored after),
    ``no_grad``, images moved to ``device`` (default: the model's)."""
    device = torch.device(device) if device is not None else model_device(model)
    try:
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    except ImportError as exc:  # torchmetrics raises ModuleNotFoundError without pycocotools
        raise UserError(
            f"detection mAP needs torchmetrics and pycocotools ({exception_reason(exc)}): "
            "pip install torchmetrics pycocotools"
        ) from None
    # Scoring the 100 best detections per image is COCO's protocol (docs/detection-evaluation.md),
    # not a problem to warn about for every detector that returns more.
    metric.warn_on_many_detections = False
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                images, targets = _check_batch(batch)
                outputs = model([x.to(device) for x in images])
                predictions = [
                    {k: out[k].detach().cpu() for k in ("boxes", "scores", "labels")}
                    for out in outputs
                ]
                metric.update(predictions, [_metric_target(t) for t in targets])
    finally:
        model.train(training)
    result = metric.compute()
    return {key: float(result[key]) for key in (*METRICS, "map_75")}


def evaluate_detection(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """mAP of ``model`` on ``data``: ``{"map_50", "map", "map_75"}``, each in [0, 1].

    ``data`` is a detection set (:mod:`adasap.data.detection`), a map-style Dataset of
    ``(image, target)`` items, or a DataLoader / list of ``(images, targets)`` batches.
    """
    return score_batches(model, _batches(data, batch_size), device)


def _gather(data: Any, batch_size: int) -> tuple[list[Tensor], list[Target]]:
    """All test images as uint8 CHW (CPU) and their targets, in order."""
    if hasattr(data, "uint8_image") and hasattr(data, "targets"):
        images = [data.uint8_image(i) for i in range(len(data))]
        return images, [dict(t) for t in data.targets]
    images, targets = [], []
    for batch in _batches(data, batch_size):
        xs, ts = _check_batch(batch)
        images += [x.cpu() if x.dtype == torch.uint8 else to_uint8(x.detach().cpu()) for x in xs]
        targets += ts
    return images, targets


def _as_batches(
    images: Sequence[Tensor], targets: Sequence[Target], batch_size: int
) -> Iterator[DetectionBatch]:
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        yield [x.float().div_(255) for x in chunk], list(targets[start : start + batch_size])


@dataclass(frozen=True)
class _RenderGroup:
    """Images of one size rendered together: their cache key, indices and fingerprint."""

    key: str
    indices: list[int]
    fingerprint: str


def _render_groups(images: Sequence[Tensor], dataset_key: str) -> list[_RenderGroup]:
    """The images by size, in parts of at most ``_RENDER_GROUP`` (bounding the float copy a
    render holds); one part of one size keeps the plain ``dataset_key``."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_shape[tuple(image.shape)].append(i)
    parts = [
        (shape, n, indices[start : start + _RENDER_GROUP])
        for shape, indices in by_shape.items()
        for n, start in enumerate(range(0, len(indices), _RENDER_GROUP))
    ]
    groups = []
    for shape, n, indices in parts:
        key = dataset_key if len(parts) == 1 else f"{dataset_key}-{shape[1]}x{shape[2]}-{n}"
        fingerprint = image_fingerprint(torch.stack([images[i] for i in indices]))
        groups.append(_RenderGroup(key, indices, fingerprint))
    return groups


def _corrupted(
    groups: Sequence[_RenderGroup],
    images: Sequence[Tensor],
    name: str,
    severity: int,
    *,
    seed: int,
    table: str,
    cache_dir: str | Path | None,
    device: torch.device,
) -> list[Tensor]:
    """Every image corrupted (uint8 CHW), in order, each group through the render cache."""
    out: list[Tensor] = list(images)
    for group in groups:
        stack = torch.stack([images[i] for i in group.indices]).float().div_(255)
        rendered = render_cached(
            stack,
            group.key,
            name,
            severity,
            seed,
            cache_dir,
            params=table,
            device=device,
            fingerprint=group.fingerprint,
        )
        for i, image in zip(group.indices, rendered, strict=True):
            out[i] = image
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
        raise UserError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    corruptions = check_request(corruptions, severities, batch_size)
    device = torch.device(device) if device is not None else model_device(model)
    images, targets = _gather(data, batch_size)
    if not images:
        raise UserError("no images to evaluate: the test set is empty")
    groups = _render_groups(images, dataset_key)
    shorter = median(min(x.shape[-2:]) for x in images)
    table = resolve_param_table(params, int(shorter), int(shorter))

    cells = [(name, s) for name in corruptions for s in severities]
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in corruptions}
    with cell_progress(console, disable=not progress) as bar:
        task = bar.add_task("clean", total=1 + len(cells))
        clean = score_batches(model, _as_batches(images, targets, batch_size), device)
        bar.advance(task)
        for name, s in cells:
            bar.update(task, description=f"{name} s{s}")
            corrupted = _corrupted(
                groups,
                images,
                name,
                s,
                seed=seed,
                table=table,
                cache_dir=cache_dir,
                device=device,
            )
            batches = _as_batches(corrupted, targets, batch_size)
            results[name][s] = score_batches(model, batches, device)
            bar.advance(task)
    return DetectionCorruptionReport(
        dataset_key=dataset_key,
        source=getattr(data, "source", None) or "user-provided images",
        metric=metric,
        clean=clean,
        results=results,
        num_images=len(images),
        params_table=table,
        seed=seed,
    )
