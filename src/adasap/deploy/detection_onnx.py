"""ONNX export of a saved (pruned) detector, checked with onnxruntime.

The graph takes one image (``1 x 3 x H x W``, float in [0, 1]; torchvision's resizing and
normalisation are inside) and returns ``boxes`` ``[N, 4]``, ``scores`` ``[N]`` and ``labels``
``[N]``, ``N`` varying with the image. It is written by PyTorch's TorchScript-based exporter,
as for classifiers. Verified for ``tiny_ssd`` and the five torchvision detectors
(docs/detection.md); a detector the exporter cannot trace gives a one-line
:class:`UserError`. The check compares the detections as sets (:func:`detection_difference`):
near-tied scores may legitimately come out in another order.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adasap.deploy.onnx import MAX_OPSET, MIN_OPSET, ExportReport, onnx_session
from adasap.deploy.serialization import load_model, read_description
from adasap.errors import UserError, exception_summary
from adasap.io import atomic_write

OUTPUTS = ("boxes", "scores", "labels")


def export_detector_onnx(
    directory: str | Path,
    path: str | Path,
    *,
    opset: int = MIN_OPSET,
    check: bool = True,
    tolerance: float = 1e-3,
) -> ExportReport:
    """Export the detector saved in ``directory`` to ``path``; with ``check``, compare
    onnxruntime's boxes, scores and labels with PyTorch's on a random image, as sets
    (:func:`detection_difference`: scores, and boxes in units of the image side, within
    ``tolerance``)."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"ONNX opset {opset} is not supported: use {MIN_OPSET} to {MAX_OPSET}")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory; give a file path like out.onnx")
    architecture = read_description(directory)["architecture"]
    model = copy.deepcopy(load_model(directory)).cpu().eval()
    side = int(architecture["image_size"])
    shape = (int(architecture["in_channels"]), side, side)
    example = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))

    def export(tmp: Path) -> None:
        with warnings.catch_warnings():  # tracer warnings about box decoding's Python loops
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _NamedOutputs(model).eval(),
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["images"],
                output_names=list(OUTPUTS),
                dynamic_axes={name: {0: "detections"} for name in OUTPUTS},
            )

    try:
        written = atomic_write(path, export, fix="choose a writable file path for --onnx")
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        raise UserError(
            f"ONNX export of {architecture['name']} is not supported ({exception_summary(exc)}): "
            "docs/detection.md lists the detectors that export"
        ) from exc
    if not check:
        return ExportReport.written(written, opset, shape, None, tolerance, (1,))
    diff, compared = _max_difference(model, written, example, tolerance)
    return ExportReport.written(written, opset, shape, diff, tolerance, (1,), compared)


class _NamedOutputs(nn.Module):
    """The detector's detections for one image as the tuple ``OUTPUTS`` names.

    The exporter flattens the detections dict in its own key order, and ``output_names``
    names the results by position: Faster R-CNN orders its dict boxes, labels, scores, so
    exporting it directly would call its labels "scores" and its scores "labels".
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        detections = self.detector(images)[0]
        return tuple(detections[name] for name in OUTPUTS)


def _max_difference(
    model: nn.Module, path: Path, image: torch.Tensor, tolerance: float
) -> tuple[float, int]:
    """How far onnxruntime's detections are from PyTorch's on ``image``, and over how many
    of PyTorch's (:func:`detection_difference`)."""
    import onnx

    onnx.checker.check_model(str(path))
    got = onnx_session(path).run(list(OUTPUTS), {"images": image.numpy()})
    with torch.inference_mode():
        expected = model(image)[0]
    expected = {name: expected[name].numpy() for name in OUTPUTS}
    got = dict(zip(OUTPUTS, got, strict=True))
    return detection_difference(expected, got, max(image.shape[-2:]), tolerance)


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
