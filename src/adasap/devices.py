"""Devices: where a model runs and in which memory layout."""

from __future__ import annotations

import torch
from torch import nn

from adasap.distributed import launched, local_rank
from adasap.errors import UserError


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
        raise UserError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move the model to ``device``; channels_last trains ~1.5x faster on CPU for convnets."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
