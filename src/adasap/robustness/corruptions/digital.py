"""Digital corruptions.

Benchmark: contrast, elastic_transform, pixelate, jpeg_compression. Extra: saturate.
"""

from __future__ import annotations

import io

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
)
def _elastic_transform(x: Tensor, c: tuple[float, float, float], ctx: CorruptionContext) -> Tensor:
    n, _, h, w = x.shape
    scale = ctx.length_scale(h, w)
    alpha, sigma, jitter = (v * scale for v in c)
    dev = x.device
    # Random affine: move three points around the centre by up to `jitter` px (cv2 x, y order).
    cx, cy, size = w // 2, h // 2, min(h, w) // 3
    src = torch.tensor(
        [[cx + size, cy + size], [cx + size, cy - size], [cx - size, cy - size]],
        dtype=torch.float64,
        device=dev,
    )
    dst = src + ctx.rng.uniform((n, 3, 2), -jitter, jitter).double()
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
    fields = ctx.rng.uniform((n, 2, h, w), -1, 1)
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
    down_h = _box_resample_matrix(h, sh).to(x.device, x.dtype)
    down_w = _box_resample_matrix(w, sw).to(x.device, x.dtype)
    small = torch.matmul(torch.matmul(down_h, x), down_w.T)
    # Upscaling with BOX picks exactly one source pixel per output pixel.
    rows = _box_resample_matrix(sh, h).argmax(dim=1).to(x.device)
    cols = _box_resample_matrix(sw, w).argmax(dim=1).to(x.device)
    return small.index_select(-2, rows).index_select(-1, cols)


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

    # Pillow on the CPU, as the reference, so every device gets the same bytes. numpy does the
    # layout changes: it transposes uint8 several times faster than torch here.
    images = to_uint8(x).cpu().numpy()
    out = np.empty_like(images)
    for i, chw in enumerate(images):
        hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
        buffer = io.BytesIO()
        Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc).save(
            buffer, "JPEG", quality=int(c)
        )
        out[i] = np.asarray(Image.open(buffer)).reshape(hwc.shape).transpose(2, 0, 1)
    return torch.from_numpy(out).to(x.device, x.dtype).div_(255)


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
