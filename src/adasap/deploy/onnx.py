"""Deployment: find the models of a run, export them to ONNX (fp32, or INT8 through
:mod:`adasap.deploy.int8`) and check the export.

onnx and onnxruntime are imported by the functions that use them, so that importing this
module (and the timing built on it) stays cheap.

One export path serves every task: the model's :class:`~adasap.tasks.Task` supplies the
graph's outputs by name, its dynamic axes and how to compare onnxruntime's outputs with
PyTorch's. The export uses PyTorch's TorchScript-based exporter, which needs no extra package
(the newer ``dynamo`` exporter needs ``onnxscript``), and can be checked with onnxruntime
against PyTorch on random images.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from adasap.deploy.serialization import DESCRIPTION_FILE, load_model, read_description, saved_task
from adasap.errors import UserError, exception_summary
from adasap.io import RUN_MARKER, atomic_write
from adasap.models.builders import Normalize
from adasap.tasks import Task, make_task

if TYPE_CHECKING:
    import onnxruntime as ort

# An INT8 classifier may disagree with PyTorch's top-1 class on a few images whose two best
# classes nearly tie; losing more than a tenth of them means the quantization broke something
# (an activation range spoilt by outliers in the calibration images).
INT8_AGREEMENT = 0.9

MIN_OPSET = 17
MAX_OPSET = 20  # the newest the TorchScript-based exporter writes

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
    model_or_dir: nn.Module | str | Path,
    image_size: int | Sequence[int] | None = None,
    task: str | Task = "classification",
) -> tuple[nn.Module, InputShape, Task]:
    """A model, its per-sample input shape ``(C, H, W)`` and its task.

    A directory (a model's, or a run's holding one model) is loaded with :func:`load_model`;
    its description gives the shape and the task, ``image_size`` (one side or ``(H, W)``)
    overrides the shape. A module needs ``image_size``, its normalisation
    (:class:`~adasap.models.builders.Normalize`) or else its first convolution tells the number of
    channels, and ``task`` is its task.
    """
    if isinstance(model_or_dir, nn.Module):
        model = model_or_dir
        # build_model's normalisation, else the first convolution (not where a stem reshapes
        # first: TResNet's space-to-depth feeds its convolution 16 x 3 channels)
        first = next((m for m in model.modules() if isinstance(m, (Normalize, nn.Conv2d))), None)
        if first is None:
            raise UserError("cannot tell the input channels of a model without a Conv2d")
        if image_size is None:
            raise UserError("cannot tell the input size of a module: pass image_size")
        channels = first.mean.shape[1] if isinstance(first, Normalize) else first.in_channels
    else:
        directory = select_model(model_or_dir)
        description = read_description(directory)
        architecture, task = description["architecture"], saved_task(description)
        model = load_model(directory)
        channels = int(architecture["in_channels"])
        image_size = image_size if image_size is not None else int(architecture["image_size"])
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return model, (channels, int(height), int(width)), make_task(task)


def check_export_path(path: str | Path, model_dir: str | Path) -> None:
    """Refuse an export onto a file of the saved model in ``model_dir`` or of the run holding
    it: any file already in their folders but an earlier export (``.onnx``) would be replaced."""
    model_dir = Path(model_dir).resolve()
    run = model_dir.parent
    is_run = (run / RUN_MARKER).is_file() or (run / "config.json").is_file()
    owner = run if is_run else model_dir
    path = Path(path)
    # the folder resolved, not the name: the export replaces a link there, it does not follow it
    target = path.parent.resolve() / path.name
    if target.is_relative_to(owner) and target.is_file() and target.suffix != ".onnx":
        raise UserError(
            f"{path} is one of the files of {owner}, which the export would replace: write the "
            f"ONNX file elsewhere, e.g. --onnx {model_dir.name}.onnx"
        )


def _check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"ONNX opset {opset} is not supported: use {MIN_OPSET} to {MAX_OPSET}")


def write_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: InputShape,
    opset: int = MIN_OPSET,
    task: str | Task = "classification",
) -> Path:
    """Export ``model`` (a CPU copy, in eval mode) to ``path`` with ``task``'s outputs and
    dynamic axes.

    The file appears complete or not at all; a path that cannot be written, or a model the
    exporter cannot trace, is a :class:`UserError`.
    """
    _check_opset(opset)
    task = make_task(task)
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory; give a file path like out.onnx")
    exported = task.onnx_module(copy.deepcopy(model).cpu().eval()).eval()
    # seeded as the check's first batch: a detector is checked on the image it was traced on
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(max(task.onnx_check_batches), *input_shape, generator=generator)

    def export(tmp: Path) -> None:
        with warnings.catch_warnings():
            # the deprecation notice points at the dynamo exporter (it needs onnxscript); the
            # tracer's warnings (a detector's box decoding loops in Python) concern the trace,
            # which the check verifies
            warnings.simplefilter("ignore")
            torch.onnx.export(
                exported,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[task.onnx_input],
                output_names=list(task.onnx_outputs),
                dynamic_axes=task.onnx_dynamic_axes,
            )

    try:
        return atomic_write(path, export, fix="choose a writable file path for --onnx")
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        raise UserError(
            f"ONNX export of {type(model).__name__} is not supported ({exception_summary(exc)}): "
            f"PyTorch's exporter cannot trace it; {_export_fix(exc, task)}"
        ) from exc


def _export_fix(exc: BaseException, task: Task) -> str:
    """What the user can change when the tracer refuses ``exc``."""
    newer = re.search(r"added in (?:opset )?version (\d+)", str(exc))  # an operator's opset
    if newer and int(newer.group(1)) <= MAX_OPSET:
        return f"export with opset {newer.group(1)} (--opset {newer.group(1)}; opset= in Python)"
    if "not factor of input size" in str(exc):
        # ONNX has no adaptive pooling; the tracer turns it into a fixed pool, which exists
        # only when the output grid divides the input's
        return (
            "its adaptive pooling must divide its input's grid: use images of the size the "
            "model was designed for (224 for AlexNet or VGG)"
        )
    if task.name == "detection":
        return "docs/detection.md lists the detectors that export"
    return "replace the layer it names with one PyTorch's TorchScript-based exporter supports"


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
    # an INT8 model (adasap.deploy.int8), checked on held-back calibration images: for
    # per-image outputs (a classifier's) ``max_abs_diff`` is relative to the largest |output|
    # and ``agreement`` is the share of images whose top-1 class PyTorch's model agrees with
    int8: bool = False
    agreement: float | None = None

    @property
    def passed(self) -> bool:
        """True when checked and every output is within ``tolerance`` of PyTorch's (for a
        detector: with at least one detection compared; for INT8, with a top-1 agreement of
        at least :data:`INT8_AGREEMENT` where there is one)."""
        return (
            self.checked
            and self.max_abs_diff is not None
            and self.max_abs_diff < self.tolerance
            and self.detections_compared != 0
            and (self.agreement is None or self.agreement >= INT8_AGREEMENT)
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
        *,
        int8: bool = False,
        agreement: float | None = None,
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
            int8=int8,
            agreement=agreement,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path), "passed": self.passed}

    def __str__(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        kind = "INT8, " if self.int8 else ""
        head = (
            f"{self.path} ({kind}{self.file_bytes / 1e6:.2f} MB, opset {self.opset}, "
            f"input Nx{shape})"
        )
        if not self.checked:
            return f"{head}: not checked"
        if self.detections_compared == 0:
            images = "held-back calibration images" if self.int8 else "random image"
            return (
                f"{head}: UNVERIFIED: no detection to compare on the {images} (none, or all "
                "within the tolerance of the weakest score); check it on your own images"
            )
        verdict = "passed" if self.passed else "FAILED"
        compared = self.detections_compared
        detections = f" over {compared} detections" if compared else ""
        if self.int8:
            agreement = "" if self.agreement is None else f"top-1 agreement {self.agreement:.1%}, "
            relative = " of the largest output" if self.agreement is not None else ""
            return (
                f"{head}: onnxruntime INT8 vs PyTorch on {sum(self.batch_sizes)} held-back "
                f"calibration images{detections}: {agreement}max |diff| "
                f"{self.max_abs_diff:.2e}{relative} (tolerance {self.tolerance:.0e}): {verdict}"
            )
        batches = ", ".join(map(str, self.batch_sizes))
        return (
            f"{head}: onnxruntime vs PyTorch max |diff| {self.max_abs_diff:.2e} at batch "
            f"{batches}{detections} (tolerance {self.tolerance:.0e}): {verdict}"
        )


def onnx_runs_on(device: str) -> bool:
    """Whether onnxruntime can run on ``device`` ("cpu", "cuda", ...) here."""
    import onnxruntime as ort

    cuda = device.startswith("cuda")
    return not cuda or "CUDAExecutionProvider" in ort.get_available_providers()


def onnx_session(path: str | Path, device: str = "cpu") -> ort.InferenceSession:
    """An onnxruntime session on the CPU, or on CUDA when ``device`` says so, with PyTorch's
    number of threads."""
    import onnxruntime as ort

    if not onnx_runs_on(device):
        raise UserError(
            "onnxruntime has no CUDA provider here: install onnxruntime-gpu or use the CPU"
        )
    provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
    options = ort.SessionOptions()
    # as many threads as PyTorch uses (onnxruntime's default is one per core), so that the
    # runtimes' times compare
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=[provider])


def any_nan(*outputs: dict[str, np.ndarray]) -> bool:
    """Whether any float array of the outputs (by name) holds a NaN."""
    arrays = [a for named in outputs for a in named.values()]
    return any(a.dtype.kind == "f" and np.isnan(a).any() for a in arrays)


def max_onnx_difference(
    model: nn.Module, path: str | Path, input_shape: InputShape, task: Task, tolerance: float
) -> tuple[float, int | None]:
    """The largest difference between onnxruntime's and PyTorch's outputs (``task``'s
    :meth:`~adasap.tasks.Task.onnx_difference`) over its check batches, and how many outputs
    that compared (``None``: all). A NaN in any output makes it NaN, which fails the check."""
    import onnx

    onnx.checker.check_model(str(path))
    session = onnx_session(path)
    reference = task.onnx_module(copy.deepcopy(model).cpu().eval()).eval()
    names = task.onnx_outputs
    generator = torch.Generator().manual_seed(0)
    diffs, counts = [], []
    for batch in task.onnx_check_batches:
        images = torch.rand(batch, *input_shape, generator=generator)
        with torch.inference_mode():
            outputs = reference(images)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        expected = {name: out.numpy() for name, out in zip(names, outputs, strict=True)}
        got = session.run(list(names), {task.onnx_input: images.numpy()})
        got = dict(zip(names, got, strict=True))
        diff, count = task.onnx_difference(images, expected, got, tolerance)
        diffs.append(math.nan if any_nan(expected, got) else diff)
        counts.append(count)
    compared = None if None in counts else sum(counts)
    return float(np.max(diffs)), compared  # np.max keeps a NaN, Python's max may drop it


def export_onnx(
    model_or_dir: nn.Module | str | Path,
    path: str | Path,
    *,
    opset: int = MIN_OPSET,
    image_size: int | Sequence[int] | None = None,
    check: bool = True,
    tolerance: float | None = None,
    task: str | Task = "classification",
    int8: bool = False,
    calibration: Tensor | None = None,
) -> ExportReport:
    """Export a model (or a saved model directory) to ONNX, the graph its task's
    (:class:`~adasap.tasks.Task`: a classifier's ``images`` to ``logits`` with a dynamic batch
    size, a detector's one image to ``boxes``, ``scores``, ``labels``).

    A directory's task comes from its description; a module's is ``task``. With ``check``,
    the file is validated by ``onnx.checker`` and run with onnxruntime on random images (a
    classifier at batch sizes 1 and 5, a detector on one image); the report says whether the
    largest output difference from PyTorch stays below ``tolerance`` (default: the task's,
    1e-4 for a classifier, 1e-3 for a detector). A failed check keeps the file (for
    inspection) and reports ``passed=False``. A directory's own files, and its run's, are
    never overwritten (:func:`check_export_path`).

    With ``int8``, the file holds the model quantized to INT8 (:mod:`adasap.deploy.int8`)
    on ``calibration`` images (``N x C x H x W`` in [0, 1], a few hundred training images);
    the check holds back a fifth of them and compares there (a classifier's top-1 agreement
    and relative difference, tolerance 0.1: :func:`adasap.deploy.int8.export_int8`).
    """
    _check_opset(opset)
    if not isinstance(model_or_dir, nn.Module):
        check_export_path(path, select_model(model_or_dir))
    model, input_shape, task = resolve_model(model_or_dir, image_size, task)
    if int8:
        from adasap.deploy.int8 import export_int8

        return export_int8(
            model,
            path,
            input_shape,
            task,
            calibration,
            opset=opset,
            check=check,
            tolerance=tolerance,
        )
    tolerance = task.onnx_tolerance if tolerance is None else tolerance
    written = write_onnx(model, path, input_shape, opset, task)
    batches = task.onnx_check_batches
    if not check:
        return ExportReport.written(written, opset, input_shape, None, tolerance, batches)
    diff, compared = max_onnx_difference(model, written, input_shape, task, tolerance)
    return ExportReport.written(written, opset, input_shape, diff, tolerance, batches, compared)
