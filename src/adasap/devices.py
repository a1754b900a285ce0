"""Devices: where a model runs, in which memory layout and at which precision."""

from __future__ import annotations

import torch
from torch import nn

from adasap.distributed import launched, local_rank
from adasap.errors import UserError, quote


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU; under torchrun ``cuda`` is the
    process's own GPU (``cuda:LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and launched() and torch.cuda.is_available():
        name = f"cuda:{local_rank()}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available: use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {quote(name)}: use auto, cpu or cuda[:N]") from exc


def wants_channels_last(requested: bool, device: torch.device) -> bool:
    """Whether to train in channels_last: where requested, on the CPU (oneDNN) and on CUDA
    (cuDNN's tensor-core kernels take NHWC); other backends keep the contiguous layout."""
    return requested and device.type in ("cpu", "cuda")


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move the model to ``device``; channels_last trains ~1.3x faster on CPU for convnets.

    On CUDA, cuDNN then times its kernels for each new input shape and keeps the fastest
    (``cudnn.benchmark``): training batches have one shape per architecture, and a removal
    costs one more search (benchmarks/bench_gpu.py measures with the same setting).
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


AMP_MODES = ("auto", "bf16", "fp16", "off")


def check_amp(amp: str) -> str:
    """``amp`` itself, or a :class:`UserError` naming the modes."""
    if amp not in AMP_MODES:
        raise UserError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}: e.g. --amp auto")
    return amp


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the ``amp`` mode on ``device`` (None: float32 throughout).

    ``"auto"`` is float16 on CUDA (with a grad scaler) and bfloat16 on a CPU that computes it
    natively (oneDNN's bf16 kernels, e.g. AVX512-BF16 or AMX: about 1.6x faster training for
    a ResNet-20 on a 2-core AVX512-BF16 CPU); elsewhere bfloat16 would be emulated and slower,
    so it stays float32.
    """
    if check_amp(amp) == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16, AMX or similar)."""
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
