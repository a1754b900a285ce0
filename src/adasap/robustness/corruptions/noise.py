"""Noise corruptions: gaussian, shot and impulse noise (benchmark), speckle noise (extra)."""

from __future__ import annotations

import torch
from torch import Tensor

from adasap.robustness.corruptions.registry import CorruptionContext, register_corruption


@register_corruption(
    "gaussian_noise",
    family="noise",
    benchmark=True,
    deterministic=False,
    params={
        "imagenet": (0.08, 0.12, 0.18, 0.26, 0.38),
        "tinyimagenet": (0.04, 0.08, 0.12, 0.15, 0.18),
        "cifar": (0.04, 0.06, 0.08, 0.09, 0.10),
    },
    draw=lambda x, c, ctx: (ctx.rng.normal(x.shape, std=c),),
)
def _gaussian_noise(x: Tensor, c: float, ctx: CorruptionContext, noise: Tensor) -> Tensor:
    return x + noise


@register_corruption(
    "shot_noise",
    family="noise",
    benchmark=True,
    deterministic=False,
    params={
        "imagenet": (60, 25, 12, 5, 3),
        "tinyimagenet": (250, 100, 50, 30, 15),
        "cifar": (500, 250, 100, 75, 50),
    },
    draw=lambda x, c, ctx: (ctx.rng.poisson(x.clamp(0, 1).mul_(c)),),
)
def _shot_noise(x: Tensor, c: float, ctx: CorruptionContext, counts: Tensor) -> Tensor:
    return counts / c


@register_corruption(
    "impulse_noise",
    family="noise",
    benchmark=True,
    deterministic=False,
    params={
        "imagenet": (0.03, 0.06, 0.09, 0.17, 0.27),
        "tinyimagenet": (0.01, 0.02, 0.05, 0.08, 0.14),
        "cifar": (0.01, 0.02, 0.03, 0.05, 0.07),
    },
    draw=lambda x, c, ctx: (ctx.rng.uniform(x.shape),),
)
def _impulse_noise(x: Tensor, c: float, ctx: CorruptionContext, u: Tensor) -> Tensor:
    # skimage's "s&p": each value flips with probability c, to 1 or 0 with equal odds. One
    # uniform draw decides both: below c/2 salt, between c/2 and c pepper.
    return torch.where(u < c, (u < c / 2).to(x.dtype), x)


@register_corruption(
    "speckle_noise",
    family="noise",
    deterministic=False,
    params={
        "imagenet": (0.15, 0.2, 0.35, 0.45, 0.6),
        "tinyimagenet": (0.15, 0.2, 0.25, 0.3, 0.35),
        "cifar": (0.06, 0.1, 0.12, 0.16, 0.2),
    },
    draw=lambda x, c, ctx: (ctx.rng.normal(x.shape, std=c),),
)
def _speckle_noise(x: Tensor, c: float, ctx: CorruptionContext, noise: Tensor) -> Tensor:
    return x + x * noise
