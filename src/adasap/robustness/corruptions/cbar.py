"""The ImageNet-C-bar / CIFAR-10-C-bar corruptions (held-out family ``cbar``): patterns and noise.

Mintun, Kirillov & Xie, "On Interaction Between Augmentations and Corruptions in Natural
Corruption Robustness" (NeurIPS 2021). They were chosen to be perceptually dissimilar to
ImageNet-C's 15, so tuning on them leaves the benchmark untouched. Written in batched torch from
the published definitions (facebookresearch/augmentation-corruption, MIT licence,
``imagenet_c_bar/corrupt.py``); each image draws its own random parameters.

A parameter row is the published severity *level* on a 0-10 scale, mapped to a parameter by
``level * maxval / 10`` as the reference does; lengths the reference gives in pixels of its
square image scale with the shorter image side here. The warping corruptions of the family are
in :mod:`.cbar_warps`; ``docs/corruptions.md`` lists where we differ by design.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adasap.robustness.corruptions.image_ops import rgb_only
from adasap.robustness.corruptions.registry import (
    CorruptionContext,
    CorruptionFunction,
    RandomSource,
    register_corruption,
)

CBAR_FAMILY = "cbar"
_REFERENCE = (
    "https://github.com/facebookresearch/augmentation-corruption/blob/"
    "c7d90e3467fd3dd4ef3753dc02d5ab575cc0b476/imagenet_c_bar"
)
# The two published severity tables (five levels per corruption).
CBAR_LEVEL_SOURCES: dict[str, str] = {
    "imagenet": f"{_REFERENCE}/imagenet_c_bar.csv",
    "cifar": f"{_REFERENCE}/cifar10_c_bar.csv",
}
_GREY = 128 / 255  # the reference's fill colour for cut-outs and lines

Levels = Sequence[float]


def register_cbar(
    name: str,
    *,
    imagenet: Levels | None = None,
    cifar: Levels | None = None,
    deterministic: bool = False,
) -> Callable[[CorruptionFunction], CorruptionFunction]:
    """Register a C-bar corruption with its published levels.

    A corruption published for one dataset only uses those levels in every table; the
    "tinyimagenet" table takes the ImageNet levels where they exist (our choice: the paper has no
    64 px set).
    """
    published = {"imagenet": imagenet, "cifar": cifar}
    params, sources = {}, {}
    for table in ("imagenet", "tinyimagenet", "cifar"):
        origin = "cifar" if table == "cifar" else "imagenet"
        if published[origin] is None:
            origin = "imagenet" if origin == "cifar" else "cifar"
        params[table] = tuple(published[origin])
        sources[table] = CBAR_LEVEL_SOURCES[origin]
    return register_corruption(
        name,
        family=CBAR_FAMILY,
        held_out=True,
        deterministic=deterministic,
        params=params,
        sources=sources,
    )


def scaled(level: float, maxval: float) -> float:
    """The reference's float_parameter: a 0-10 level as a fraction of ``maxval``."""
    return level * maxval / 10


def side(x: Tensor) -> int:
    """The image side the reference's size-relative parameters refer to."""
    return min(x.shape[-2:])


def pixel_grid(x: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column coordinates shaped (1, 1, H, 1) and (1, 1, 1, W)."""
    h, w = x.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32, device=x.device).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32, device=x.device).view(1, 1, 1, w)
    return ys, xs


def per_image(values: Tensor) -> Tensor:
    """Shape (N,) values to (N, 1, 1, 1), to broadcast over images."""
    return values.view(-1, 1, 1, 1)


# --------------------------------------------------------------------------- spectral noise


def _spectral_noise(
    x: Tensor, rng: RandomSource, channels: int, amplitude: Callable[[Tensor], Tensor]
) -> Tensor:
    """Gaussian noise with amplitude spectrum ``amplitude(|k|)``, standardised per map.

    ``|k|`` is the frequency in cycles per shorter image side, as the reference's spectrum
    indices on its square images.
    """
    n, _, h, w = x.shape
    white = rng.normal((n, channels, h, w))
    fy = torch.fft.fftfreq(h, device=x.device).view(h, 1)
    fx = torch.fft.rfftfreq(w, device=x.device).view(1, -1)
    k = side(x) * torch.sqrt(fy**2 + fx**2)
    noise = torch.fft.irfft2(torch.fft.rfft2(white) * amplitude(k), s=(h, w))
    noise = noise - noise.mean(dim=(2, 3), keepdim=True)
    return noise / noise.std(dim=(2, 3), keepdim=True).clamp_min(1e-12)


@register_cbar(
    "blue_noise_sample", imagenet=(0.8, 1.6, 2.4, 4.0, 5.6), cifar=(0.7, 1.4, 2.1, 3.5, 4.2)
)
def _blue_noise_sample(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    # Blacks out the pixels where high-frequency (blue) noise falls below a threshold.
    noise = _spectral_noise(x, ctx.rng, 1, lambda k: k)
    return x * (noise > scaled(level, 3.0) - 2.5)


@register_cbar("brownish_noise", imagenet=(1, 2, 3, 4, 5), cifar=(2.5, 4.0, 5.5, 6.5, 7.0))
def _brownish_noise(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    noise = _spectral_noise(x, ctx.rng, x.shape[1], lambda k: 1 / (k**2 + 1))
    return x + scaled(level, 64) / 255 * noise


# --------------------------------------------------------------------------- periodic patterns


@register_cbar("single_frequency_greyscale", imagenet=(1.0, 1.5, 2.0, 4.5, 5.0))
def _single_frequency_greyscale(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    n = x.shape[0]
    major = ctx.rng.uniform((n,), -math.pi, math.pi)
    minor = ctx.rng.uniform((n,), -1, 1) * major.abs()
    swap = ctx.rng.uniform((n,)) < 0.5
    phase = ctx.rng.uniform((n,), 0, 2 * math.pi)
    fx, fy = torch.where(swap, minor, major), torch.where(swap, major, minor)
    ys, xs = pixel_grid(x)
    wave = torch.sin(xs * per_image(fx) + ys * per_image(fy) + per_image(phase))
    return x + scaled(level, 196) / 255 * wave


@register_cbar("cocentric_sine_waves", imagenet=(3, 5, 8, 9, 10))
def _cocentric_sine_waves(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    n, _, h, w = x.shape
    size = side(x)
    x0 = per_image(ctx.rng.uniform((n,), 0, w))
    y0 = per_image(ctx.rng.uniform((n,), 0, h))
    freq = per_image(ctx.rng.uniform((n,), 0, 10))
    amplitude = per_image(ctx.rng.uniform((n,), 0, size / 10))
    ring_width = per_image(ctx.rng.uniform((n,), 0, size / 10)).clamp_min(1e-3)
    ys, xs = pixel_grid(x)
    dx, dy = xs - x0, ys - y0
    wobble = torch.sin(torch.atan2(dx, dy) * freq) * amplitude
    rings = torch.remainder(torch.sqrt(dx**2 + dy**2) + wobble, ring_width) / ring_width - 0.5
    return x + scaled(level, 128) / 255 * rings


@register_cbar("plasma_noise", imagenet=(4.75, 7.0, 8.5, 9.25, 10.0))
@rgb_only
def _plasma_noise(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    n = x.shape[0]
    time = per_image(ctx.rng.uniform((n,), 0, 6 * math.pi))
    iterations = per_image(ctx.rng.integers(4, 7, (n,)))
    sharpness = per_image(ctx.rng.uniform((n,), 0.5, 1.0))
    scale = per_image(ctx.rng.uniform((n,), 0.075, 0.2) * side(x))
    ys, xs = pixel_grid(x)
    px, py = xs / scale, ys / scale
    freq, speed, damping = 1.0, torch.ones_like(time), torch.ones_like(time)
    # The reference also carries a phase term that starts at 0 and is only ever multiplied.
    for step in range(6):
        r0 = torch.cos(py * freq + time / speed) / damping
        r1 = torch.sin(px * freq + time / speed) / damping
        r0, r1 = r0 - 0.3 * r1, r1 + 0.3 * r0
        active = step < iterations
        px, py = torch.where(active, px + r0, px), torch.where(active, py + r1, py)
        freq, speed, damping = freq * 1.93, speed * 1.15, damping * (2.25 - sharpness)
    plasma = torch.cat(
        (
            torch.sin(px - time),
            torch.sin((px + py + torch.sin(time)) * 0.5),
            torch.sin(py + time),
        ),
        dim=1,
    )
    strength = scaled(level, 64) / 255
    return (1 - strength) * x + strength * plasma


def _perlin(u: Tensor, v: Tensor, perm: Tensor, grad: Tensor) -> Tensor:
    """2-D gradient noise at (u, v) (shape (N, P)), one lattice (perm, grad) per image."""
    size = perm.shape[1]
    iu, iv = torch.floor(u), torch.floor(v)
    fu, fv = u - iu, v - iv
    iu, iv = iu.long(), iv.long()

    def corner(du: int, dv: int) -> Tensor:
        row = perm.gather(1, (iu + du) % size)
        cell = perm.gather(1, (row + iv + dv) % size)
        return grad[..., 0].gather(1, cell) * (fu - du) + grad[..., 1].gather(1, cell) * (fv - dv)

    su, sv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    near = torch.lerp(corner(0, 0), corner(1, 0), su)
    far = torch.lerp(corner(0, 1), corner(1, 1), su)
    return 1.5 * torch.lerp(near, far, sv)


@register_cbar("perlin_noise", imagenet=(4.6, 5.2, 5.8, 7.6, 8.8))
def _perlin_noise(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    n, _, h, w = x.shape
    lattice = 256
    perm = ctx.rng.uniform((n, lattice)).argsort(dim=1)
    angle = ctx.rng.uniform((n, lattice), 0, 2 * math.pi)
    grad = torch.stack((torch.cos(angle), torch.sin(angle)), dim=-1)
    ys, xs = pixel_grid(x)
    cell = 32 * side(x) / 224  # features of 32 px on a 224 px image
    u = (ys / cell).expand(n, 1, h, w).reshape(n, -1)
    v = (xs / cell).expand(n, 1, h, w).reshape(n, -1)
    turbulence = sum(_perlin(f * u, f * v, perm, grad).abs() / f for f in (1, 2, 4, 8, 16))
    clouds = (0.5 * turbulence + 0.5).clamp(0, 1).view(n, 1, h, w)
    alpha = scaled(level, 0.5)
    return (1 - alpha) * x + alpha * clouds


# --------------------------------------------------------------------------- occlusions


@register_cbar("checkerboard_cutout", imagenet=(2, 3, 4, 5, 6), cifar=(1, 2, 3, 4, 5))
def _checkerboard_cutout(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    n = x.shape[0]
    cells = 64  # more than the cells any image spans (a cell is at least a tenth of the side)
    angle = per_image(ctx.rng.uniform((n,), 0, 2 * math.pi))
    scale = per_image((ctx.rng.uniform((n,), 0.1, 0.25) * side(x)).clamp_min(1))
    chosen = ctx.rng.uniform((n, cells * cells)) < scaled(level, 1.0)
    ys, xs = pixel_grid(x)
    u = torch.floor((torch.cos(angle) * ys + torch.sin(angle) * xs) / scale).long()
    v = torch.floor((-torch.sin(angle) * ys + torch.cos(angle) * xs) / scale).long()
    index = ((u % cells) * cells + v % cells).view(n, -1)
    cut = (u % 2 == v % 2) & chosen.gather(1, index).view_as(u)
    return torch.where(cut, _GREY, x)


@register_cbar("lines", cifar=(0.5, 1.0, 1.5, 2.0, 2.5))
def _lines(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    n, _, h, w = x.shape
    size = side(x)
    # Draws for the most lines any level gives, so a higher severity adds lines to the same ones.
    angle = per_image(ctx.rng.uniform((n,), 0, 2 * math.pi))
    spread = per_image(ctx.rng.uniform((n,), 0.1, 1.0))
    draws = ctx.rng.uniform((n, size, 3))
    count = max(1, int(scaled(level, 1.0) * size))  # at least one line (ours: for tiny images)
    ys, xs = pixel_grid(x)
    kept = torch.ones((n, 1, h, w), device=x.device)
    for i in range(count):
        cy, cx = per_image(draws[:, i, 0] * h), per_image(draws[:, i, 1] * w)
        a = angle + 2 * math.pi * spread * (per_image(draws[:, i, 2]) - 0.5)
        dy, dx = torch.cos(a), torch.sin(a)
        along = ((ys - cy) * dy + (xs - cx) * dx).clamp(-size, size)
        dist = torch.sqrt((ys - cy - along * dy) ** 2 + (xs - cx - along * dx) ** 2)
        kept = kept * (1 - (1 - dist).clamp(0, 1))  # anti-aliased, one pixel wide
    return _GREY + (x - _GREY) * kept


# --------------------------------------------------------------------------- sparkles


def _star(
    x: Tensor,
    cy: Tensor,
    cx: Tensor,
    lengths: Tensor,
    rays: Tensor,
    power: float,
) -> Tensor:
    """The reference's star weight in [0, 1] per pixel: rays of ``lengths`` around (cy, cx).

    ``lengths`` is (N, R) with the first ``rays[i]`` entries used for image i.
    """
    n, _, h, w = x.shape
    ys, xs = pixel_grid(x)
    dy, dx = ys - per_image(cy), xs - per_image(cx)
    turn = (torch.atan2(dx, dy) + math.pi) / (2 * math.pi) * per_image(rays.float())
    ray = torch.floor(turn)
    frac = turn - ray
    first = (ray.long() % per_image(rays)).view(n, -1)
    second = (first.view_as(ray) + 1) % per_image(rays)
    start = lengths.gather(1, first).view_as(ray)
    length = start + frac * (lengths.gather(1, second.view(n, -1)).view_as(ray) - start)
    reach = (length**2 / (dx**2 + dy**2 + 1e-4)) ** power
    return ((1 - (frac - 0.5) ** 2) * reach).clamp(0, 1)


@register_cbar("sparkles", imagenet=(1, 2, 3, 5, 6), cifar=(0.7, 3.5, 5.6, 6.3, 7.0))
def _sparkles(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    n, _, h, w = x.shape
    stars, most_rays = 5, 199
    cy = ctx.rng.uniform((n, stars), 0, h)
    cx = ctx.rng.uniform((n, stars), 0, w)
    rays = ctx.rng.integers(50, most_rays + 1, (n, stars))
    radius = scaled(level, 0.1) * side(x)
    jitter = ctx.rng.normal((n, stars, most_rays))
    lengths = (radius + 0.25 * radius * jitter).clamp_min(1)
    for s in range(stars):
        glow = _star(x, cy[:, s], cx[:, s], lengths[:, s], rays[:, s], power=1.0)
        x = x + glow * (1 - x)
    return x


@register_cbar("inverse_sparkles", imagenet=(1, 2, 4, 9, 10), cifar=(1.0, 1.5, 2.5, 4.5, 5.0))
def _inverse_sparkles(x: Tensor, level: float, ctx: CorruptionContext) -> Tensor:
    n, _, h, w = x.shape
    most_rays = 199
    cy = ctx.rng.uniform((n,), 0.25 * h, 0.75 * h)
    cx = ctx.rng.uniform((n,), 0.25 * w, 0.75 * w)
    rays = ctx.rng.integers(50, most_rays + 1, (n,))
    radius = 0.25 * side(x)
    lengths = radius + 0.25 * radius * ctx.rng.normal((n, most_rays))
    # The reference's "amount" 100 - 6.5 level enters as the exponent (100 - amount) / 50.
    keep = _star(x, cy, cx, lengths, rays, power=scaled(level, 65) / 50)
    return 1 + keep * (x - 1)
