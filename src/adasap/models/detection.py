"""Object detectors by name: torchvision's, untrained, and a small SSD of our own.

A detector follows torchvision's convention: in training mode ``model(images, targets)``
returns a dict of losses, in eval mode ``model(images)`` returns one dict of ``boxes``,
``scores`` and ``labels`` per image. ``num_classes`` counts the background (class 0), so a
dataset of K classes needs ``num_classes = K + 1``. Nothing is downloaded: torchvision's
models are built with ``weights=None, weights_backbone=None``. Detectors register by name::

    @register_detector("mine")
    def build_mine(request: DetectorRequest) -> nn.Module: ...
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models import detection
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.ops import Conv2dNormActivation, FrozenBatchNorm2d

from adasap.errors import UserError
from adasap.registry import Registry


@dataclass(frozen=True)
class DetectorRequest:
    """``num_classes`` including the background; ``image_size``: the side images are resized
    to (``None``: the model's own default, 300 or 320 px for SSD, 800-1333 px otherwise)."""

    num_classes: int
    image_size: int | None = None


DetectorBuilder = Callable[[DetectorRequest], nn.Module]
_DETECTORS: Registry[DetectorBuilder] = Registry("detector")


def register_detector(name: str) -> Callable[[DetectorBuilder], DetectorBuilder]:
    """Register ``build(request)`` as the detector ``name``."""
    return _DETECTORS.register(name)


def list_detectors() -> list[str]:
    return list(_DETECTORS)


def build_detector(name: str, *, num_classes: int, image_size: int | None = None) -> nn.Module:
    """The detector ``name`` for ``num_classes`` classes (background included), untrained,
    with trainable BatchNorm throughout (:func:`unfreeze_batchnorm`)."""
    build = _DETECTORS.get(name.strip().lower())
    if num_classes < 2 or (image_size is not None and image_size < 32):
        raise UserError(
            f"cannot build {name} for {num_classes} classes at {image_size} px: use "
            "num_classes >= 2 (K classes + background) and images of at least 32 px"
        )
    return unfreeze_batchnorm(build(DetectorRequest(num_classes, image_size)))


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``FrozenBatchNorm2d`` by a trainable ``BatchNorm2d`` holding its values.

    torchvision freezes BatchNorm in detectors built on pretrained backbones; Torch-Pruning
    cannot prune a frozen BatchNorm (its statistics are buffers it does not slice), and the
    sharpness-aware steps need the affine parameters to be parameters. The replacement keeps
    the same weight, bias, running mean and variance and eps, so the outputs in eval mode are
    unchanged. Returns ``model``, changed in place.
    """
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, FrozenBatchNorm2d):
                bn = nn.BatchNorm2d(child.weight.numel(), eps=child.eps)
                bn.weight.data.copy_(child.weight)
                bn.bias.data.copy_(child.bias)
                bn.running_mean.copy_(child.running_mean)
                bn.running_var.copy_(child.running_var)
                bn.train(child.training)
                setattr(parent, child_name, bn.to(child.weight.device))
    return model


def _fix_ssd_size(model: nn.Module, image_size: int | None) -> nn.Module:
    """SSD resizes every image to a fixed square; torchvision's builders fix it at 300/320."""
    if image_size is not None:
        model.transform.min_size = (image_size,)
        model.transform.max_size = image_size
        model.transform.fixed_size = (image_size, image_size)
    return model


def _sizes(request: DetectorRequest) -> dict[str, int]:
    """``min_size``/``max_size`` for the models that resize keeping the aspect ratio."""
    size = request.image_size
    return {} if size is None else {"min_size": size, "max_size": size}


_UNTRAINED = {"weights": None, "weights_backbone": None}


@register_detector("ssdlite320_mobilenet_v3_large")
def _ssdlite(request: DetectorRequest) -> nn.Module:
    model = detection.ssdlite320_mobilenet_v3_large(num_classes=request.num_classes, **_UNTRAINED)
    return _fix_ssd_size(model, request.image_size)


# the VGG feature maps shrink to 1 x 1 through two unpadded 3 x 3 convs: smaller images fail
SSD300_MIN_SIZE = 268


@register_detector("ssd300_vgg16")
def _ssd300(request: DetectorRequest) -> nn.Module:
    if request.image_size is not None and request.image_size < SSD300_MIN_SIZE:
        raise UserError(
            f"ssd300_vgg16 cannot run on {request.image_size} px images: use an image size of "
            f"at least {SSD300_MIN_SIZE} px (300 by default) or another detector"
        )
    model = detection.ssd300_vgg16(num_classes=request.num_classes, **_UNTRAINED)
    return _fix_ssd_size(model, request.image_size)


@register_detector("fasterrcnn_mobilenet_v3_large_fpn")
def _fasterrcnn(request: DetectorRequest) -> nn.Module:
    return detection.fasterrcnn_mobilenet_v3_large_fpn(
        num_classes=request.num_classes, **_UNTRAINED, **_sizes(request)
    )


@register_detector("retinanet_resnet50_fpn_v2")
def _retinanet(request: DetectorRequest) -> nn.Module:
    return detection.retinanet_resnet50_fpn_v2(
        num_classes=request.num_classes, **_UNTRAINED, **_sizes(request)
    )


@register_detector("fcos_resnet50_fpn")
def _fcos(request: DetectorRequest) -> nn.Module:
    return detection.fcos_resnet50_fpn(
        num_classes=request.num_classes, **_UNTRAINED, **_sizes(request)
    )


class TinyBackbone(nn.Module):
    """Six conv-BN-ReLU layers giving feature maps at strides 8, 16 and 32."""

    def __init__(self, widths: tuple[int, int, int] = (64, 128, 128)) -> None:
        super().__init__()
        self.out_channels = list(widths)
        self.stage1 = nn.Sequential(
            Conv2dNormActivation(3, 16, stride=2),
            Conv2dNormActivation(16, 32, stride=2),
            Conv2dNormActivation(32, widths[0], stride=2),
        )
        self.stage2 = nn.Sequential(
            Conv2dNormActivation(widths[0], widths[1], stride=2),
            Conv2dNormActivation(widths[1], widths[1]),
        )
        self.stage3 = Conv2dNormActivation(widths[1], widths[2], stride=2)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        return OrderedDict([("0", f1), ("1", f2), ("2", self.stage3(f2))])


@register_detector("tiny_ssd")
def tiny_ssd(request: DetectorRequest) -> nn.Module:
    """A small SSD for 128 px images, sized for a 2-core CPU (566,084 parameters for 11
    classes): :class:`TinyBackbone` with torchvision's SSD head, anchors and losses."""
    size = request.image_size or 128
    backbone = TinyBackbone()
    # box scales from 10% to 70% of the image over the three maps, each with ratios 1, 2, 1/2
    anchors = DefaultBoxGenerator([[2], [2], [2]], min_ratio=0.1, max_ratio=0.7)
    head = SSDHead(backbone.out_channels, anchors.num_anchors_per_location(), request.num_classes)
    return SSD(backbone, anchors, (size, size), request.num_classes, head=head)
