"""Classifiers taking [0, 1] images: ``Normalize``, then a CIFAR ResNet or torchvision net."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from adasap.errors import UserError

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)
# torchvision models whose stems we adapt to small images; any other torchvision name also works.
TORCHVISION_SHORTLIST = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "vgg11_bn")
SMALL_IMAGE_MAX = 64
# Models whose auxiliary heads would make training-mode outputs tuples.
_EXTRA_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


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


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; a 1x1 conv-BN projection when shapes change."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        # Option B: the zero-padding shortcut (option A) has no channels a pruner could remove.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images (He et al. 2016): 3 stages of 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise UserError(f"CIFAR ResNet depth {depth} is invalid: use 6n+2, e.g. 20, 32, 56")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(in_planes, planes, stride)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def list_models(include_torchvision: bool = False) -> list[str]:
    """Our short names; with ``include_torchvision`` every torchvision classifier as well."""
    names = [f"resnet{d}" for d in CIFAR_RESNET_DEPTHS] + list(TORCHVISION_SHORTLIST)
    if include_torchvision:
        names += [n for n in _torchvision_names() if n not in names]
    return names


def _torchvision_names() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def _replace_first_conv(net: nn.Module, in_channels: int, **changes: Any) -> None:
    """Swap the first Conv2d for one taking ``in_channels`` (and any other ``changes``)."""
    name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    args = {
        "in_channels": in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        **changes,
    }
    new = nn.Conv2d(**args)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name), attr, new)


def _adapt_small_images(net: nn.Module, image_size: int, num_classes: int) -> None:
    """Keep resolution in the stem so that <= 64 px inputs leave usable feature maps."""
    import torchvision.models as tvm

    if isinstance(net, tvm.ResNet):
        _replace_first_conv(net, net.conv1.in_channels, kernel_size=3, stride=1, padding=1)
        net.maxpool = nn.Identity()
    elif isinstance(net, tvm.MobileNetV2):
        net.features[0][0].stride = (1, 1)
    elif isinstance(net, tvm.VGG):
        # Drop the max-pools that would shrink the map below 1x1, then pool globally.
        size = image_size
        for i, layer in enumerate(net.features):
            if isinstance(layer, nn.MaxPool2d):
                if size < 2:
                    net.features[i] = nn.Identity()
                else:
                    size //= 2
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        width = next(m for m in reversed(net.features) if isinstance(m, nn.Conv2d)).out_channels
        net.classifier = nn.Linear(width, num_classes)


def _torchvision_model(
    name: str, num_classes: int, in_channels: int, image_size: int, pretrained: bool
) -> nn.Module:
    import torchvision.models as tvm

    kwargs = dict(_EXTRA_KWARGS.get(name, {}))
    if not pretrained:
        net = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        if in_channels != 3:
            _replace_first_conv(net, in_channels)
        if image_size <= SMALL_IMAGE_MAX:
            _adapt_small_images(net, image_size, num_classes)
        return net
    weights = tvm.get_model_weights(name).DEFAULT
    classes = len(weights.meta["categories"])
    if in_channels != 3 or num_classes != classes:
        raise UserError(
            f"pretrained {name} needs 3-channel images and {classes} classes, not "
            f"{in_channels} and {num_classes}: train from scratch (no --pretrained) instead"
        )
    kwargs.pop("init_weights", None)
    try:
        # Pretrained weights fix the architecture: no small-image stem changes.
        return tvm.get_model(name, weights=weights, **kwargs)
    except (OSError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(
            f"cannot fetch pretrained weights for {name} ({reason}): connect to the internet "
            "or put the file in ~/.cache/torch/hub/checkpoints"
        ) from None


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

    ``resnet20/32/44/56/110`` are CIFAR ResNets; other names go to torchvision, with the first
    conv taking ``in_channels`` and, for images <= 64 px, a stem that keeps resolution.
    """
    key = name.strip().lower()
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
    cifar = {f"resnet{d}": d for d in CIFAR_RESNET_DEPTHS}
    if key in cifar:
        if pretrained:
            raise UserError(f"{key} has no pretrained weights: drop --pretrained")
        net: nn.Module = CifarResNet(cifar[key], num_classes, in_channels)
    elif key in _torchvision_names():
        net = _torchvision_model(key, num_classes, in_channels, image_size, pretrained)
        if pretrained or key not in TORCHVISION_SHORTLIST:
            _check_runs(net, key, in_channels, image_size)
    else:
        raise UserError(
            f"unknown model {name!r}: choose one of {', '.join(list_models())} "
            "or any torchvision classifier name (torchvision.models.list_models())"
        )
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def _check_runs(net: nn.Module, name: str, in_channels: int, image_size: int) -> None:
    """One eval-mode forward pass: models we did not adapt may reject the image size."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, in_channels, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(
            f"{name} cannot run on {image_size}px images ({reason}): pick another model "
            f"or image size, e.g. resnet18"
        ) from None
    finally:
        net.train(was_training)


def find_classifier(model: nn.Module, num_classes: int) -> nn.Module | None:
    """The last Linear (or 1x1 Conv2d) producing ``num_classes`` outputs: the layer whose
    output channels a pruner must keep."""
    found = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = module
        elif (
            isinstance(module, nn.Conv2d)
            and module.kernel_size == (1, 1)
            and module.out_channels == num_classes
        ):
            found = module
    return found
