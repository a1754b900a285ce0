"""Runtimes a model is deployed to: one small interface, registered by name in :data:`RUNTIMES`.

A :class:`Runtime` turns a PyTorch model into a :class:`DeployedModel`: an ``nn.Module`` whose
forward pass runs in that runtime (so the corruption evaluation, accuracy and latency code
call it like any model) and which gives, per batch size, a zero-argument call that runs one
timed forward pass on a fixed input (:meth:`DeployedModel.runner`).

- ``torch``: PyTorch eager in the layout adasap trains in (channels_last on the CPU);
- ``ort``: ONNX Runtime, fp32 (the default deployment runtime, :data:`DEFAULT_RUNTIME`);
- ``ort-int8``: ONNX Runtime on the export quantized to INT8 (:mod:`adasap.deploy.int8`);
- ``openvino``, ``openvino-int8``: OpenVINO on the CPU, on the fp32 export or the same INT8
  file (``pip install 'adasap[openvino]'``).

Every runtime computes with as many threads as PyTorch (``torch.get_num_threads()``), so that
their times compare. onnx, onnxruntime and openvino are imported by the runtimes that use
them, when they deploy a model.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from adasap.alignment import DEFAULT_RUNTIME as DEFAULT_RUNTIME  # re-exported
from adasap.errors import UserError, exception_summary
from adasap.registry import Registry
from adasap.tasks import Task, make_task

# How far an INT8 model may be from PyTorch's, relative to the largest |output| (a classifier:
# a tenth of the largest logit; INT8's rounding, summed over a network's layers, reaches a few
# percent). An INT8 export's check holds a detector's detections to it in the task's measure:
# boxes within a tenth of the image side, scores within 0.1.
INT8_TOLERANCE = 0.1


def image_batch(images: Tensor | None, batch: int, shape: Sequence[int]) -> Tensor:
    """A float32 CPU batch of ``batch`` inputs of ``shape``: the first of ``images``, repeated
    in turn when there are fewer, or uniform random ones without ``images``.

    A classifier's time does not depend on its input's values, a detector's does: its
    post-processing (top-k, NMS) grows with the boxes above the score threshold, many more
    on noise than on a real image for some models (docs/detection.md).
    """
    if images is None:
        return torch.rand(batch, *shape)
    if images.ndim != len(shape) + 1 or tuple(images.shape[1:]) != tuple(shape) or not len(images):
        raise UserError(
            f"timing images of shape {tuple(images.shape)} do not fit inputs of shape "
            f"{tuple(shape)}: pass N x {' x '.join(map(str, shape))} images"
        )
    picks = torch.arange(batch) % len(images)
    return images.detach().cpu().float()[picks].contiguous()


class DeployedModel(nn.Module, ABC):
    """A model as a runtime runs it. ``forward(images)`` gives what the PyTorch model would
    (a tensor, or the task's tuple of tensors) on the CPU; it runs a copy of the model, or a
    file made from it, and leaves the model itself alone."""

    def __init__(self, runtime: str, input_shape: Sequence[int], images: Tensor | None) -> None:
        super().__init__()
        self.runtime = runtime
        self.input_shape = tuple(input_shape)
        self._images = images

    def runner(self, batch: int) -> Callable[[], object]:
        """A call that runs one forward pass on a batch of ``batch`` inputs made once (from
        the timing ``images`` given at deployment, else random: :func:`image_batch`)."""
        return self._runner(image_batch(self._images, batch, self.input_shape))

    @abstractmethod
    def _runner(self, batch: Tensor) -> Callable[[], object]: ...


class Runtime(ABC):
    """One runtime: its name, what it needs installed, and how to deploy a model to it."""

    name: ClassVar[str]
    # what a model computes in: "fp32", "int8"
    precision: ClassVar[str] = "fp32"
    # several models may take turns, one pass each, in one timing (PyTorch); a runtime whose
    # sessions keep their threads spinning after a run is timed one model after the other
    interleaved: ClassVar[bool] = False
    # the largest :meth:`output_error` from PyTorch's outputs on a small model that the tests
    # accept
    tolerance: ClassVar[float] = 1e-4

    def output_error(self, expected: Tensor, got: Tensor) -> float:
        """How far ``got`` (this runtime's output) is from PyTorch's ``expected``, in the unit
        of :attr:`tolerance`: the largest absolute difference in fp32, relative to the largest
        ``|expected|`` in INT8 (whose rounding steps grow with each tensor's range)."""
        diff = float((got.float() - expected.float()).abs().max())
        if self.precision == "fp32":
            return diff
        return diff / max(float(expected.abs().max()), 1e-12)

    def missing(self) -> str | None:
        """Why this runtime cannot run here (``None`` when it can), as the fix to apply."""
        return None

    @abstractmethod
    def deploy(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        *,
        task: str | Task = "classification",
        device: str | torch.device = "cpu",
        workdir: Path,
        images: Tensor | None = None,
        calibration: Tensor | None = None,
    ) -> DeployedModel:
        """``model`` (left untouched: a copy is deployed) in this runtime, for per-sample
        inputs of ``input_shape``. Files (an ONNX export) go under ``workdir``, which must
        outlive the result. ``images`` are the timing inputs (:func:`image_batch`);
        ``calibration`` images (``N x *input_shape`` in [0, 1]) calibrate a quantized runtime.
        """


RUNTIMES: Registry[type[Runtime]] = Registry("runtime")


def get_runtime(name: str) -> Runtime:
    """The runtime ``name``; an unknown one, or one that cannot run here, is a one-line
    :class:`UserError` that says what to choose or install."""
    runtime = RUNTIMES.get(name)()
    reason = runtime.missing()
    if reason is not None:
        raise UserError(f"runtime {name!r} cannot run here: {reason}")
    return runtime


class TorchModel(DeployedModel):
    def __init__(self, model: nn.Module, input_shape, device, images) -> None:
        super().__init__("torch", input_shape, images)
        self.device = torch.device(device)
        # channels_last: the layout adasap trains in, oneDNN's fastest for convolutions
        self.channels_last = self.device.type == "cpu" and len(self.input_shape) == 3
        timed = copy.deepcopy(model).eval().to(self.device)
        self.timed = timed.to(memory_format=torch.channels_last) if self.channels_last else timed

    def _move(self, x: Tensor) -> Tensor:
        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, images: Tensor) -> Any:
        with torch.inference_mode():
            out = self.timed(self._move(images))
        return out.cpu() if isinstance(out, Tensor) else tuple(o.cpu() for o in out)

    def _runner(self, batch: Tensor) -> Callable[[], object]:
        x = self._move(batch)
        if self.device.type == "cuda":

            def run() -> object:
                out = self.timed(x)
                torch.cuda.synchronize(self.device)  # stop the clock once its kernels are done
                return out

            return run
        return lambda: self.timed(x)


@RUNTIMES.register("torch")
class TorchRuntime(Runtime):
    """PyTorch eager, channels_last on the CPU, under ``torch.inference_mode`` when timed."""

    name = "torch"
    interleaved = True

    def deploy(self, model, input_shape, *, task="classification", device="cpu", workdir,
               images=None, calibration=None) -> DeployedModel:  # fmt: skip
        return TorchModel(model, input_shape, device, images)


class OnnxModel(DeployedModel):
    """An ONNX file run by an onnxruntime session; outputs come back as CPU tensors."""

    def __init__(self, runtime: str, session: Any, task: Task, input_shape, images) -> None:
        super().__init__(runtime, input_shape, images)
        self.session = session
        self.task = task
        (graph_input,) = session.get_inputs()
        self.input_name = graph_input.name

    def forward(self, images: Tensor) -> Any:
        feed = {self.input_name: images.detach().cpu().float().numpy()}
        outputs = self.session.run(None, feed)
        tensors = tuple(torch.from_numpy(np.asarray(o)) for o in outputs)
        return tensors[0] if len(tensors) == 1 else tensors

    def _runner(self, batch: Tensor) -> Callable[[], object]:
        feed = {self.input_name: batch.numpy()}
        return lambda: self.session.run(None, feed)


def _onnx_file(
    model: nn.Module,
    input_shape: Sequence[int],
    task: Task,
    workdir: Path,
    calibration: Tensor | None,
    int8: bool,
) -> Path:
    """The model's ONNX export under ``workdir``, quantized to INT8 when ``int8``."""
    from adasap.deploy.onnx import write_onnx

    fp32 = write_onnx(model, Path(workdir) / "model.onnx", tuple(input_shape), task=task)
    if not int8:
        return fp32
    from adasap.deploy.int8 import quantize_int8, random_calibration

    images = random_calibration(input_shape) if calibration is None else calibration
    return quantize_int8(
        fp32, Path(workdir) / "model.int8.onnx", images, input_name=task.onnx_input
    )


def _outputs_vary(task: Task) -> bool:
    """Whether the task's graph gives outputs whose size depends on the image, not only on the
    batch (a detector's detections, none on some images)."""
    batch_axes = set(task.onnx_dynamic_axes.get(task.onnx_input, {}).values())
    return any(
        not set(task.onnx_dynamic_axes.get(name, {}).values()) <= batch_axes
        for name in task.onnx_outputs
    )


def _on_cpu(runtime: str, device: str | torch.device) -> None:
    if torch.device(device).type != "cpu":
        raise UserError(
            f"runtime {runtime!r} runs on the CPU, not {device}: time on the CPU (--device cpu) "
            "or choose runtime torch or ort for the GPU"
        )


@RUNTIMES.register("ort")
class OrtRuntime(Runtime):
    """ONNX Runtime on an fp32 export (CPU; CUDA where onnxruntime-gpu is installed)."""

    name = "ort"

    def deploy(self, model, input_shape, *, task="classification", device="cpu", workdir,
               images=None, calibration=None) -> DeployedModel:  # fmt: skip
        from adasap.deploy.onnx import onnx_session

        int8 = self.precision == "int8"
        if int8:
            _on_cpu(self.name, device)  # INT8 on a GPU is TensorRT's (docs/deployment.md)
        task = make_task(task)
        path = _onnx_file(model, input_shape, task, workdir, calibration, int8=int8)
        return OnnxModel(self.name, onnx_session(path, str(device)), task, input_shape, images)


@RUNTIMES.register("ort-int8")
class OrtInt8Runtime(OrtRuntime):
    """ONNX Runtime on the CPU, on the export quantized to INT8 (:mod:`adasap.deploy.int8`).

    ``calibration`` images set the activation ranges, so a model whose outputs matter needs
    them (a few hundred training images); without them it is calibrated on random images,
    which serves timing only: its time does not depend on the ranges, its accuracy does.
    """

    name = "ort-int8"
    precision = "int8"
    tolerance = INT8_TOLERANCE


OPENVINO_FIX = "install it with pip install 'adasap[openvino]'"


class OpenVinoModel(DeployedModel):
    """An ONNX file compiled by OpenVINO for the CPU; outputs come back as CPU tensors."""

    def __init__(self, runtime: str, path: Path, input_shape, images) -> None:
        super().__init__(runtime, input_shape, images)
        self.path = path
        self.compiled = self._compile(None)
        self.request = self.compiled.create_infer_request()

    def _compile(self, batch: int | None) -> Any:
        """The model compiled for batches of ``batch`` inputs (``None``: the file's shape)."""
        import openvino

        core = openvino.Core()
        model = core.read_model(str(self.path))
        if batch is not None and model.input(0).get_partial_shape().is_dynamic:
            # a fixed shape lets OpenVINO pick its kernels ahead, as a deployment would
            model.reshape([batch, *self.input_shape])
        config = {
            # as many threads as PyTorch and onnxruntime use, so that the runtimes compare
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            # one stream that runs each request on all threads: the time of one request,
            # not the throughput of several at once
            "PERFORMANCE_HINT": "LATENCY",
            # on CPUs with bfloat16 (AVX-512 BF16, AMX) OpenVINO computes in bf16 unless told
            "INFERENCE_PRECISION_HINT": "f32",
        }
        try:
            return core.compile_model(model, "CPU", config)
        except RuntimeError as exc:  # OpenVINO's own errors, raised from its C++ core
            raise UserError(
                f"OpenVINO cannot compile {self.path.name} ({exception_summary(exc)}): deploy "
                "the model with runtime ort"
            ) from exc

    def forward(self, images: Tensor) -> Any:
        results = self.request.infer([images.detach().cpu().float().contiguous().numpy()])
        tensors = tuple(torch.from_numpy(np.array(results[out])) for out in self.compiled.outputs)
        return tensors[0] if len(tensors) == 1 else tensors

    def _runner(self, batch: Tensor) -> Callable[[], object]:
        request = self._compile(len(batch)).create_infer_request()
        feed = [batch.numpy()]
        return lambda: request.infer(feed, share_inputs=True)


@RUNTIMES.register("openvino")
class OpenVinoRuntime(Runtime):
    """OpenVINO on the CPU, on the fp32 ONNX export."""

    name = "openvino"

    def missing(self) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return OPENVINO_FIX
        return None

    def deploy(self, model, input_shape, *, task="classification", device="cpu", workdir,
               images=None, calibration=None) -> DeployedModel:  # fmt: skip
        _on_cpu(self.name, device)
        task = make_task(task)
        if _outputs_vary(task):
            raise UserError(
                f"runtime {self.name!r} does not run {task.name} models: OpenVINO returns a "
                "spurious detection for an image without any (and fails on some such images); "
                "deploy them with runtime torch, ort or ort-int8"
            )
        int8 = self.precision == "int8"
        path = _onnx_file(model, input_shape, task, workdir, calibration, int8=int8)
        return OpenVinoModel(self.name, path, input_shape, images)


@RUNTIMES.register("openvino-int8")
class OpenVinoInt8Runtime(OpenVinoRuntime):
    """OpenVINO on the CPU, on the INT8 file of ``ort-int8`` (OpenVINO runs QDQ models in
    INT8). Calibration as for ``ort-int8``: random images serve timing only."""

    name = "openvino-int8"
    precision = "int8"
    tolerance = INT8_TOLERANCE
