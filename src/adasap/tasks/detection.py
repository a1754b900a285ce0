"""Object detection: torchvision's ``(images, targets)`` batches, the summed loss dict, mAP.

A batch is ``(images, targets)``: ``images`` a list of float ``C x H x W`` tensors in [0, 1],
``targets`` a list of dicts with ``boxes`` (float ``[N, 4]``, ``x1, y1, x2, y2`` in pixels)
and ``labels`` (int64 ``[N]``, classes 1..K; 0 is the background). The training loss is the
detector's summed loss dict in training mode; the clean score is mAP from torchmetrics'
``MeanAveragePrecision`` on the pycocotools backend (``map_50``, VOC's IoU 0.5, the headline;
``map``, COCO's mean over IoU 0.50:0.95; ``map_75``), COCO's 101-point interpolation, up to 100
detections per image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from adasap.data.batching import Shard
from adasap.data.detection import (
    DetectionBatch,
    DetectionBatches,
    DetectionBundle,
    Target,
    detection_source,
)
from adasap.data.sources import BatchSource
from adasap.errors import UserError, exception_reason, exception_summary
from adasap.method.output_layers import detector_output_layers, modules_outside
from adasap.method.target import PartSizeTarget, PruningTarget
from adasap.models.detection import build_detector
from adasap.tasks.base import TASKS, StepOutput, Task
from adasap.tasks.evaluate import model_device

KeepReference = Literal["model", "backbone"]
MAP_KEYS = ("map_50", "map", "map_75")
_SUPPORTED = (
    "a detection set (adasap.data.detection), a map-style Dataset of (image, target) items, "
    "or a DataLoader / list of (images, targets) batches"
)


@TASKS.register("detection")
@dataclass
class DetectionTask(Task):
    """torchvision-style detectors. ``keep_reference="backbone"``: ``keep`` is a fraction of
    ``model.backbone``'s size (with the FPN or SSD extra layers) and nothing outside it loses
    neurons; ``num_workers`` load a detection set's images."""

    keep_reference: KeepReference = "model"
    num_workers: int = 0

    name: ClassVar[str] = "detection"
    headline: ClassVar[str] = "map_50"
    training_accuracy: ClassVar[bool] = False
    # post-processing grows with the boxes above the score threshold
    timed_by_architecture: ClassVar[bool] = False
    # its ONNX graph takes one image (and decodes boxes): timed in PyTorch alone
    onnx_timing: ClassVar[bool] = False
    # Magnitude scores and no phase-3 ASAM, float32: only the classification sweeps chose
    # Taylor scores and ASAM (docs/tuning.md), and the effect of reduced precision on box
    # regression has not been measured; no sweep has tuned detectors. Images of any size
    # come as a list, in the contiguous layout. A detector is timed in PyTorch (its ONNX graph
    # takes one image), where no speed was measured per target or channel block: it keeps the
    # parameter target and exact channel counts its results were measured with.
    defaults: ClassVar[dict[str, Any]] = {
        "keep_kind": "params",
        "round_to": 1,
        "criterion": "magnitude",
        "finetune_sharpness": None,
        "amp": "off",
        "channels_last": False,
    }

    def __post_init__(self) -> None:
        if self.keep_reference not in ("model", "backbone"):
            raise UserError(
                f"keep_reference must be model or backbone, got {self.keep_reference!r}"
            )

    def training_source(
        self, data: Any, *, batch_size: int, seed: int, shard: Shard
    ) -> BatchSource:
        return detection_source(
            data, batch_size=batch_size, seed=seed, num_workers=self.num_workers, shard=shard
        )

    def split(self, data: Any, val: Any) -> tuple[Any, Any, int | None]:
        if isinstance(data, DetectionBundle):
            return data.train, data.val if val is None else val, data.spec.num_classes
        return data, val, None

    def to_device(self, example: list[Tensor], device: torch.device) -> list[Tensor]:
        return [image.to(device) for image in example]

    def output_layers(
        self, model: nn.Module, example: list[Tensor], num_classes: int | None
    ) -> list[nn.Module]:
        return detector_output_layers(model)

    def ignored_layers(
        self,
        model: nn.Module,
        example: list[Tensor],
        num_classes: int | None,
        given: list[nn.Module] | None,
    ) -> list[nn.Module]:
        # the heads' outputs stay whole whatever else the user protects
        return [*detector_output_layers(model), *(given or [])]

    def target(
        self, model: nn.Module, example: list[Tensor], keep: float, keep_kind: str
    ) -> float | PruningTarget:
        if self.keep_reference == "model":
            return keep
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise UserError(
                f"{type(model).__name__} has no .backbone module: use keep_reference='model'"
            )
        return PartSizeTarget(keep, keep_kind, model, backbone, example)

    def outside_target(self, model: nn.Module, target: float | PruningTarget) -> list[nn.Module]:
        return modules_outside(model, target.part) if isinstance(target, PartSizeTarget) else []

    def forward(self, model: nn.Module, batch: DetectionBatch, fraction: float) -> Any:
        images, targets = _part(batch, fraction)
        return model(images, targets)

    def loss(
        self,
        output: Mapping[str, Tensor],
        batch: DetectionBatch,
        fraction: float,
        check: bool,
        count: bool,
    ) -> StepOutput:
        return StepOutput(sum(v.float() for v in output.values()), len(_part(batch, fraction)[0]))

    def failed(self, model: nn.Module, batch: Any, phase: str, exc: Exception) -> None:
        if isinstance(exc, RuntimeError | ValueError | AssertionError):
            raise UserError(
                f"the detector failed on a training batch in phase {phase} "
                f"({exception_summary(exc)}): give batches as in docs/detection.md, of at least "
                "2 images (BatchNorm in training needs more than one value)"
            ) from exc

    def score(
        self,
        model: nn.Module,
        data: Any,
        *,
        device: torch.device,
        channels_last: bool = False,
        sharded: bool = False,
    ) -> dict[str, float]:
        # mAP does not add up over parts of the images: under torchrun every rank scores all
        return score_batches(model, detection_batches(data, 8), device)

    onnx_outputs: ClassVar[tuple[str, ...]] = ("boxes", "scores", "labels")
    # one image in (torchvision's resizing and normalisation are in the graph); the number of
    # detections varies with the image
    onnx_dynamic_axes: ClassVar[dict[str, dict[int, str]]] = dict.fromkeys(
        onnx_outputs, {0: "detections"}
    )
    onnx_check_batches: ClassVar[tuple[int, ...]] = (1,)
    onnx_tolerance: ClassVar[float] = 1e-3

    def build_saved(self, architecture: dict[str, Any]) -> nn.Module:
        return build_detector(
            architecture["name"],
            num_classes=architecture["num_classes"],
            image_size=architecture["image_size"],
        )

    def replay_inputs(
        self, model: nn.Module, architecture: dict[str, Any]
    ) -> tuple[list[Tensor], list[nn.Module]]:
        size, channels = architecture["image_size"], architecture["in_channels"]
        return [torch.rand(channels, size, size)], detector_output_layers(model)

    def onnx_module(self, model: nn.Module) -> nn.Module:
        return _NamedOutputs(model)

    def onnx_difference(
        self,
        images: Tensor,
        expected: dict[str, np.ndarray],
        got: dict[str, np.ndarray],
        tolerance: float,
    ) -> tuple[float, int]:
        return detection_difference(expected, got, max(images.shape[-2:]), tolerance)


def _part(batch: DetectionBatch, fraction: float) -> DetectionBatch:
    """The first ``fraction`` of the batch's images (at least one), as ``sub_batch`` cuts."""
    images, targets = batch
    if fraction >= 1:
        return images, targets
    count = max(1, math.ceil(fraction * len(images)))
    return images[:count], targets[:count]


def detection_batches(data: Any, batch_size: int) -> Iterable[DetectionBatch]:
    """Batches of ``data``, in order, unaugmented: a map-style Dataset is batched here."""
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        return DetectionBatches(data, batch_size)
    if isinstance(data, Iterable) and not isinstance(data, str | bytes | dict):
        return data
    raise UserError(f"cannot evaluate {type(data).__name__}: pass {_SUPPORTED}")


def check_scored_batch(batch: Any) -> DetectionBatch:
    """A batch to score: ``(images, targets)`` with boxes and labels (any image dtype)."""
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
                images, targets = check_scored_batch(batch)
                outputs = model([x.to(device) for x in images])
                predictions = [
                    {k: out[k].detach().cpu() for k in ("boxes", "scores", "labels")}
                    for out in outputs
                ]
                metric.update(predictions, [_metric_target(t) for t in targets])
    finally:
        model.train(training)
    result = metric.compute()
    return {key: float(result[key]) for key in MAP_KEYS}


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
    return score_batches(model, detection_batches(data, batch_size), device)


class _NamedOutputs(nn.Module):
    """The detector's detections for one image as the tuple ``DetectionTask.onnx_outputs``
    names.

    The exporter flattens the detections dict in its own key order, and ``output_names``
    names the results by position: Faster R-CNN orders its dict boxes, labels, scores, so
    exporting it directly would call its labels "scores" and its scores "labels".
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        detections = self.detector(images)[0]
        return tuple(detections[name] for name in DetectionTask.onnx_outputs)


def detection_difference(
    expected: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    image_side: int,
    tolerance: float,
) -> tuple[float, int]:
    """The largest difference between two sets of detections, whatever their order, and the
    number of ``expected``'s detections compared.

    Every detection is paired with the closest one of the same label in the other set; the
    difference of a pair is the largest of its score difference and its box coordinates'
    differences in units of ``image_side`` (so scores and boxes share one tolerance). The
    result is the worst pair either way round, ``inf`` when a detection has no partner of its
    label. Two differences are legitimate and ignored, because detections whose scores tie
    within float rounding may come out either way from the two runtimes' sorts: the order,
    and which of the weakest detections make the cut (the score threshold, the limit on
    detections per image), so detections scoring within ``tolerance`` of the weakest one of
    both sets are not compared (they may be missing from the other set).
    """
    scores = np.concatenate([expected["scores"], got["scores"]])
    if not scores.size:
        return 0.0, 0
    floor = scores.min() + tolerance
    worst = 0.0
    for one, other in ((expected, got), (got, expected)):
        strong = one["scores"] > floor
        if not strong.any():
            continue
        if not other["scores"].size:
            return float("inf"), 0
        distance = np.abs(_rows(one, image_side)[strong][:, None] - _rows(other, image_side)[None])
        distance = distance.max(axis=2)
        distance[one["labels"][strong][:, None] != other["labels"][None, :]] = np.inf
        worst = max(worst, float(distance.min(axis=1).max()))
    return worst, int((expected["scores"] > floor).sum())


def _rows(detections: dict[str, np.ndarray], image_side: int) -> np.ndarray:
    """One row per detection: its box in units of ``image_side``, then its score."""
    boxes = detections["boxes"].astype(np.float64) / image_side
    return np.concatenate([boxes, detections["scores"].astype(np.float64)[:, None]], axis=1)
