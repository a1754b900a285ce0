"""A fast batch iterator over adasap's image sets, with batched crop-and-flip augmentation.

Images leave :func:`batches` as float32 NCHW in [0, 1], not normalised: models normalise inside
(:class:`adasap.models.Normalize`), so corruption benchmarks and exported models see raw pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from adasap.data.image_sets import FolderImageSet, ImageSet
from adasap.errors import UserError


def num_batches(images: ImageSet, batch_size: int, *, drop_last: bool = False) -> int:
    """How many batches :func:`batches` yields."""
    return len(images) // batch_size if drop_last else math.ceil(len(images) / batch_size)


def augment_batch(
    x: Tensor, *, generator: torch.Generator | None, hflip: bool, padding: int | None = None
) -> Tensor:
    """Random crop with zero padding (default size//8 px) and optional horizontal flip.

    Works on a whole NCHW batch of any dtype with one gather; randomness comes from
    ``generator`` on the CPU, so the result does not depend on the device.
    """
    n, c, h, w = x.shape
    pad = max(1, min(h, w) // 8) if padding is None else padding
    shift = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).to(x.device)
    rows = shift[:, :1] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    cols = shift[:, 1:] + cols
    padded = F.pad(x, (pad, pad, pad, pad))
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def batches(
    images: ImageSet,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    augment: bool = False,
    device: torch.device | str = "cpu",
    drop_last: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(float32 images in [0, 1], int64 labels)`` batches on ``device``.

    All randomness (order, crops, flips) is drawn from the CPU ``generator``, so a generator
    seeded from (seed, epoch) repeats the epoch exactly (lazy image folders: only with
    ``num_workers > 0``, whose worker seeds come from it; in-process transforms use torch's
    global RNG). Pass ``memory_format=torch.channels_last`` to get
    channels-last batches.
    """
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} is invalid: use a positive integer")
    device = torch.device(device)
    if isinstance(images, FolderImageSet):
        loader = torch.utils.data.DataLoader(
            images.view(augment),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=images.num_workers,
            pin_memory=device.type == "cuda",
            drop_last=drop_last,
        )
        try:
            for x, y in loader:
                x = x.to(device, non_blocking=True, memory_format=memory_format)
                yield x, y.to(device, non_blocking=True)
        except RuntimeError as exc:
            if "stack expects each tensor to be equal size" not in str(exc):
                raise
            raise UserError(
                f"images in {images.files.root} differ in size: give the set an image_size "
                "(a centre crop; crop= for the official loaders) to batch them"
            ) from exc
        return

    n = len(images)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(images.images.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        # Index and ship uint8 (4x less traffic), then augment and convert on the device.
        x = images.images[idx].to(device, non_blocking=True)
        y = images.labels[idx.to(images.labels.device)].to(device, non_blocking=True)
        if augment:
            x = augment_batch(x, generator=generator, hflip=images.hflip)
        x = x.to(torch.float32).div_(255).contiguous(memory_format=memory_format)
        yield x, y
