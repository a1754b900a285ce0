"""Blur corruptions: defocus, glass, motion and zoom blur (benchmark), gaussian blur (extra)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from adasap.robustness.corruptions.image_ops import (
    clipped_zoom,
    filter2d,
    gaussian,
    motion_blur_batch,
)
from adasap.robustness.corruptions.registry import (
    CorruptionContext,
    register_corruption,
)


@lru_cache(maxsize=32)
def _disk_kernel(radius: float, alias_blur: float) -> Tensor:
    """The reference's anti-aliased disk, cropped to its non-zero support (do not modify it)."""
    half = 8 if radius <= 8 else int(radius)
    ksize = 3 if radius <= 8 else 5
    ax = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(ax, ax)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    # cv2.GaussianBlur(disk, (ksize, ksize), alias_blur) with its BORDER_REFLECT_101.
    t = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(t**2) / (2 * alias_blur**2))
    g = (g / g.sum()).astype(np.float32)
    r = ksize // 2
    padded = np.pad(disk, r, mode="reflect")
    rows = sum(g[i] * padded[i : i + disk.shape[0], :] for i in range(ksize))
    kernel = sum(g[j] * rows[:, j : j + disk.shape[1]] for j in range(ksize))
    nonzero = np.flatnonzero(np.abs(kernel).sum(axis=0))
    trim = min(nonzero[0], len(ax) - 1 - nonzero[-1])
    kernel = kernel[trim : len(ax) - trim, trim : len(ax) - trim]
    return torch.from_numpy(np.ascontiguousarray(kernel, dtype=np.float32))


@register_corruption(
    "defocus_blur",
    family="blur",
    benchmark=True,
    deterministic=True,
    params={
        "imagenet": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        "tinyimagenet": ((0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)),
        "cifar": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    },
)
def _defocus_blur(x: Tensor, c: tuple[float, float], ctx: CorruptionContext) -> Tensor:
    return filter2d(x, _disk_kernel(*c))


# Per-iteration displacement std (px, per axis) of the reference's sequential pixel-swap loop
# for max_delta 1..4, measured by running that loop on index images (docs/corruptions.md).
_GLASS_STEP_STD = {1: 1.27, 2: 1.85, 3: 2.58, 4: 3.33}


def _shuffle_noise(
    x: Tensor, c: tuple[float, int, int], ctx: CorruptionContext
) -> tuple[Tensor, Tensor]:
    """Glass blur's random numbers: sort keys' noise for the rows, then for the columns."""
    n, _, h, w = x.shape
    std = _GLASS_STEP_STD[c[1]] * math.sqrt(c[2])
    return ctx.rng.normal((n, h, w), std=std), ctx.rng.normal((n, h, w), std=std)


def _local_shuffle(x: Tensor, row_noise: Tensor, column_noise: Tensor) -> Tensor:
    """Permute pixels locally: sort each row, then each column, by position plus the noise.

    A vectorised stand-in for the reference's sequential swaps: an exact permutation whose
    displacements have (empirically) the noise's std per axis.
    """
    n, c, h, w = x.shape
    cols = torch.arange(w, device=x.device, dtype=x.dtype)
    along_rows = (cols + row_noise).argsort(dim=-1)  # (n, h, w): source column per pixel
    rows = torch.arange(h, device=x.device, dtype=x.dtype)[:, None]
    # Sorting along the last axis is about 2x faster; the permutation is the same.
    keys = (rows + column_noise).transpose(-1, -2).contiguous()
    along_cols = keys.argsort(dim=-1).transpose(-1, -2)  # (n, h, w): source row per pixel
    # Both moves as one gather: pixel (i, j) comes from row r = along_cols[i, j] and from the
    # column the row shuffle put at (r, j).
    source = along_cols * w + along_rows.gather(-2, along_cols)
    flat = x.reshape(n, c, h * w).gather(-1, source.reshape(n, 1, h * w).expand(n, c, h * w))
    return flat.view(n, c, h, w)


@register_corruption(
    "glass_blur",
    family="blur",
    benchmark=True,
    deterministic=False,
    params={
        "imagenet": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
        "tinyimagenet": ((0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)),
        "cifar": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    },
    draw=_shuffle_noise,
)
def _glass_blur(
    x: Tensor,
    c: tuple[float, int, int],
    ctx: CorruptionContext,
    row_noise: Tensor,
    column_noise: Tensor,
) -> Tensor:
    x = gaussian(x, c[0])
    # The reference stores the blurred image as uint8 (truncating) before shuffling.
    x = torch.floor(x.clamp(0, 1) * 255) / 255
    x = _local_shuffle(x, row_noise, column_noise)
    return gaussian(x, c[0])


@register_corruption(
    "motion_blur",
    family="blur",
    benchmark=True,
    deterministic=False,
    params={
        "imagenet": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        "tinyimagenet": ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)),
        "cifar": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    },
    draw=lambda x, c, ctx: (ctx.rng.uniform((x.shape[0],), -45, 45),),
)
def _motion_blur(
    x: Tensor, c: tuple[float, float], ctx: CorruptionContext, angles: Tensor
) -> Tensor:
    return motion_blur_batch(x, c[0], c[1], angles.tolist())


# Rows are (start, stop, step) of the reference's np.arange of zoom factors.
@register_corruption(
    "zoom_blur",
    family="blur",
    benchmark=True,
    deterministic=True,
    params={
        "imagenet": (
            (1, 1.11, 0.01),
            (1, 1.16, 0.01),
            (1, 1.21, 0.02),
            (1, 1.26, 0.02),
            (1, 1.31, 0.03),
        ),
        "tinyimagenet": (
            (1, 1.06, 0.01),
            (1, 1.11, 0.01),
            (1, 1.16, 0.01),
            (1, 1.21, 0.01),
            (1, 1.26, 0.01),
        ),
        "cifar": (
            (1, 1.06, 0.01),
            (1, 1.11, 0.01),
            (1, 1.16, 0.01),
            (1, 1.21, 0.01),
            (1, 1.26, 0.01),
        ),
    },
)
def _zoom_blur(x: Tensor, c: tuple[float, float, float], ctx: CorruptionContext) -> Tensor:
    factors = np.arange(*c)
    out = x.clone()  # the unzoomed image, plus factor 1.0, which is the image itself
    for zoom in factors:
        out += x if zoom == 1 else clipped_zoom(x, float(zoom))
    return out / (len(factors) + 1)


@register_corruption(
    "gaussian_blur",
    family="blur",
    deterministic=True,
    params={
        "imagenet": (1, 2, 3, 4, 6),
        "tinyimagenet": (0.5, 0.75, 1, 1.25, 1.5),
        "cifar": (0.4, 0.6, 0.7, 0.8, 1),
    },
)
def _gaussian_blur(x: Tensor, c: float, ctx: CorruptionContext) -> Tensor:
    return gaussian(x, c)
