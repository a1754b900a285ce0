"""torchvision classifiers by name, with stems adapted to small (<= 64 px) images."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.shufflenetv2 import InvertedResidual

from adasap.errors import UserError, exception_reason, quote
from adasap.models.registry import ModelRequest, register_family

# torchvision models whose stems we adapt to small images; any other torchvision name also works.
TORCHVISION_SHORTLIST = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "vgg11_bn")
SMALL_IMAGE_MAX = 64
# Models whose auxiliary heads would make training-mode outputs tuples.
_EXTRA_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
# Vision transformers are built for the requested image size (their position embeddings).
_TAKES_IMAGE_SIZE = ("vit_",)


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle as one gather, which Torch-Pruning can trace (its view and
    transpose form cannot be traced) and ONNX can export (``nn.ChannelShuffle`` cannot)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        order = torch.arange(x.shape[1], device=x.device).view(self.groups, -1).t().reshape(-1)
        return x.index_select(1, order)


class _ShuffleBlock(InvertedResidual):
    """torchvision's ShuffleNetV2 block with the shuffle as a :class:`ChannelShuffle` layer."""

    shuffle: ChannelShuffle

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.shuffle(out)


def _use_traceable_shuffle(net: nn.Module) -> None:
    for block in net.modules():
        if type(block) is InvertedResidual:
            block.__class__ = _ShuffleBlock
            block.shuffle = ChannelShuffle(2)


def torchvision_names() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def replace_first_conv(net: nn.Module, in_channels: int, **changes: Any) -> None:
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
        replace_first_conv(net, net.conv1.in_channels, kernel_size=3, stride=1, padding=1)
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


def _check_vit_size(name: str, request: ModelRequest, pretrained_size: int) -> None:
    """A :class:`UserError` for images a vision transformer cannot take, which torchvision
    reports with a bare ``AssertionError``: a side that is no multiple of its patch size (the
    name's last number), or (pretrained) another side than its weights were trained at."""
    patch = int(name.rsplit("_", 1)[-1])
    size = request.image_size
    if request.pretrained and size != pretrained_size:
        raise UserError(
            f"pretrained {name} takes {pretrained_size} px images, not {size} px: use a dataset "
            f"of {pretrained_size} px images, or train from scratch (no --pretrained)"
        )
    if size % patch:
        raise UserError(
            f"{name} cuts images into {patch} px patches and cannot take {size} px images: use a "
            f"dataset whose image side is a multiple of {patch} (e.g. cifar10, 32 px), or another "
            "model (e.g. resnet18)"
        )


@register_family("torchvision", names=torchvision_names, bare=True)
def build_torchvision(name: str, request: ModelRequest) -> nn.Module:
    import torchvision.models as tvm

    if name not in torchvision_names():
        raise UserError(
            f"unknown torchvision model {quote(name)}: choose one of "
            "torchvision.models.list_models()"
        )
    kwargs = dict(_EXTRA_KWARGS.get(name, {}))
    if name.startswith(_TAKES_IMAGE_SIZE):
        _check_vit_size(name, request, tvm.get_model_weights(name).DEFAULT.meta["min_size"][0])
    if not request.pretrained:
        if name.startswith(_TAKES_IMAGE_SIZE):
            kwargs["image_size"] = request.image_size
        net = tvm.get_model(name, weights=None, num_classes=request.num_classes, **kwargs)
        if request.in_channels != 3:
            replace_first_conv(net, request.in_channels)
        if isinstance(net, tvm.ShuffleNetV2):
            _use_traceable_shuffle(net)
        if request.image_size <= SMALL_IMAGE_MAX:
            _adapt_small_images(net, request.image_size, request.num_classes)
        return net
    weights = tvm.get_model_weights(name).DEFAULT
    classes = len(weights.meta["categories"])
    if request.in_channels != 3 or request.num_classes != classes:
        raise UserError(
            f"pretrained {name} needs 3-channel images and {classes} classes, not "
            f"{request.in_channels} and {request.num_classes}: train from scratch "
            "(no --pretrained) instead"
        )
    kwargs.pop("init_weights", None)
    try:
        # Pretrained weights fix the architecture: no small-image stem changes.
        return tvm.get_model(name, weights=weights, **kwargs)
    except (OSError, RuntimeError) as exc:
        reason = exception_reason(exc)
        raise UserError(
            f"cannot fetch pretrained weights for {name} ({reason}): connect to the internet "
            "or put the file in ~/.cache/torch/hub/checkpoints"
        ) from None
