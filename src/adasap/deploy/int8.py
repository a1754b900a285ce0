"""INT8 models: ONNX Runtime's static quantization of an fp32 ONNX export.

The recipe is the one ONNX Runtime recommends for x86 CPUs: its pre-processing (shape
inference and graph optimisation), then ``quantize_static`` in the QDQ format (each quantized
tensor wrapped in QuantizeLinear/DequantizeLinear pairs, which onnxruntime fuses into integer
kernels and OpenVINO reads too), weights as signed INT8 per output channel, activations as
unsigned INT8 with ranges calibrated (min/max) on real images. ``reduce_range`` stays off:
CPUs with VNNI (AVX-512 VNNI, AVX-VNNI) accumulate 8-bit products without the saturation that
7-bit weights avoid on older ones.

This module imports onnx and onnxruntime at the top: import it where quantization happens.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import Tensor, nn

from adasap.deploy.onnx import ExportReport, InputShape, any_nan, onnx_session, write_onnx
from adasap.deploy.runtimes import INT8_TOLERANCE
from adasap.errors import UserError, exception_summary
from adasap.io import atomic_write
from adasap.tasks import Task

# What is quantized: the network's compute (convolutions, matrix products) and the layers
# between them that keep tensors in INT8 (activations, pooling, resizing). ONNX Runtime would
# also quantize reshapes, gathers, TopK and Where, which in a detector's post-processing rank
# scores in 8 bits and, on an image without detections, crash onnxruntime (a segmentation
# fault in its fused INT8 kernels on empty tensors: RetinaNet, Faster R-CNN).
QUANTIZED_OPS = (
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Clip", "MaxPool", "AveragePool",
    "Resize", "Pad",
)  # fmt: skip
# images per calibration pass where the graph takes batches; min/max calibration keeps two
# numbers per tensor, so memory does not grow with the number of batches
CALIBRATION_BATCH = 32
# one calibration image in HELD_BACK is held back for the INT8 export's check
HELD_BACK = 5
# images drawn when a timing-only deployment has no calibration images: time does not depend
# on the values the ranges come from
RANDOM_CALIBRATION = 32


class _ImageBatches(CalibrationDataReader):
    """The calibration images, batch after batch, as onnxruntime's calibrator reads them."""

    def __init__(self, images: Tensor, input_name: str, batch_size: int) -> None:
        self.arrays = [
            chunk.contiguous().numpy() for chunk in images.detach().cpu().float().split(batch_size)
        ]
        self.input_name = input_name
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position == len(self.arrays):
            return None
        self.position += 1
        return {self.input_name: self.arrays[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def _input_dims(path: Path, input_name: str) -> list[int | None]:
    """The graph input's dimensions, ``None`` where they vary (a dynamic batch axis)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    for graph_input in graph.input:
        if graph_input.name == input_name:
            dims = graph_input.type.tensor_type.shape.dim
            return [d.dim_value if d.HasField("dim_value") else None for d in dims]
    raise UserError(f"{path} has no input {input_name!r}: export it with adasap's export_onnx")


def _check_calibration(calibration: Tensor, dims: Sequence[int | None]) -> None:
    shape = tuple(calibration.shape)
    fits = len(shape) == len(dims) and all(
        d is None or d == s for d, s in zip(dims[1:], shape[1:], strict=True)
    )
    if not fits or not shape[0]:
        want = " x ".join("N" if d is None else str(d) for d in [None, *dims[1:]])
        raise UserError(
            f"calibration images of shape {shape} do not fit the model: pass {want} images in "
            "[0, 1] (a few hundred from the training data)"
        )


def _drop_inferred_shapes(path: Path) -> None:
    """Remove the intermediate shapes that shape inference recorded in the model at ``path``.

    onnxruntime trusts them when it optimises a session: with them, a detector's reshape of
    zero detections (``{0, 2, 2}`` to ``{0, -1}``) fails. They are hints; it infers its own.
    """
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    onnx.save(model, str(path))


def quantize_int8(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calibration: Tensor,
    *,
    input_name: str,
) -> Path:
    """Quantize the fp32 ONNX file ``fp32_onnx`` to INT8 (QDQ) at ``out_path``, activation
    ranges calibrated on ``calibration`` (``N x C x H x W`` in [0, 1]; a few hundred images
    of the training data), fed to the graph input ``input_name``.

    The file appears complete or not at all; intermediate files live in a temporary folder. A
    model that onnxruntime cannot quantize is a one-line :class:`UserError`.
    """
    fp32_onnx = Path(fp32_onnx)
    dims = _input_dims(fp32_onnx, input_name)
    _check_calibration(calibration, dims)
    # a graph with a fixed batch size (a detector's, one image) is calibrated at that size
    batch_size = dims[0] or CALIBRATION_BATCH
    with tempfile.TemporaryDirectory(prefix="adasap-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            # Symbolic shape inference serves transformers (its docs) and gives up on the
            # data-dependent shapes of a detector's post-processing; ONNX's own shape
            # inference, which still runs, covers convolutional networks.
            quant_pre_process(fp32_onnx, prepared, skip_symbolic_shape=True)
            quantize_static(
                prepared,
                quantized,
                _ImageBatches(calibration, input_name, batch_size),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(QUANTIZED_OPS),
            )
            _drop_inferred_shapes(quantized)
        # onnxruntime's quantization raises bare Exceptions, ValueErrors and its own errors
        except Exception as exc:
            raise UserError(
                f"onnxruntime cannot quantize {fp32_onnx.name} to INT8 "
                f"({exception_summary(exc)}): deploy it in fp32 (runtime ort or openvino)"
            ) from exc
        return atomic_write(
            out_path,
            lambda tmp_path: shutil.copyfile(quantized, tmp_path),
            fix="choose a writable path for the INT8 model",
        )


def random_calibration(input_shape: Sequence[int]) -> Tensor:
    """Random images to calibrate a model that is only timed (never to measure accuracy)."""
    return torch.rand(RANDOM_CALIBRATION, *input_shape)


def _held_back(calibration: Tensor | None, check: bool) -> tuple[Tensor, Tensor | None]:
    """The calibration images to quantize with, and those held back to check on."""
    if calibration is None or len(calibration) < (2 if check else 1):
        raise UserError(
            "an INT8 export needs calibration images: pass calibration=N x C x H x W images in "
            "[0, 1] (a few hundred from the training data; at least 2 to check the export)"
        )
    if not check:
        return calibration, None
    held = max(1, len(calibration) // HELD_BACK)
    return calibration[:-held], calibration[-held:]


def int8_difference(
    model: nn.Module, path: Path, images: Tensor, task: Task, tolerance: float
) -> tuple[float, int | None, float | None]:
    """How far the INT8 file at ``path`` is from PyTorch's ``model`` on ``images``: the
    largest difference, the detections compared (``None``: all outputs) and the top-1
    agreement (``None`` without per-image outputs).

    Per-image outputs (the graph's batch axis runs through them: a classifier's logits) are
    compared relative to their largest |value|, INT8's rounding steps growing with each
    tensor's range, and by their top-1 class; other outputs (a detector's detections) in
    the task's own measure (:meth:`~adasap.tasks.Task.onnx_difference`). A NaN fails.
    """
    onnx.checker.check_model(str(path))
    session = onnx_session(path)
    reference = task.onnx_module(copy.deepcopy(model).cpu().eval()).eval()
    names = task.onnx_outputs
    per_image = task.onnx_input in task.onnx_dynamic_axes
    diffs, counts, agreeing = [], [], 0
    for part in images.detach().cpu().float().split(CALIBRATION_BATCH if per_image else 1):
        with torch.inference_mode():
            outputs = reference(part)
        outputs = (outputs,) if isinstance(outputs, Tensor) else outputs
        expected = {name: out.numpy() for name, out in zip(names, outputs, strict=True)}
        got = dict(
            zip(names, session.run(list(names), {task.onnx_input: part.numpy()}), strict=True)
        )
        if per_image:
            want, have = expected[names[0]], got[names[0]]
            diffs.append(float(np.abs(have - want).max() / max(np.abs(want).max(), 1e-12)))
            agreeing += int((have.argmax(axis=1) == want.argmax(axis=1)).sum())
        else:
            diff, count = task.onnx_difference(part, expected, got, tolerance)
            diffs.append(diff)
            counts.append(count)
        if any_nan(expected, got):
            diffs.append(math.nan)
    compared = None if per_image or None in counts else sum(counts)
    agreement = agreeing / len(images) if per_image else None
    return float(np.max(diffs)), compared, agreement  # np.max keeps a NaN


def export_int8(
    model: nn.Module,
    path: str | Path,
    input_shape: InputShape,
    task: Task,
    calibration: Tensor | None,
    *,
    opset: int,
    check: bool,
    tolerance: float | None,
) -> ExportReport:
    """``model`` exported to ONNX and quantized to INT8 at ``path`` (what
    :func:`~adasap.deploy.onnx.export_onnx` does with ``int8=True``): calibrated on
    ``calibration`` but the last fifth, checked there (:func:`int8_difference`) when ``check``
    against ``tolerance`` (default :data:`INT8_TOLERANCE`)."""
    fit, held = _held_back(calibration, check)
    tolerance = INT8_TOLERANCE if tolerance is None else tolerance
    with tempfile.TemporaryDirectory(prefix="adasap-int8-") as tmp:
        fp32 = write_onnx(model, Path(tmp) / "fp32.onnx", input_shape, opset, task)
        written = quantize_int8(fp32, path, fit, input_name=task.onnx_input)
    if held is None:
        return ExportReport.written(written, opset, input_shape, None, tolerance, (), int8=True)
    diff, compared, agreement = int8_difference(model, written, held, task, tolerance)
    return ExportReport.written(
        written, opset, input_shape, diff, tolerance, (len(held),), compared,
        int8=True, agreement=agreement,
    )  # fmt: skip
