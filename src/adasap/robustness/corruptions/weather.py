"""Weather corruptions: snow, frost, fog and brightness (benchmark), spatter (extra)."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from adasap.robustness.corruptions.image_ops import (
    clipped_zoom,
    filter2d,
    gaussian,
    luma,
    motion_blur_batch,
    rgb_only,
)
from adasap.robustness.corruptions.opencv_ops import canny, chamfer_distance, equalize_hist
from adasap.robustness.corruptions.registry import (
    CorruptionContext,
    register_corruption,
)


@register_corruption(
    "snow",
    family="weather",
    benchmark=True,
    deterministic=False,
    params={
        "imagenet": (
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ),
        "tinyimagenet": (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.8),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.8),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6),
        ),
        "cifar": (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
    },
    draw=lambda x, c, ctx: (
        ctx.rng.normal((x.shape[0], 1, *x.shape[-2:]), mean=c[0], std=c[1]),  # snow layer
        ctx.rng.uniform((x.shape[0],), -135, -45),  # angles of the flakes' motion blur
    ),
)
def _snow(
    x: Tensor, c: tuple[float, ...], ctx: CorruptionContext, layer: Tensor, angles: Tensor
) -> Tensor:
    _, _, zoom, threshold, radius, sigma, keep = c
    layer = clipped_zoom(layer, zoom)
    layer = torch.where(layer < threshold, 0.0, layer)
    # The reference hands the layer to ImageMagick as 8-bit PNG and reads 8 bits back.
    layer = torch.floor(layer.clamp(0, 1) * 255) / 255
    layer = torch.round(motion_blur_batch(layer, radius, sigma, angles.tolist()) * 255) / 255
    x = keep * x + (1 - keep) * torch.maximum(x, luma(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-2, -1)


_FROST_SEED = 20190301
# The reference resizes its frost photos by these factors before cropping.
FROST_TEXTURE_SCALES: dict[str, float] = {"imagenet": 1.0, "tinyimagenet": 0.3, "cifar": 0.2}
# Per-channel (RGB) mean and std of the reference's frost1..frost5 photos; frost2 and frost3
# are the same photo. Our procedural textures are scaled to these statistics.
_FROST_PALETTES = (
    ((0.305, 0.585, 0.650), (0.106, 0.065, 0.060)),
    ((0.787, 0.805, 0.841), (0.084, 0.087, 0.089)),
    ((0.787, 0.805, 0.841), (0.084, 0.087, 0.089)),
    ((0.540, 0.599, 0.648), (0.112, 0.112, 0.117)),
    ((0.441, 0.484, 0.528), (0.174, 0.170, 0.163)),
)
_FROST_SIZES = ((600, 900), (315, 560), (315, 560), (350, 527), (495, 660))


def _standardize(t: Tensor) -> Tensor:
    return (t - t.mean()) / t.std().clamp_min(1e-12)


def _frost_needles(
    h: int, w: int, y: Tensor, x: Tensor, angle: Tensor, length: Tensor, weight: Tensor
) -> Tensor:
    """Splat tapered line segments onto an (h, w) canvas, summing where they overlap."""
    steps = torch.linspace(0, 1, int(length.max().item() * 1.5) + 2)
    py = (y[:, None] + steps * (length * torch.sin(angle))[:, None]).floor_()
    px = (x[:, None] + steps * (length * torch.cos(angle))[:, None]).floor_()
    inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
    mass = weight[:, None] * (1 - steps) ** 0.7 * inside
    flat = py.clamp_(0, h - 1).long() * w + px.clamp_(0, w - 1).long()
    canvas = torch.zeros(h * w)
    return canvas.index_add_(0, flat.flatten(), mass.flatten()).view(h, w)


@lru_cache(maxsize=len(_FROST_SIZES))
def _frost_pattern(h: int, w: int, seed: int) -> Tensor:
    """A zero-mean, unit-std ice-crystal texture: feathered needles over cloudy value noise."""
    g = torch.Generator().manual_seed(seed)
    cloud = torch.zeros(h, w)
    for octave in range(6):
        cell = 128 / 2**octave
        grid = torch.rand(1, 1, int(h / cell) + 3, int(w / cell) + 3, generator=g)
        up = F.interpolate(grid, scale_factor=cell, mode="bicubic", align_corners=False)
        cloud += 0.6**octave * up[0, 0, :h, :w]
    n = h * w // 200
    y, x = torch.rand(n, generator=g) * h, torch.rand(n, generator=g) * w
    angle = torch.rand(n, generator=g) * 2 * math.pi
    length = torch.exp(torch.empty(n).uniform_(math.log(8), math.log(90), generator=g))
    weight = 0.3 + 0.7 * torch.rand(n, generator=g)
    needles = _frost_needles(h, w, y, x, angle, length, weight)
    branches = 10
    for side in (-1, 1):  # feathery side branches at +-60 degrees
        t = torch.rand(n, branches, generator=g)
        by = (y[:, None] + t * (length * torch.sin(angle))[:, None]).flatten()
        bx = (x[:, None] + t * (length * torch.cos(angle))[:, None]).flatten()
        b_angle = (angle[:, None] + side * math.pi / 3).expand(n, branches).flatten()
        b_length = ((1 - t) * length[:, None] * 0.25).flatten()
        b_weight = (0.7 * weight[:, None]).expand(n, branches).flatten()
        needles += _frost_needles(h, w, by, bx, b_angle, b_length, b_weight)
    needles = gaussian(needles[None, None], 0.6, truncate=3.0)[0, 0]
    needles = 1 - torch.exp(-0.5 * needles)  # overlapping crystals saturate to white
    return _standardize(0.8 * _standardize(cloud) + _standardize(needles))


@lru_cache(maxsize=8)
def _frost_textures(scale: float) -> tuple[Tensor, ...]:
    """Five RGB frost textures in [0, 1], resized by ``scale`` the way the reference resizes."""
    textures = []
    for i, ((mean, std), (h, w)) in enumerate(zip(_FROST_PALETTES, _FROST_SIZES, strict=True)):
        pattern = _frost_pattern(h, w, _FROST_SEED + i)
        rgb = torch.tensor(mean)[:, None, None] + torch.tensor(std)[:, None, None] * pattern
        if scale != 1.0:
            # cv2.resize(..., fx=scale) with INTER_LINEAR: bilinear, no anti-aliasing.
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            rgb = F.interpolate(rgb[None], size=size, mode="bilinear", align_corners=False)[0]
        textures.append(rgb.clamp(0, 1).contiguous())
    return tuple(textures)


@lru_cache(maxsize=32)
def _frost_texture(table: str, index: int, h: int, w: int) -> Tensor:
    """Frost texture ``index`` of ``table``, enlarged if needed to give h x w crops (read only)."""
    tex = _frost_textures(FROST_TEXTURE_SCALES[table])[index]
    th, tw = tex.shape[-2:]
    if th <= h or tw <= w:
        # Like imagecorruptions: enlarge a texture that is too small, with 10% to spare.
        grow = 1.1 * max(h / th, w / tw)
        size = (math.ceil(th * grow), math.ceil(tw * grow))
        tex = F.interpolate(tex[None], size=size, mode="bicubic", align_corners=False)[0]
    return tex


def _frost_crops(x: Tensor, c: tuple[float, float], ctx: CorruptionContext) -> tuple[Tensor, ...]:
    """Which texture each image gets, and the top left corner of its crop."""
    n, _, h, w = x.shape
    choice = ctx.rng.integers(0, len(_FROST_SIZES), (n,))
    corners = []
    for i in choice.tolist():
        th, tw = _frost_texture(ctx.table, i, h, w).shape[-2:]
        corners.append((ctx.rng.integers(0, th - h, (1,)), ctx.rng.integers(0, tw - w, (1,))))
    tops, lefts = (torch.cat(column) for column in zip(*corners, strict=True))
    return choice, tops, lefts


@register_corruption(
    "frost",
    family="weather",
    benchmark=True,
    deterministic=False,
    params={
        "imagenet": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
        "tinyimagenet": ((1, 0.3), (0.9, 0.4), (0.8, 0.45), (0.75, 0.5), (0.7, 0.55)),
        "cifar": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    },
    draw=_frost_crops,
)
def _frost(
    x: Tensor,
    c: tuple[float, float],
    ctx: CorruptionContext,
    choice: Tensor,
    tops: Tensor,
    lefts: Tensor,
) -> Tensor:
    _, channels, h, w = x.shape
    crops = []
    for i, top, left in zip(choice.tolist(), tops.tolist(), lefts.tolist(), strict=True):
        tex = _frost_texture(ctx.table, i, h, w)
        crops.append(tex[:, top : top + h, left : left + w])
    frost = torch.stack(crops).to(x.device, x.dtype).clamp_(0, 1)
    if channels == 1:
        frost = luma(frost)
    return c[0] * x + c[1] * frost


def _plasma_draws(x: Tensor, c: tuple[float, float], ctx: CorruptionContext) -> tuple[Tensor, ...]:
    """Fog's random numbers: the diamond-square's, level by level (squares, left, top), for a
    fractal the next power of two above the image side, as imagecorruptions makes."""
    size = 1 << (max(x.shape[-2:]) - 1).bit_length()
    step, wibble, draws = size, 100.0, []
    while step >= 2:
        shape = (x.shape[0], size // step, size // step)
        draws += [ctx.rng.uniform(shape, -wibble, wibble) for _ in range(3)]
        step, wibble = step // 2, wibble / c[1]
    return tuple(draws)


def _plasma_fractal(draws: tuple[Tensor, ...], decay: float) -> Tensor:
    """The reference's diamond-square height map from its random numbers, scaled to [0, 1]."""
    n, size = draws[0].shape[0], draws[-1].shape[-1] * 2
    grid = torch.zeros(n, size, size, device=draws[0].device)
    step, wibble, numbers = size, 100.0, iter(draws)

    def wibbled(total: Tensor) -> Tensor:
        return total / 4 + wibble * next(numbers)

    while step >= 2:
        half = step // 2
        corners = grid[:, 0:size:step, 0:size:step]
        squares = corners + corners.roll(-1, 1)
        squares = squares + squares.roll(-1, 2)
        grid[:, half:size:step, half:size:step] = wibbled(squares)
        centres = grid[:, half:size:step, half:size:step]
        corners = grid[:, 0:size:step, 0:size:step]
        left = centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        grid[:, 0:size:step, half:size:step] = wibbled(left)
        top = centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        grid[:, half:size:step, 0:size:step] = wibbled(top)
        step //= 2
        wibble /= decay
    low = grid.amin(dim=(1, 2), keepdim=True)
    grid = grid - low
    return grid / grid.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


@register_corruption(
    "fog",
    family="weather",
    benchmark=True,
    deterministic=False,
    params={
        "imagenet": ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
        "tinyimagenet": ((0.4, 3), (0.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)),
        "cifar": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    },
    draw=_plasma_draws,
)
def _fog(x: Tensor, c: tuple[float, float], ctx: CorruptionContext, *draws: Tensor) -> Tensor:
    fog = _plasma_fractal(draws, c[1])[:, None, : x.shape[-2], : x.shape[-1]]
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + c[0] * fog) * max_val / (max_val + c[0])


@register_corruption(
    "brightness",
    family="weather",
    benchmark=True,
    deterministic=True,
    params={
        "imagenet": (0.1, 0.2, 0.3, 0.4, 0.5),
        "tinyimagenet": (0.1, 0.2, 0.3, 0.4, 0.5),
        "cifar": (0.05, 0.1, 0.15, 0.2, 0.3),
    },
)
def _brightness(x: Tensor, c: float, ctx: CorruptionContext) -> Tensor:
    # Adding c to HSV value scales every channel by V'/V (black pixels become grey V').
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * (v_new / v.clamp_min(1e-12)), v_new)


@register_corruption(
    "spatter",
    family="weather",
    deterministic=False,
    params={
        "imagenet": (
            (0.65, 0.3, 4, 0.69, 0.6, 0),
            (0.65, 0.3, 3, 0.68, 0.6, 0),
            (0.65, 0.3, 2, 0.68, 0.5, 0),
            (0.65, 0.3, 1, 0.65, 1.5, 1),
            (0.67, 0.4, 1, 0.65, 1.5, 1),
        ),
        "tinyimagenet": (
            (0.62, 0.1, 0.7, 0.7, 0.6, 0),
            (0.65, 0.1, 0.8, 0.7, 0.6, 0),
            (0.65, 0.3, 1, 0.69, 0.6, 0),
            (0.65, 0.1, 0.7, 0.68, 0.6, 1),
            (0.65, 0.1, 0.5, 0.67, 0.6, 1),
        ),
        "cifar": (
            (0.62, 0.1, 0.7, 0.7, 0.5, 0),
            (0.65, 0.1, 0.8, 0.7, 0.5, 0),
            (0.65, 0.3, 1, 0.69, 0.5, 0),
            (0.65, 0.1, 0.7, 0.69, 0.6, 1),
            (0.65, 0.1, 0.5, 0.68, 0.6, 1),
        ),
    },
)
@rgb_only
def _spatter(x: Tensor, c: tuple[float, ...], ctx: CorruptionContext) -> Tensor:
    loc, scale, sigma, threshold, strength, mud = c
    n, _, h, w = x.shape
    liquid = gaussian(ctx.rng.normal((n, 1, h, w), mean=loc, std=scale), sigma)
    liquid = torch.where(liquid < threshold, 0.0, liquid)
    if mud:
        return _mud(x, liquid, threshold, strength)
    return _water(x, liquid, strength)


def _water(x: Tensor, liquid: Tensor, strength: float) -> Tensor:
    """Spatter's water drops: shaded by an embossed distance-to-edge map, as the reference does."""
    edges = canny(torch.floor(liquid.clamp(0, 1) * 255), low=50, high=150)
    dist = chamfer_distance(edges, cap=20.0)
    dist = torch.floor(filter2d(dist, torch.full((3, 3), 1 / 9)))  # cv2.blur, then uint8
    dist = equalize_hist(dist)
    emboss = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])
    dist = torch.round(filter2d(dist, emboss)).clamp_(0, 255)
    dist = torch.round(filter2d(dist, torch.full((3, 3), 1 / 9)))
    m = liquid * dist
    peak = m.amax(dim=(1, 2, 3), keepdim=True)
    m = torch.where(peak > 0, m / peak.clamp_min(1e-12), 0.0) * strength
    color = torch.tensor((175, 238, 238), dtype=x.dtype, device=x.device).view(1, 3, 1, 1) / 255
    return x + m * color


def _mud(x: Tensor, liquid: Tensor, threshold: float, sigma: float) -> Tensor:
    m = gaussian((liquid > threshold).to(x.dtype), sigma)
    m = torch.where(m < 0.8, 0.0, m)
    color = torch.tensor((63, 42, 20), dtype=x.dtype, device=x.device).view(1, 3, 1, 1) / 255
    return x * (1 - m) + color * m
