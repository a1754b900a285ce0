"""Digital corruptions.

Benchmark: contrast, elastic_transform, pixelate, jpeg_compression. Extra: saturate.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adasap.robustness.corruptions.image_ops import gaussian, rgb_only, to_uint8
from adasap.robustness.corruptions.registry import CorruptionContext, register_corruption


@register_corruption(
    "contrast",
    family="digital",
    benchmark=True,
    deterministic=True,
    params={
        "imagenet": (0.4, 0.3, 0.2, 0.1, 0.05),
        "tinyimagenet": (0.4, 0.3, 0.2, 0.1, 0.05),
        "cifar": (0.75, 0.5, 0.4, 0.3, 0.15),
    },
)
def _contrast(x: Tensor, c: float, ctx: CorruptionContext) -> Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


def _elastic_draw(
    x: Tensor, c: tuple[float, float, float], ctx: CorruptionContext
) -> tuple[Tensor, Tensor]:
    """Moves of the affine's three points (N, 3, 2) and the raw displacement fields (N, 2, H, W)."""
    n, _, h, w = x.shape
    jitter = c[2] * ctx.length_scale(h, w)
    return ctx.rng.uniform((n, 3, 2), -jitter, jitter), ctx.rng.uniform((n, 2, h, w), -1, 1)


# Rows are pixel lengths (alpha, sigma, affine jitter) for the table's image size
# (PARAM_TABLE_SIZES), scaled by the images' shorter side.
@register_corruption(
    "elastic_transform",
    family="digital",
    benchmark=True,
    deterministic=False,
    params={
        "imagenet": (
            (244 * 2, 244 * 0.7, 244 * 0.1),
            (244 * 2, 244 * 0.08, 244 * 0.2),
            (244 * 0.05, 244 * 0.01, 244 * 0.02),
            (244 * 0.07, 244 * 0.01, 244 * 0.02),
            (244 * 0.12, 244 * 0.01, 244 * 0.02),
        ),
        "tinyimagenet": (
            (64 * 0, 64 * 0, 64 * 0.08),
            (64 * 0.05, 64 * 0.3, 64 * 0.06),
            (64 * 0.1, 64 * 0.08, 64 * 0.06),
            (64 * 0.1, 64 * 0.03, 64 * 0.03),
            (64 * 0.16, 64 * 0.03, 64 * 0.02),
        ),
        "cifar": (
            (32 * 0, 32 * 0, 32 * 0.08),
            (32 * 0.05, 32 * 0.2, 32 * 0.07),
            (32 * 0.08, 32 * 0.06, 32 * 0.06),
            (32 * 0.1, 32 * 0.04, 32 * 0.05),
            (32 * 0.1, 32 * 0.03, 32 * 0.03),
        ),
    },
    draw=_elastic_draw,
)
def _elastic_transform(
    x: Tensor, c: tuple[float, float, float], ctx: CorruptionContext, moves: Tensor, fields: Tensor
) -> Tensor:
    n, _, h, w = x.shape
    alpha, sigma, _ = (v * ctx.length_scale(h, w) for v in c)
    dev = x.device
    # Random affine: move three points around the centre by up to `jitter` px (cv2 x, y order).
    cx, cy, size = w // 2, h // 2, min(h, w) // 3
    src = torch.tensor(
        [[cx + size, cy + size], [cx + size, cy - size], [cx - size, cy - size]],
        dtype=torch.float64,
        device=dev,
    )
    dst = src + moves.double()
    ones = torch.ones(3, 1, dtype=torch.float64, device=dev)
    forward = torch.linalg.solve(torch.cat([src, ones], 1), dst)  # (n, 3, 2): [x y 1] @ M
    square = torch.zeros(n, 3, 3, dtype=torch.float64, device=dev)
    square[:, :, :2] = forward
    square[:, 2, 2] = 1
    inverse = torch.linalg.inv(square)[:, :, :2].float()  # warpAffine samples at M^-1 p
    ys, xs = torch.meshgrid(
        torch.arange(h, device=dev, dtype=x.dtype),
        torch.arange(w, device=dev, dtype=x.dtype),
        indexing="ij",
    )
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    sample = torch.matmul(points, inverse).view(n, h, w, 2)
    # align_corners=True reflection is OpenCV's BORDER_REFLECT_101 about the edge pixels.
    grid = sample / torch.tensor([w - 1, h - 1], device=dev, dtype=x.dtype) * 2 - 1
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    # Smooth random displacement field, skimage gaussian(mode="reflect", truncate=3).
    fields = gaussian(fields, sigma, mode="symmetric", truncate=3.0) * alpha
    dx, dy = fields[:, 0], fields[:, 1]
    # map_coordinates(order=1, mode="reflect") reflects about the outer pixel edges, which is
    # grid_sample's reflection with align_corners=False.
    gx = (xs + dx + 0.5) / w * 2 - 1
    gy = (ys + dy + 0.5) / h * 2 - 1
    grid = torch.stack([gx, gy], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _box_resample_matrix(n_in: int, n_out: int) -> Tensor:
    """Pillow's BOX resampling weights (out x in), as its precompute_coeffs computes them."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    matrix = np.zeros((n_out, n_in))
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = (np.arange(lo, hi) - center + 0.5) / filterscale
        weights = ((taps > -0.5) & (taps <= 0.5)).astype(np.float64)
        if weights.sum() > 0:
            matrix[o, lo:hi] = weights / weights.sum()
    return torch.from_numpy(matrix).float()


@lru_cache(maxsize=64)
def _box_taps(n_in: int, n_out: int) -> tuple[Tensor, Tensor]:
    """Pillow's BOX downscaling as taps: input rows (taps * n_out,) and weights (taps, n_out).

    Each output averages a window of a few inputs, so gathering those beats a dense matrix
    product (3x at 224 px). Cached: do not modify the results.
    """
    matrix = _box_resample_matrix(n_in, n_out)
    inside = matrix > 0
    first, counts = inside.int().argmax(dim=1), inside.sum(dim=1)
    tap = torch.arange(int(counts.max()))[:, None]
    rows = (first + tap).clamp_(max=n_in - 1)
    weights = torch.where(tap < counts, matrix.gather(1, rows.T).T, 0.0)
    return rows.flatten(), weights


def _box_down(x: Tensor, n_out: int) -> Tensor:
    """Pillow's BOX resize of the rows (dim -2) of ``x`` to ``n_out``, n_out <= rows."""
    rows, weights = _box_taps(x.shape[-2], n_out)
    picked = x.index_select(-2, rows.to(x.device)).unflatten(-2, weights.shape)
    weights = weights.to(x.device, x.dtype)[:, :, None]
    out = picked[..., 0, :, :] * weights[0]
    for tap in range(1, len(weights)):
        out.addcmul_(picked[..., tap, :, :], weights[tap])
    return out


@lru_cache(maxsize=64)
def _box_pick(n_in: int, n_out: int) -> Tensor:
    """The input each output copies when Pillow's BOX upscales n_in to n_out (cached)."""
    return _box_resample_matrix(n_in, n_out).argmax(dim=1)


@register_corruption(
    "pixelate",
    family="digital",
    benchmark=True,
    deterministic=True,
    params={
        "imagenet": (0.6, 0.5, 0.4, 0.3, 0.25),
        "tinyimagenet": (0.9, 0.8, 0.7, 0.6, 0.5),
        "cifar": (0.95, 0.9, 0.85, 0.75, 0.65),
    },
)
def _pixelate(x: Tensor, c: float, ctx: CorruptionContext) -> Tensor:
    h, w = x.shape[-2:]
    sh, sw = max(1, int(h * c)), max(1, int(w * c))
    # Columns are resampled as the rows of the transposed image: row gathers copy whole rows.
    small_t = _box_down(_box_down(x, sh).transpose(-1, -2).contiguous(), sw)  # (N, C, sw, sh)
    # Upscaling with BOX picks exactly one source pixel per output pixel.
    wide_t = small_t.index_select(-2, _box_pick(sw, w).to(x.device))
    return wide_t.transpose(-1, -2).contiguous().index_select(-2, _box_pick(sh, h).to(x.device))


@register_corruption(
    "jpeg_compression",
    family="digital",
    benchmark=True,
    deterministic=True,
    params={
        "imagenet": (25, 18, 15, 10, 7),
        "tinyimagenet": (65, 58, 50, 40, 25),
        "cifar": (80, 65, 58, 50, 40),
    },
)
def _jpeg_compression(x: Tensor, c: int, ctx: CorruptionContext) -> Tensor:
    from PIL import Image

    # Pillow on the CPU, as the reference, so every device gets the same bytes and pixels. It
    # wants interleaved pixels: numpy transposes small images fastest, while for large ones
    # Pillow's own merge and split beat numpy's transposing copies (3x at 224 px). The result
    # stays uint8 levels, which corrupt scales to [0, 1] as it writes its output.
    _, channels, h, w = x.shape
    planar = channels == 3 and h * w > 64 * 64
    levels = to_uint8(x).cpu().numpy()
    for chw in levels:
        if planar:
            bands = [Image.frombuffer("L", (w, h), plane, "raw", "L", 0, 1) for plane in chw]
            image = Image.merge("RGB", bands)
        else:
            hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
            image = Image.fromarray(hwc[..., 0] if channels == 1 else hwc)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(c))
        decoded = Image.open(buffer)
        if planar:
            for plane, band in zip(chw, decoded.split(), strict=True):
                plane[...] = np.asarray(band)
        else:
            chw[...] = np.asarray(decoded).reshape(h, w, channels).transpose(2, 0, 1)
    return torch.from_numpy(levels).to(x.device)


@register_corruption(
    "saturate",
    family="digital",
    deterministic=True,
    params={
        "imagenet": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
        "tinyimagenet": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)),
        "cifar": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
    },
)
@rgb_only
def _saturate(x: Tensor, c: tuple[float, float], ctx: CorruptionContext) -> Tensor:
    # HSV with hue and value fixed: each channel is V - (V - x) * S'/S. A grey pixel has S = 0
    # and hue 0 (red), so a positive offset tints it red, as in skimage's hsv2rgb.
    v = x.amax(dim=1, keepdim=True)
    s = torch.where(v > 0, (v - x.amin(dim=1, keepdim=True)) / v.clamp_min(1e-12), 0.0)
    s_new = (s * c[0] + c[1]).clamp(0, 1)
    coloured = v - (v - x) * (s_new / s.clamp_min(1e-12))
    grey = torch.cat([v, v * (1 - s_new), v * (1 - s_new)], dim=1)
    return torch.where(s > 0, coloured, grey)
