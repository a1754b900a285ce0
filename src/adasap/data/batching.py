"""A fast batch iterator over adasap's image sets, with batched crop-and-flip augmentation.

Images leave :func:`batches` as float32 NCHW in [0, 1], not normalised: models normalise inside
(:class:`adasap.models.Normalize`), so corruption benchmarks and exported models see raw pixels.

Data-parallel training shards every kind of data alike (docs/distributed.md): with ``shard =
(rank, world)`` and a per-rank batch size B, the global batch holds ``world * B`` images in
the order a single process would take them, and rank ``r`` gets its rows ``[r*B, (r+1)*B)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler, default_collate

from adasap.data.image_sets import FolderImageSet, ImageSet
from adasap.errors import UserError

Shard = tuple[int, int]  # (rank, world size)
SINGLE: Shard = (0, 1)


def num_batches(
    images: ImageSet | Sequence, batch_size: int, *, drop_last: bool = False, shard: Shard = SINGLE
) -> int:
    """How many batches :func:`batches` yields (per rank, one per global batch)."""
    step = batch_size * shard[1]
    return len(images) // step if drop_last else math.ceil(len(images) / step)


def rank_rows(rows: Tensor, batch_size: int, shard: Shard) -> Tensor:
    """This rank's part of a global batch: rows ``[rank * B, (rank + 1) * B)``."""
    return rows[shard[0] * batch_size : (shard[0] + 1) * batch_size]


class RankBatches(torch.utils.data.Sampler):
    """A batch sampler giving this rank's part of each global batch of ``sampler``'s order."""

    def __init__(
        self, sampler: Iterable[int], batch_size: int, shard: Shard, drop_last: bool
    ) -> None:
        self.batches = BatchSampler(sampler, batch_size * shard[1], drop_last)
        self.batch_size, self.shard = batch_size, shard

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            part = batch[self.shard[0] * self.batch_size : (self.shard[0] + 1) * self.batch_size]
            if part:  # the last, short global batch of an evaluation may leave none
                yield part

    def __len__(self) -> int:
        return len(self.batches)


def _reseed_worker(rank: int, worker_id: int) -> None:
    torch.manual_seed(torch.initial_seed() + 1_000_003 * rank)


def rank_workers(shard: Shard) -> Callable[[int], None] | None:
    """A loader's ``worker_init_fn`` that gives each rank's workers their own random streams
    (the augmentations of different ranks' images are drawn independently)."""
    return functools.partial(_reseed_worker, shard[0]) if shard[1] > 1 else None


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
    shard: Shard = SINGLE,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(float32 images in [0, 1], int64 labels)`` batches on ``device``.

    All randomness (order, crops, flips) is drawn from the CPU ``generator``, so a generator
    seeded from (seed, epoch) repeats the epoch exactly (lazy image folders: only with
    ``num_workers > 0``, whose worker seeds come from it; in-process transforms use torch's
    global RNG). Pass ``memory_format=torch.channels_last`` to get
    channels-last batches. With ``shard``, ``batch_size`` is per rank and this rank's rows of
    each global batch are yielded (the module docstring).
    """
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} is invalid: use a positive integer")
    device = torch.device(device)
    if isinstance(images, FolderImageSet):
        view = images.view(augment)
        order = RandomSampler(view, generator=generator) if shuffle else SequentialSampler(view)
        loader = torch.utils.data.DataLoader(
            view,
            batch_sampler=RankBatches(order, batch_size, shard, drop_last),
            generator=generator,
            worker_init_fn=rank_workers(shard),
            num_workers=images.num_workers,
            pin_memory=device.type == "cuda",
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
    step = batch_size * shard[1]
    stop = n - n % step if drop_last else n
    for start in range(0, stop, step):
        idx = order[start : start + step]
        # Index and ship uint8 (4x less traffic), then augment and convert on the device.
        x = images.images[idx].to(device, non_blocking=True)
        y = images.labels[idx.to(images.labels.device)].to(device, non_blocking=True)
        if augment:  # the whole global batch: the same random draws as one process makes
            x = augment_batch(x, generator=generator, hflip=images.hflip)
        x, y = rank_rows(x, batch_size, shard), rank_rows(y, batch_size, shard)
        if len(y):
            yield x.to(torch.float32).div_(255).contiguous(memory_format=memory_format), y


def check_item(item: Any) -> None:
    """Raise :class:`UserError` unless a Dataset item is (C x H x W image or PIL image, int)."""
    from PIL import Image

    if not isinstance(item, tuple | list) or len(item) != 2:
        raise UserError(
            f"item 0 of the dataset is a {type(item).__name__}, not an (image, label) pair: "
            "make __getitem__ return (image, label)"
        )
    image, label = item
    if isinstance(image, Tensor):
        if image.dim() != 3:
            raise UserError(
                f"item 0 of the dataset has an image of shape {tuple(image.shape)}, not "
                "(C, H, W): return one image per item (add a ToTensor / ToImage transform)"
            )
    elif not isinstance(image, Image.Image):
        raise UserError(
            f"item 0 of the dataset has a {type(image).__name__} image, not a tensor or PIL "
            "image: add a transform that makes a (C, H, W) tensor"
        )
    integer = isinstance(label, int) and not isinstance(label, bool)
    if isinstance(label, Tensor):
        integer = label.dim() == 0 and not (label.is_floating_point() or label.dtype == torch.bool)
    if not integer:
        raise UserError(
            f"item 0 of the dataset has a label {label!r:.40}, not an integer class index: "
            "return (image, int label)"
        )


def collate_items(items: list[Any]) -> tuple[Tensor, Tensor]:
    """A batch of (image, label) items; PIL images become float tensors in [0, 1]."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    images = [to_tensor(x) if isinstance(x, Image.Image) else x for x, _ in items]
    try:
        return default_collate(images), default_collate([y for _, y in items])
    except RuntimeError as exc:
        if "stack expects each tensor to be equal size" not in str(exc):
            raise
        raise UserError(
            "images of the dataset differ in size: resize or crop them to one size in its transform"
        ) from exc
