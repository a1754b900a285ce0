"""The layers a pruner must leave whole: a classifier's output layer, a detector's heads'.

A classifier's output layer is its last Linear (or 1x1 conv) as wide as its output. A
detector's heads end in layers whose output channels *are* the predictions: per anchor (or
location) the class logits, the four box offsets, FCOS's centerness, the RPN's objectness.
Pruning one of their output channels would drop an anchor or a class, or shift which channel
means what, so the number of anchors and outputs would change. These layers are found by the
torchvision head classes that own them; their input channels are still pruned with the
layers that feed them. The layers feeding the heads (backbone, FPN, the heads' conv towers)
change only widths, never the number of anchors: anchors come from the feature maps' spatial
sizes and the anchor generator, which channel pruning does not touch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSRegressionHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetRegressionHead,
)
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.ssd import SSDScoringHead

from adasap.checks import check_input, find_classifier
from adasap.errors import UserError, exception_summary
from adasap.method.examples import Example, run_example

# head class -> the attributes holding its output layers
_OUTPUT_ATTRIBUTES: dict[type[nn.Module], tuple[str, ...]] = {
    RetinaNetClassificationHead: ("cls_logits",),
    RetinaNetRegressionHead: ("bbox_reg",),
    FCOSClassificationHead: ("cls_logits",),
    FCOSRegressionHead: ("bbox_reg", "bbox_ctrness"),
    RPNHead: ("cls_logits", "bbox_pred"),
    FastRCNNPredictor: ("cls_score", "bbox_pred"),
    MaskRCNNPredictor: ("mask_fcn_logits",),
    KeypointRCNNPredictor: ("kps_score_lowres",),
}


def is_detection_output(output: Any) -> bool:
    """Whether a model's output is a detector's: a list of dicts holding ``boxes``."""
    return (
        isinstance(output, list)
        and bool(output)
        and all(isinstance(o, Mapping) and "boxes" in o for o in output)
    )


def _last_layer(module: nn.Module) -> nn.Module:
    """The module itself if it is a layer, else its last conv or linear layer."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]
    return layers[-1]


def detector_output_layers(model: nn.Module) -> list[nn.Module]:
    """The output layers of every head of a torchvision detector (see the module docstring).

    SSD and SSDlite heads (``SSDScoringHead``) hold one output branch per feature map: its
    last conv is the output layer. Raises :class:`UserError` when the model has none of
    torchvision's detection heads.
    """
    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, SSDScoringHead):
            found += [_last_layer(branch) for branch in module.module_list]
        for head_type, attributes in _OUTPUT_ATTRIBUTES.items():
            if isinstance(module, head_type):
                found += [_last_layer(getattr(module, a)) for a in attributes]
    if not found:
        raise UserError(
            f"{type(model).__name__} returns detections but has none of torchvision's detection "
            "heads (SSD, RetinaNet, FCOS, RPN, Fast R-CNN): pass ignored_layers=[its output "
            "layers]"
        )
    return found


def modules_outside(model: nn.Module, part: nn.Module) -> list[nn.Module]:
    """Every conv and linear layer of ``model`` that is not inside ``part``."""
    inside = set(map(id, part.modules()))
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear) and id(m) not in inside
    ]


def layer_names(model: nn.Module, layers: Sequence[nn.Module]) -> list[str]:
    """The qualified names of ``layers`` in ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in layers]


def default_ignored_layers(model: nn.Module, example_inputs: Example) -> list[nn.Module]:
    """The output layers: a classifier's last Linear or 1x1 conv whose width is the model's
    output width, or the output layers of every head of a torchvision detector."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = run_example(model, example_inputs)
    except (RuntimeError, ValueError, IndexError, AssertionError) as exc:
        if isinstance(example_inputs, Tensor):  # the data do not fit? (names both shapes)
            check_input(model, example_inputs, "the example inputs")
        raise UserError(
            f"the model cannot run on the example input ({exception_summary(exc)}): pass "
            "a batch the model accepts (a detector: a list of C x H x W images)"
        ) from exc
    finally:
        model.train(was_training)
    if is_detection_output(outputs):
        return detector_output_layers(model)
    width = outputs.shape[-1] if isinstance(outputs, Tensor) else None
    found = find_classifier(model, width)
    if found is None:
        raise UserError(
            f"found no output layer with the model's {width} outputs to protect from pruning: "
            "pass ignored_layers=[the output layer]"
        )
    return [found]
