"""ONNX export of a saved (pruned) detector, checked with onnxruntime.

The graph takes one image (``1 x 3 x H x W``, float in [0, 1]; torchvision's resizing and
normalisation are inside) and returns ``boxes`` ``[N, 4]``, ``scores`` ``[N]`` and ``labels``
``[N]``, ``N`` varying with the image. It is written by PyTorch's TorchScript-based exporter,
as for classifiers. Verified for ``tiny_ssd`` (docs/detection.md); a detector the exporter
cannot trace gives a one-line :class:`UserError`.
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
    onnxruntime's boxes, scores and labels with PyTorch's on a random image."""
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
                model,
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
    diff = _max_difference(model, written, example) if check else None
    return ExportReport.written(written, opset, shape, diff, tolerance, (1,))


def _max_difference(model: nn.Module, path: Path, image: torch.Tensor) -> float:
    """The largest |onnxruntime - PyTorch| over boxes, scores and labels (inf when the numbers
    of detections differ)."""
    import onnx

    onnx.checker.check_model(str(path))
    got = onnx_session(path).run(list(OUTPUTS), {"images": image.numpy()})
    with torch.inference_mode():
        expected = model(image)[0]
    worst = 0.0
    for name, value in zip(OUTPUTS, got, strict=True):
        reference = expected[name].numpy()
        if value.shape != reference.shape:
            return float("inf")
        if value.size:
            worst = max(worst, float(np.abs(value.astype(np.float64) - reference).max()))
    return worst
