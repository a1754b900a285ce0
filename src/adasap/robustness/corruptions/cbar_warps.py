"""The C-bar corruptions that resample the image: refraction, warps, rotation blur, aberration.

Part of the held-out family ``cbar`` (see :mod:`.cbar` for the source and the level scale).
Every one reads the image through :func:`sample`, bilinear with zeros outside as the reference's
``bilinear_interpolation``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from adasap.robustness.corruptions.cbar import per_image, pixel_grid, register_cbar, scaled, side
from adasap.robustness.corruptions.image_ops import gaussian, rgb_only
from adasap.robustness.corruptions.registry import CorruptionContext


def sample(x: Tensor, sy: Tensor, sx: Tensor) -> Tensor:
    """``x`` read at pixel coordinates (sy, sx) (each (N, 1, H, W)), bilinear, zeros outside."""
    h, w = x.shape[-2:]
    n = x.shape[0]
    grid = torch.stack(
        (
            (sx * (2 / (w - 1)) - 1).expand(n, 1, h, w)[:, 0],
            (sy * (2 / (h - 1)) - 1).expand(n, 1, h, w)[:, 0],
        ),
        dim=-1,
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


# --------------------------------------------------------------------------- caustic refraction


def _caustics(x: Tensor, time: Tensor, cell: Tensor) -> Tensor:
    """The reference's caustic light pattern in [0, 1], (N, 1, H, W), tiling every ``cell`` px."""
    ys, xs = pixel_grid(x)
    p0 = torch.remainder(ys / cell, 1) * (2 * math.pi) - 250
    p1 = torch.remainder(xs / cell, 1) * (2 * math.pi) - 250
    i0, i1 = p0, p1
    total = torch.ones_like(p0 + p1)
    for k in range(5):
        t = time * (1 - 3.5 / (k + 1))
        i0, i1 = (
            p0 + torch.cos(t - i0) + torch.sin(t + i1),
            p1 + torch.sin(t - i1) + torch.cos(t + i0),
        )
        # 1 / |(p0 / (sin(i0 + t) / 0.005), p1 / (cos(i1 + t) / 0.005))|
        a = p0 * 0.005 / torch.sin(i0 + t)
        b = p1 * 0.005 / torch.cos(i1 + t)
        total = total + torch.rsqrt(a**2 + b**2)
    brightness = 1.17 - (total / 5) ** 1.4
    return (brightness.abs() ** 8).clamp(0, 1)


@register_cbar("caustic_refraction", imagenet=(2.35, 3.2, 4.9, 6.6, 9.15))
def _caustic_refraction(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    """Light through a rippled water surface: refraction by the caustics' slope, plus shading."""
    n, _, h, w = x.shape
    size, eta = side(x), 4.0
    time = per_image(ctx.rng.uniform((n,), 0.5, 2.0))
    cell = per_image(ctx.rng.uniform((n,), 0.75, 1.25) * size)
    lens_scale, lighting = scaled(level, 0.5 * size), scaled(level, 2.0)
    caustics = gaussian(_caustics(x, time, cell), 1.0, mode="symmetric")
    padded = F.pad(caustics, (1, 1, 1, 1))  # the reference reads zeros outside
    up, down = padded[..., :-2, 1:-1], padded[..., 2:, 1:-1]
    left, right = padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]
    # The lens normal (down - up, right - left, 1), normalised; a vertical ray refracted into a
    # medium of index eta leaves along the normal's tilt times this factor.
    gy, gx = down - up, right - left
    norm = torch.sqrt(gy**2 + gx**2 + 1)
    tilt2 = (gy**2 + gx**2) / norm**2
    factor = torch.sqrt(1 - tilt2 / eta**2) - 1 / (norm * eta)
    factor = torch.where(1 / norm >= 1 - 1e-3, 0.0, factor) * lens_scale / norm
    ys, xs = pixel_grid(x)
    out = sample(x, ys + gy * factor, xs + gx * factor)
    return out + ((left - right) + (down - up)) * lighting


# --------------------------------------------------------------------------- warps


def _pinch_cells(table: str, size: int) -> int:
    """Cells per axis: the reference's 5 at ImageNet size, else 3; never under 8 px (ours)."""
    return max(1, min(5 if table == "imagenet" else 3, size // 8))


@register_cbar("pinch_and_twirl", cifar=(5.5, 6.0, 6.5, 8.5, 10.0))
def _pinch_and_twirl(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    """A grid of cells, each pinched towards and twirled around its centre."""
    n, _, h, w = x.shape
    cells = _pinch_cells(ctx.table, side(x))
    signs = torch.where(ctx.rng.uniform((n, cells * cells)) < 0.5, -1.0, 1.0)
    amount = scaled(level, 0.4) + 0.1
    ch, cw = h // cells, w // cells
    radius = min(ch, cw) / 2
    ys, xs = pixel_grid(x)
    row, col = (ys // ch).clamp(max=cells - 1), (xs // cw).clamp(max=cells - 1)
    cy, cx = row * ch + ch / 2, col * cw + cw / 2
    dy, dx = ys - cy, xs - cx
    dist = torch.sqrt(dy**2 + dx**2)
    index = (row * cells + col).long().expand(n, 1, h, w).reshape(n, -1)
    angle = (signs.gather(1, index) * scaled(level, math.pi / 2)).view(n, 1, h, w)
    d = (dist / radius).clamp(max=1)
    pinch = torch.sin(0.5 * math.pi * d).clamp_min(1e-12) ** -amount
    twirl = angle * (1 - d) ** 2
    cos, sin = torch.cos(twirl), torch.sin(twirl)
    sy = cy + pinch * (dy * cos - dx * sin)
    sx = cx + pinch * (dy * sin + dx * cos)
    inside = (dist <= radius) & (dist >= 5e-4) & (ys < cells * ch) & (xs < cells * cw)
    return torch.where(inside, sample(x, sy, sx), x)


@register_cbar("ripple", cifar=(5.5, 6.0, 6.5, 7.5, 8.0))
def _ripple(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    n = x.shape[0]
    size = side(x)
    amplitude = scaled(level, 0.025) * size
    wave_y, wave_x = ctx.rng.uniform((2, n), 0.1 * size, 0.3 * size)
    phase_y, phase_x = ctx.rng.uniform((2, n), 0, 2 * math.pi)
    ys, xs = pixel_grid(x)
    sy = ys + amplitude * torch.sin(2 * math.pi * ys / per_image(wave_y) + per_image(phase_y))
    sx = xs + amplitude * torch.sin(2 * math.pi * xs / per_image(wave_x) + per_image(phase_x))
    return sample(x, sy, sx)


@register_cbar("circular_motion_blur", cifar=(2.8, 3.6, 4.4, 5.2, 6.0), deterministic=True)
def _circular_motion_blur(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    """The image rotated about its centre by 21 angles up to +-1.5 level degrees, averaged."""
    h, w = x.shape[-2:]
    steps = 21
    ys, xs = pixel_grid(x)
    oy, ox = ys - (h - 1) / 2, xs - (w - 1) / 2
    out = torch.zeros_like(x)
    total = 0.0
    for i in range(steps):
        t = 2 * i / (steps - 1) - 1
        weight = math.exp(-2 * t**2)
        a = math.radians(t * scaled(level, 15))
        sy = oy * math.cos(a) - ox * math.sin(a) + (h - 1) / 2
        sx = oy * math.sin(a) + ox * math.cos(a) + (w - 1) / 2
        out = out + weight * sample(x, sy, sx)
        total += weight
    return out / total


@register_cbar("transverse_chromatic_abberation", cifar=(1, 2, 5, 9, 10))
@rgb_only
def _transverse_chromatic_abberation(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    """Each colour channel magnified about the centre by its own factor: 1, 1 + s/2, 1 + s."""
    n, c, h, w = x.shape
    s = scaled(level, 0.5)
    order = ctx.rng.uniform((n, c)).argsort(dim=1)
    zoom = torch.tensor([1.0, 1 + s / 2, 1 + s], device=x.device)[order].view(n * c, 1, 1, 1)
    ys, xs = pixel_grid(x)
    sy = (ys - (h - 1) / 2) / zoom + (h - 1) / 2
    sx = (xs - (w - 1) / 2) / zoom + (w - 1) / 2
    return sample(x.reshape(n * c, 1, h, w), sy, sx).view(n, c, h, w)
