"""``corrupt``: check the input, look the corruption up, run it with its severity's parameters."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from adasap.errors import UserError
from adasap.robustness.corruptions.registry import (
    Corruption,
    CorruptionContext,
    RandomSource,
    empty_batch,
    get_corruption,
    resolve_param_table,
)

_MIN_SIZE = 8
# On the CPU a corruption runs on chunks of images holding about this many values (2 MiB of
# float32), so that its temporaries stay in the caches and in memory the allocator reuses: a
# 64-image batch at 224 px in one piece was 2x slower, mostly from page faults on fresh buffers.
CHUNK_VALUES = 1 << 19


def check_severity(severity: int) -> None:
    if (
        isinstance(severity, bool)
        or not isinstance(severity, int | np.integer)
        or not 1 <= severity <= 5
    ):
        raise UserError(f"severity must be an integer from 1 to 5, got {severity!r}")


def check_images(images: Any) -> None:
    if not isinstance(images, Tensor):
        raise UserError(
            f"images must be a torch.Tensor shaped (N, C, H, W), got {type(images).__name__}: "
            "convert with torch.as_tensor"
        )
    if not images.is_floating_point():
        raise UserError(
            f"images must be a floating-point tensor in [0, 1], got {images.dtype}: "
            "convert uint8 images with images.float() / 255"
        )
    if images.dim() != 4:
        raise UserError(
            f"images must be a batch shaped (N, C, H, W), got shape {tuple(images.shape)}: "
            "add a batch dimension with images.unsqueeze(0)"
        )
    channels, height, width = images.shape[1:]
    if channels not in (1, 3):
        raise UserError(
            f"images must have 1 or 3 channels, got {channels} (shape {tuple(images.shape)}): "
            "pass NCHW grey or RGB images"
        )
    if min(height, width) < _MIN_SIZE:
        raise UserError(
            f"images must be at least {_MIN_SIZE}x{_MIN_SIZE} px, got {height}x{width}: "
            "upsample them first"
        )


def _make_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None and seed is not None:
        raise UserError("pass either generator= or seed=, not both: seed= makes a fresh generator")
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def corrupt(
    images: Tensor,
    name: str,
    severity: int,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    params: str = "auto",
) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to a float NCHW batch in [0, 1].

    Args:
        images: float tensor (N, C, H, W), C in {1, 3}, H and W >= 8, on any device.
        name: one of :data:`CORRUPTIONS` (any registered corruption).
        severity: 1 (mildest) to 5.
        generator: source of all randomness; a CPU generator gives the same numbers on every
            device. Mutually exclusive with ``seed``.
        seed: seed for a fresh CPU generator; with neither given, seed 0 is used, so the call is
            deterministic.
        params: "auto" (table by image size, see :func:`select_param_table`) or one of
            "imagenet", "tinyimagenet", "cifar".

    Returns:
        The corrupted batch, same shape, dtype and device, clamped to [0, 1].
    """
    check_images(images)
    corruption = get_corruption(name)
    check_severity(severity)
    table = resolve_param_table(params, images.shape[-2], images.shape[-1])
    rng = RandomSource(_make_generator(generator, seed), images.device)
    if images.shape[0] == 0:
        return images.clone()
    x = images.to(torch.float32)
    row = corruption.params[table][int(severity) - 1]
    out = _run(corruption, x, row, CorruptionContext(rng, table))
    return out.to(images.dtype).contiguous()


def _run(corruption: Corruption, x: Tensor, row: Any, ctx: CorruptionContext) -> Tensor:
    """The corruption of ``x`` clamped to [0, 1]; in chunks where the function allows it."""
    draws = corruption.draw(x, row, ctx) if corruption.draw is not None else ()
    n = x.shape[0]
    step = n
    if x.device.type == "cpu" and (corruption.deterministic or corruption.draw is not None):
        step = max(1, CHUNK_VALUES // x[0].numel())
    if step >= n:
        return _finish(corruption.function(x, row, ctx, *draws))
    out = empty_batch(x.shape, x.device)
    for start in range(0, n, step):
        part = slice(start, start + step)
        _finish(corruption.function(x[part], row, ctx, *(d[part] for d in draws)), out[part])
    return out


def _finish(result: Tensor, out: Tensor | None = None) -> Tensor:
    """A function's result as float32 in [0, 1]: clamped, or uint8 levels (a decoded JPEG) / 255."""
    if result.dtype == torch.uint8:
        return torch.div(result, 255, out=out)
    return torch.clamp(result, 0, 1, out=out)
