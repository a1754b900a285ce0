"""Top-1 accuracy of a model on any supported kind of data (see :mod:`adasap.data.sources`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from adasap.checks import check_input, check_labels
from adasap.data.sources import evaluation_source
from adasap.distributed import all_reduce_sum, is_distributed, shard
from adasap.errors import UserError

Normalization = tuple[Sequence[float], Sequence[float]]


def _normalizer(normalize: Normalization | None, device: torch.device):
    if normalize is None:
        return None
    try:
        mean, std = (torch.as_tensor(v, dtype=torch.float32, device=device) for v in normalize)
    except (TypeError, ValueError):
        raise UserError(
            f"normalize={normalize!r} is invalid: give (mean, std), one number per channel each"
        ) from None
    if mean.dim() != 1 or mean.shape != std.shape or bool((std <= 0).any()):
        raise UserError(
            f"normalize={normalize!r} is invalid: give (mean, std) of equal length, std > 0"
        )

    def apply(x: Tensor) -> Tensor:
        if x.shape[1] != len(mean):
            raise UserError(
                f"normalize has {len(mean)} means but the images have {x.shape[1]} channels: "
                "give one mean and one std per channel"
            )
        return (x - mean[:, None, None]) / std[:, None, None]

    return apply


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def count_correct(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    normalize: Normalization | None = None,
    sharded: bool = False,
) -> tuple[int, int]:
    """(correctly classified, total) images of ``data``; see :func:`evaluate_accuracy`."""
    sharded = sharded and is_distributed()
    source = evaluation_source(data, batch_size=batch_size, shard=shard() if sharded else (0, 1))
    source.check()
    device = torch.device(device) if device is not None else model_device(model)
    norm = _normalizer(normalize, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.inference_mode():
            for x, y in source.epoch(0, device):
                x = x.contiguous(memory_format=memory_format)
                if norm is not None:
                    x = norm(x)
                try:
                    logits = model(x)
                except (RuntimeError, ValueError):
                    check_input(model, x)  # a clear error when the images do not fit the model
                    raise
                check_labels(y, logits.shape[-1])
                correct += int((logits.argmax(dim=1) == y).sum())
                total += len(y)
    finally:
        model.train(was_training)
    if sharded:  # every rank counted its part of the images
        correct, total = (int(v) for v in all_reduce_sum(torch.tensor([correct, total])))
    return correct, total


def evaluate_accuracy(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    normalize: Normalization | None = None,
    sharded: bool = False,
) -> float:
    """Top-1 accuracy of ``model`` (eval mode, no grad; its mode is restored) on ``data``.

    ``data`` is any kind :func:`adasap.data.sources.evaluation_source` takes: an adasap image
    set, ``(images, labels)`` tensors (uint8, or float in [0, 1]), a map-style Dataset, or a
    DataLoader / list of batches. ``normalize=(mean, std)`` is applied to the [0, 1] images
    before the model, for models that expect normalised inputs. ``device`` defaults to the
    model's. ``sharded`` (every rank of a torchrun job calls it with the same model): each rank
    evaluates its part of the images and the counts are summed over the ranks.
    """
    correct, total = count_correct(
        model,
        data,
        batch_size=batch_size,
        device=device,
        channels_last=channels_last,
        normalize=normalize,
        sharded=sharded,
    )
    if total == 0:
        raise UserError("no images to evaluate: the test set is empty")
    return correct / total
