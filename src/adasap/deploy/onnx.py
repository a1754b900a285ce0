"""Deployment: find the models of a run, export them to ONNX and check the export.

onnx and onnxruntime are imported by the functions that use them, so that importing this
module (and the timing built on it) stays cheap.

The export uses PyTorch's TorchScript-based exporter, which needs no extra package (the newer
``dynamo`` exporter needs ``onnxscript``), with a dynamic batch dimension. Every export can be
checked with onnxruntime against PyTorch on random images at two batch sizes.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from adasap.deploy.serialization import DESCRIPTION_FILE, is_detector, load_model, read_description
from adasap.errors import UserError
from adasap.io import atomic_write

if TYPE_CHECKING:
    import onnxruntime as ort

MIN_OPSET = 17
MAX_OPSET = 20  # the newest the TorchScript-based exporter writes
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
CHECK_BATCH_SIZES = (1, 5)

InputShape = tuple[int, int, int]


def find_models(run_dir: str | Path) -> dict[str, Path]:
    """The model directories of a run, by method name (``<run>/<method>/model.json``).

    A model directory itself is accepted too and maps its own name to itself.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(
            f"{run_dir} is not a directory: point at a run directory written by adasap run"
        )
    if (run_dir / DESCRIPTION_FILE).is_file():
        return {run_dir.name: run_dir}
    found = {d.name: d for d in sorted(run_dir.iterdir()) if (d / DESCRIPTION_FILE).is_file()}
    if not found:
        raise UserError(
            f"no models in {run_dir} (no <method>/{DESCRIPTION_FILE}): point at a run directory "
            "written by a finished adasap run"
        )
    return found


def select_model(run_dir: str | Path, method: str | None = None) -> Path:
    """The directory of ``method``'s model in a run; ``None`` is fine when there is only one."""
    models = find_models(run_dir)
    if method is None:
        if len(models) == 1:
            return next(iter(models.values()))
        raise UserError(
            f"{run_dir} holds several models ({', '.join(models)}): pick one with --method"
        )
    if method not in models:
        raise UserError(
            f"{run_dir} has no model for method {method!r}: choose one of {', '.join(models)}"
        )
    return models[method]


def resolve_model(
    model_or_dir: nn.Module | str | Path, image_size: int | Sequence[int] | None = None
) -> tuple[nn.Module, InputShape]:
    """A model and its per-sample input shape ``(C, H, W)``.

    A directory (a model's, or a run's holding one model) is loaded with :func:`load_model`
    and its architecture gives the shape; ``image_size`` (one side or ``(H, W)``) overrides
    it. A module needs ``image_size``, and its first convolution tells the number of channels.
    """
    if isinstance(model_or_dir, nn.Module):
        model = model_or_dir
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise UserError("cannot tell the input channels of a model without a Conv2d")
        if image_size is None:
            raise UserError("cannot tell the input size of a module: pass image_size")
        channels = first.in_channels
    else:
        directory = select_model(model_or_dir)
        architecture = read_description(directory)["architecture"]
        model = load_model(directory)
        channels = int(architecture["in_channels"])
        image_size = image_size if image_size is not None else int(architecture["image_size"])
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return model, (channels, int(height), int(width))


def _check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"ONNX opset {opset} is not supported: use {MIN_OPSET} to {MAX_OPSET}")


def write_onnx(
    model: nn.Module, path: str | Path, input_shape: InputShape, opset: int = MIN_OPSET
) -> Path:
    """Export ``model`` (a CPU copy, in eval mode) to ``path`` with a dynamic batch size.

    The file appears complete or not at all; a path that cannot be written is a
    :class:`UserError`.
    """
    _check_opset(opset)
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory; give a file path like out.onnx")
    copy_ = copy.deepcopy(model).cpu().eval()
    example = torch.rand(2, *input_shape)

    def export(tmp: Path) -> None:
        with warnings.catch_warnings():
            # The deprecation notice points at the dynamo exporter, which needs onnxscript.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                copy_,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )

    return atomic_write(path, export, fix="choose a writable file path for --onnx")


@dataclass(frozen=True)
class ExportReport:
    """Where the ONNX file went and how closely onnxruntime reproduces PyTorch."""

    path: Path
    opset: int
    input_shape: InputShape
    file_bytes: int
    checked: bool
    max_abs_diff: float | None
    tolerance: float
    batch_sizes: tuple[int, ...]
    detections_compared: int | None = None  # a detector's; None for a classifier

    @property
    def passed(self) -> bool:
        """True when checked and every output is within ``tolerance`` of PyTorch's (for a
        detector: with at least one detection compared)."""
        return (
            self.checked
            and self.max_abs_diff is not None
            and self.max_abs_diff < self.tolerance
            and self.detections_compared != 0
        )

    @classmethod
    def written(
        cls,
        path: Path,
        opset: int,
        input_shape: InputShape,
        diff: float | None,
        tolerance: float,
        batch_sizes: tuple[int, ...],
        detections_compared: int | None = None,
    ) -> ExportReport:
        """The report of a file just written: its size read from disk, checked when ``diff``
        (onnxruntime against PyTorch over ``batch_sizes``) was measured."""
        return cls(
            path=path,
            opset=opset,
            input_shape=input_shape,
            file_bytes=path.stat().st_size,
            checked=diff is not None,
            max_abs_diff=diff,
            tolerance=tolerance,
            batch_sizes=batch_sizes if diff is not None else (),
            detections_compared=detections_compared,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path), "passed": self.passed}

    def __str__(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        head = f"{self.path} ({self.file_bytes / 1e6:.2f} MB, opset {self.opset}, input Nx{shape})"
        if not self.checked:
            return f"{head}: not checked"
        if self.detections_compared == 0:
            return (
                f"{head}: UNVERIFIED: no detection to compare on the random image (none, or all "
                "within the tolerance of the weakest score); check it on your own images"
            )
        verdict = "passed" if self.passed else "FAILED"
        batches = ", ".join(map(str, self.batch_sizes))
        compared = self.detections_compared
        return (
            f"{head}: onnxruntime vs PyTorch max |diff| {self.max_abs_diff:.2e} at batch "
            f"{batches}"
            + (f" over {compared} detections" if compared else "")
            + f" (tolerance {self.tolerance:.0e}): {verdict}"
        )


def onnx_runs_on(device: str) -> bool:
    """Whether onnxruntime can run on ``device`` ("cpu", "cuda", ...) here."""
    import onnxruntime as ort

    cuda = device.startswith("cuda")
    return not cuda or "CUDAExecutionProvider" in ort.get_available_providers()


def onnx_session(path: str | Path, device: str = "cpu") -> ort.InferenceSession:
    """An onnxruntime session on the CPU, or on CUDA when ``device`` says so."""
    import onnxruntime as ort

    if not onnx_runs_on(device):
        raise UserError(
            "onnxruntime has no CUDA provider here: install onnxruntime-gpu or use the CPU"
        )
    provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
    return ort.InferenceSession(str(path), providers=[provider])


def max_onnx_difference(
    model: nn.Module,
    path: str | Path,
    input_shape: InputShape,
    batch_sizes: Sequence[int] = CHECK_BATCH_SIZES,
    seed: int = 0,
) -> float:
    """The largest |onnxruntime - PyTorch| output difference on random images in [0, 1]."""
    import onnx

    onnx.checker.check_model(str(path))
    session = onnx_session(path)
    reference = copy.deepcopy(model).cpu().eval()
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batch_sizes:
        x = torch.rand(batch, *input_shape, generator=generator)
        with torch.inference_mode():
            expected = reference(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if got.shape != expected.shape:
            raise RuntimeError(f"onnxruntime output {got.shape} != PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def export_onnx(
    model_or_dir: nn.Module | str | Path,
    path: str | Path,
    *,
    opset: int = MIN_OPSET,
    image_size: int | Sequence[int] | None = None,
    check: bool = True,
    tolerance: float = 1e-4,
) -> ExportReport:
    """Export a model (or a saved model directory) to ONNX with a dynamic batch size.

    With ``check``, the file is validated by ``onnx.checker`` and run with onnxruntime on
    random images at batch sizes 1 and 5; the report says whether the largest absolute
    output difference from PyTorch stays below ``tolerance``. A failed check keeps the file
    (for inspection) and reports ``passed=False``. A saved detector goes through
    :func:`adasap.deploy.detection_onnx.export_detector_onnx`.
    """
    _check_opset(opset)
    if not isinstance(model_or_dir, nn.Module):
        directory = select_model(model_or_dir)
        if is_detector(read_description(directory)["architecture"]):
            from adasap.deploy.detection_onnx import export_detector_onnx  # imports this module

            return export_detector_onnx(directory, path, opset=opset, check=check)
    model, input_shape = resolve_model(model_or_dir, image_size)
    written = write_onnx(model, path, input_shape, opset)
    diff = max_onnx_difference(model, written, input_shape) if check else None
    return ExportReport.written(written, opset, input_shape, diff, tolerance, CHECK_BATCH_SIZES)
