"""Classifiers taking [0, 1] images: ``Normalize``, then a network from a model family.

The families (CIFAR ResNets, torchvision, timm) live in their own modules and register
themselves in :mod:`adasap.models.registry`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adasap.checks import find_classifier
from adasap.errors import UserError, exception_reason, quote
from adasap.models.cifar_resnet import CifarResNet, cifar_resnet_names
from adasap.models.registry import ModelRequest, resolve
from adasap.models.timm_models import timm_names
from adasap.models.torchvision_models import TORCHVISION_SHORTLIST, torchvision_names

__all__ = ["CifarResNet", "Normalize", "build_model", "find_classifier", "list_models"]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean/std as (1, C, 1, 1) buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise UserError(
                f"mean {tuple(mean)} / std {tuple(std)} are invalid: give one value per channel, "
                "std > 0"
            )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def list_models(include_torchvision: bool = False, include_timm: bool = False) -> list[str]:
    """Our short names; optionally every torchvision classifier and every ``timm:<name>``."""
    names = cifar_resnet_names() + list(TORCHVISION_SHORTLIST)
    if include_torchvision:
        names += [n for n in torchvision_names() if n not in names]
    if include_timm:
        names += [f"timm:{n}" for n in timm_names()]
    return names


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    pretrained: bool = False,
) -> nn.Sequential:
    """``Sequential(normalize=Normalize(mean, std), net=classifier)`` taking [0, 1] images.

    ``resnet20/32/44/56/110`` are CIFAR ResNets; other bare names go to torchvision, with the
    first conv taking ``in_channels`` and, for images <= 64 px, a stem that keeps resolution;
    ``timm:<name>`` builds a timm model (``pip install adasap[timm]``).
    """
    if num_classes < 2 or in_channels < 1 or image_size < 1:
        raise UserError(
            f"cannot build {name} for {num_classes} classes, {in_channels} channels, "
            f"{image_size} px: use >= 2 classes and positive sizes"
        )
    if len(mean) != in_channels or len(std) != in_channels:
        raise UserError(
            f"mean/std have {len(mean)}/{len(std)} values for {in_channels} channels: "
            "give one per channel"
        )
    found = resolve(name)
    if found is None:
        raise UserError(
            f"unknown model {quote(name)}: choose one of {', '.join(list_models())}, any "
            "torchvision "
            "classifier name (torchvision.models.list_models()) or timm:<name>"
        )
    family, key = found
    net = family.build(key, ModelRequest(num_classes, in_channels, image_size, pretrained))
    adapted = family.prefix == "cifar" or (
        family.prefix == "torchvision" and key in TORCHVISION_SHORTLIST and not pretrained
    )
    if not adapted:  # models we did not adapt may reject the image size
        _check_runs(net, name, in_channels, image_size)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def _check_runs(net: nn.Module, name: str, in_channels: int, image_size: int) -> None:
    """One eval-mode forward pass on a blank image of the requested size."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, in_channels, image_size, image_size))
    # ArithmeticError: window and grid partitions of a too small map divide by zero (timm's
    # MaxViT at 28 px)
    except (RuntimeError, ValueError, AssertionError, ArithmeticError) as exc:
        reason = exception_reason(exc)
        raise UserError(
            f"{name} cannot run on {image_size}px images ({reason}): pick another model "
            f"or image size, e.g. resnet18"
        ) from None
    finally:
        net.train(was_training)
