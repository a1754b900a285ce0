"""Do the data fit the model? One clear :class:`UserError` instead of a deep PyTorch error.

Both checks are cheap enough to run once per pass over a dataset: :func:`check_labels` reads
the label range, :func:`check_input` looks at the model's first layer and, when that does not
tell, runs the model on one image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adasap.errors import UserError

_SHAPE_FIX = "give images of the shape the model was built for, or a model built for these images"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first convolution or linear layer of ``model`` (in registration order)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            return name, module
    return None


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


def input_mismatch(model: nn.Module, shape: Sequence[int]) -> str | None:
    """Why a batch of ``shape`` (N, C, H, W) cannot go into ``model``, judged from its first
    layer alone; ``None`` when that layer accepts it (or there is no such layer)."""
    found = first_layer(model)
    if found is None or len(shape) < 2:
        return None
    name, layer = found
    per_image = _shape(shape[1:])
    if isinstance(layer, nn.modules.conv._ConvNd) and shape[1] != layer.in_channels:
        return (
            f"the model takes {layer.in_channels}-channel images (its first layer {name!r} is a "
            f"{type(layer).__name__} with in_channels={layer.in_channels}), but the images are "
            f"{per_image} (channels x height x width), with {shape[1]} channels"
        )
    if isinstance(layer, nn.Linear) and layer.in_features not in (
        math.prod(shape[1:]),
        shape[-1],
    ):
        return (
            f"the model takes {layer.in_features} values per image (its first layer {name!r} "
            f"is a Linear with in_features={layer.in_features}), but the images are "
            f"{per_image} = {math.prod(shape[1:])} values"
        )
    return None


def check_input(model: nn.Module, images: Tensor, what: str = "the images") -> None:
    """Raise :class:`UserError` naming the expected and the actual input shape when ``model``
    cannot run on ``images`` (a batch); return quietly when it can.

    Call it where a forward pass failed, to tell a data/model mismatch from other errors.
    """
    problem = input_mismatch(model, tuple(images.shape))
    if problem is None:
        was_training = model.training
        model.eval()  # one image: BatchNorm in training mode would reject it
        try:
            with torch.no_grad():
                model(images[:1])
        except (RuntimeError, ValueError, IndexError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            problem = f"the model cannot run on {what} of shape {_shape(images.shape)} ({reason})"
        finally:
            model.train(was_training)
    if problem is not None:
        raise UserError(f"{problem}: {_SHAPE_FIX}")


def check_labels(labels: Tensor | None, num_outputs: int, what: str = "the labels") -> None:
    """Raise :class:`UserError` when ``labels`` fall outside ``0 .. num_outputs - 1``."""
    if labels is None or labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_outputs:
        raise UserError(
            f"{what} run from {low} to {high}, but the model has {num_outputs} outputs (classes "
            f"0 to {num_outputs - 1}): use labels in that range, or a model with one output per "
            "class"
        )
