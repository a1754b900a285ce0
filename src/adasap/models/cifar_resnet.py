"""ResNets for small images (He et al. 2016): resnet20/32/44/56/110, no pretrained weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adasap.errors import UserError, quote
from adasap.models.registry import ModelRequest, register_family

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)


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
    """ResNet for small images: 3 stages of 16/32/64 channels."""

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


def cifar_resnet_names() -> list[str]:
    return [f"resnet{d}" for d in CIFAR_RESNET_DEPTHS]


@register_family("cifar", names=cifar_resnet_names, bare=True)
def build_cifar_resnet(name: str, request: ModelRequest) -> nn.Module:
    if request.pretrained:
        raise UserError(f"{name} has no pretrained weights: drop --pretrained")
    if name not in cifar_resnet_names():
        raise UserError(
            f"unknown CIFAR ResNet {quote(name)}: choose one of {', '.join(cifar_resnet_names())}"
        )
    return CifarResNet(int(name.removeprefix("resnet")), request.num_classes, request.in_channels)
