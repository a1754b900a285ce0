"""Batches of ``(images, labels)`` from any supported kind of data, for training and evaluation.

Supported: adasap's image sets (:class:`TensorImageSet`, :class:`FolderImageSet`), an
``(images, labels)`` pair of tensors, a map-style ``torch.utils.data.Dataset`` of
``(image, label)`` items (PIL images become float tensors in [0, 1] through torchvision), and
any re-iterable of ``(images, labels)`` batches such as a ``DataLoader`` or a list, used exactly
as given. uint8 images become float32 in [0, 1] and labels int64; nothing is normalised.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from adasap.data.batching import (
    SINGLE,
    RankBatches,
    Shard,
    batches,
    check_item,
    collate_items,
    num_batches,
)
from adasap.data.image_sets import DataBundle, FolderImageSet, ImageSet, TensorImageSet
from adasap.errors import UserError

Batch = tuple[Tensor, Tensor]
_SUPPORTED = (
    "an adasap image set, (images, labels) tensors, a map-style Dataset of (image, label) items, "
    "or a DataLoader / list of (images, labels) batches"
)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator that orders (and augments) training epoch ``epoch`` of run ``seed``."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class BatchSource:
    """Batches of (images, labels) from any supported kind of data.

    ``num_classes`` is known for adasap's own datasets, else None. ``owns_augmentation`` is True
    only when adasap samples and augments the batches (its own image sets, trained with
    ``augment=True``).
    """

    num_classes: int | None = None
    owns_augmentation: bool = False
    drop_last = False
    what = "the data"
    shard: Shard = SINGLE  # (rank, world size): which rows of each global batch (.sharded)

    def __len__(self) -> int:
        """Batches per epoch."""
        raise NotImplementedError

    def epoch(self, index: int, device: torch.device | None = None) -> Iterator[Batch]:
        """Epoch ``index``'s batches on ``device`` (None: where they are made)."""
        raise NotImplementedError

    def example(self, count: int = 2) -> Tensor:
        """The first ``count`` images (fewer if the data is smaller), unaugmented, on the CPU."""
        raise NotImplementedError

    def sharded(self, shard: Shard) -> BatchSource:
        """This source as rank ``shard[0]`` of ``shard[1]`` sees it (:mod:`.batching`)."""
        self.shard = shard
        return self

    def _first(self) -> Batch | None:
        """The first batch as the data gives it (item-level checks come first), or None."""
        return next(iter(self._raw()), None)

    def _raw(self) -> Iterable[Any]:
        raise NotImplementedError

    def check(self) -> None:
        """Raise a one-line :class:`UserError` when the data is empty or not image batches."""
        first = self._first()
        if first is None:
            raise UserError(f"{self.what} is empty: give it at least one batch of images")
        check_batch(first, self.what)
        if self.drop_last and len(self) == 0:
            raise UserError(
                f"{self.what} makes no full batch: lower the batch size or keep the last batch"
            )


def _as_float(images: Tensor) -> Tensor:
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def _to_device(images: Tensor, labels: Tensor, device: torch.device | None) -> Batch:
    if device is not None:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
    return _as_float(images), labels.to(torch.int64)


def check_batch(batch: Any, what: str = "the data") -> None:
    """Raise :class:`UserError` unless ``batch`` is (N x C x H x W images, N integer labels)."""
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise UserError(
            f"a batch of {what} is a {type(batch).__name__}, not an (images, labels) pair: "
            "yield (images, labels) batches"
        )
    images, labels = batch
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise UserError(
            f"images in a batch of {what} must be a 4-D tensor (N, C, H, W), got {shape}: "
            "batch (C, H, W) image tensors"
        )
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise UserError(f"images of {what} are {images.dtype}: give float in [0, 1] or uint8")
    if (
        not isinstance(labels, Tensor)
        or labels.dtype.is_floating_point
        or labels.dtype == torch.bool
    ):
        kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise UserError(
            f"labels of {what} are {kind}, not integer class indices: give int64 labels"
        )
    if labels.shape != (images.shape[0],):
        raise UserError(
            f"a batch of {what} has {images.shape[0]} images but labels of shape "
            f"{tuple(labels.shape)}: give one integer class index per image"
        )


# --------------------------------------------------------------------------- kinds of data


class _ImageSetSource(BatchSource):
    what = "the image set"

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        *,
        train: bool,
        seed: int,
        augment: bool,
        drop_last: bool,
    ) -> None:
        self.images = images
        self.batch_size = batch_size
        self.train, self.seed, self.drop_last = train, seed, drop_last and train
        self.augment = augment and train
        self.num_classes = images.num_classes
        self.owns_augmentation = self.augment

    def __len__(self) -> int:
        return num_batches(self.images, self.batch_size, drop_last=self.drop_last, shard=self.shard)

    def epoch(self, index: int, device: torch.device | None = None) -> Iterator[Batch]:
        if device is None:
            device = self.images.images.device if isinstance(self.images, TensorImageSet) else None
        return batches(
            self.images,
            self.batch_size,
            shuffle=self.train,
            generator=epoch_generator(self.seed, index) if self.train else None,
            augment=self.augment,
            device=device or "cpu",
            drop_last=self.drop_last,
            shard=self.shard,
        )

    def example(self, count: int = 2) -> Tensor:
        first = self.images.subset(torch.arange(min(count, len(self.images))))
        return next(batches(first, max(len(first), 1), shuffle=False), (torch.empty(0),))[0]

    def _raw(self) -> Iterable[Any]:
        return batches(self.images, self.batch_size, shuffle=False)


class _PairSource(BatchSource):
    what = "the (images, labels) tensors"

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        train: bool,
        seed: int,
        drop_last: bool,
    ) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.train, self.seed, self.drop_last = train, seed, drop_last and train

    def __len__(self) -> int:
        return num_batches(self.images, self.batch_size, drop_last=self.drop_last, shard=self.shard)

    def epoch(self, index: int, device: torch.device | None = None) -> Iterator[Batch]:
        n, b, (rank, world) = len(self.images), self.batch_size, self.shard
        generator = epoch_generator(self.seed, index)
        order = torch.randperm(n, generator=generator) if self.train else torch.arange(n)
        for start in range(0, len(self) * b * world, b * world):
            idx = order[start + rank * b : start + (rank + 1) * b]  # this rank's rows
            if len(idx):
                x, y = (
                    self.images[idx.to(self.images.device)],
                    self.labels[idx.to(self.labels.device)],
                )
                yield _to_device(x, y, device)

    def example(self, count: int = 2) -> Tensor:
        return _as_float(self.images[:count].cpu())

    def _raw(self) -> Iterable[Any]:
        return [(self.images[: self.batch_size], self.labels[: self.batch_size])]


class _DatasetSource(BatchSource):
    what = "the dataset"

    def __init__(
        self, dataset: Dataset, batch_size: int, *, train: bool, seed: int, drop_last: bool
    ) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.train, self.seed, self.drop_last = train, seed, drop_last and train
        try:
            self.size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise UserError(
                f"the {type(dataset).__name__} dataset has no len(): give it __len__, or pass "
                "a DataLoader over it"
            ) from None

    def __len__(self) -> int:
        return num_batches(
            range(self.size), self.batch_size, drop_last=self.drop_last, shard=self.shard
        )

    def _loader(self, index: int, batch_size: int) -> DataLoader:
        sampler = RandomSampler(self.dataset, generator=epoch_generator(self.seed, index))
        if self.shard[1] > 1:  # this rank's part of each global batch
            order = sampler if self.train else range(self.size)
            return DataLoader(
                self.dataset,
                batch_sampler=RankBatches(order, batch_size, self.shard, self.drop_last),
                collate_fn=collate_items,
            )
        return DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=sampler if self.train else None,
            drop_last=self.drop_last,
            collate_fn=collate_items,
        )

    def epoch(self, index: int, device: torch.device | None = None) -> Iterator[Batch]:
        for x, y in self._loader(index, self.batch_size):
            yield _to_device(x, y, device)

    def example(self, count: int = 2) -> Tensor:
        items = [self.dataset[i] for i in range(min(count, self.size))]
        return _as_float(collate_items(items)[0]) if items else torch.empty(0)

    def _raw(self) -> Iterable[Any]:
        if self.size == 0:
            return []
        item = self.dataset[0]
        check_item(item)
        return [collate_items([item])]


class IterableSource(BatchSource):
    what = "the loader or list of batches"

    def __init__(self, data: Iterable[Any], train: bool) -> None:
        self.train = train
        if iter(data) is data:
            raise UserError(
                f"a {type(data).__name__} can be iterated only once: pass a list of batches or "
                "a DataLoader, which every epoch can iterate again"
            )
        self.data = data

    def __len__(self) -> int:
        try:
            return len(self.data) // self.shard[1]  # type: ignore[arg-type]
        except TypeError:
            raise UserError(
                f"the number of batches per epoch of a {type(self.data).__name__} is unknown "
                "(no len()): use a DataLoader over a map-style Dataset, or a list of batches"
            ) from None

    def epoch(self, index: int, device: torch.device | None = None) -> Iterator[Batch]:
        sampler = getattr(self.data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(index)  # DistributedSampler: a new shuffle per epoch
        rank, world = self.shard
        for number, (x, y) in enumerate(self.data):
            if self.train and number // world >= len(self):
                break  # every rank trains on as many batches
            if number % world == rank:
                yield _to_device(x, y, device)

    def sharded(self, shard: Shard) -> BatchSource:
        """Rank r takes batches r, r + world, ...; a DistributedSampler has sharded them already."""
        sampler = getattr(self.data, "sampler", None)
        return super().sharded(SINGLE if isinstance(sampler, DistributedSampler) else shard)

    def example(self, count: int = 2) -> Tensor:
        taken: list[Tensor] = []
        for x, _ in self.data:
            taken.append(x[: count - sum(len(t) for t in taken)].cpu())
            if sum(len(t) for t in taken) >= count:
                break
        return _as_float(torch.cat(taken)) if taken else torch.empty(0)

    def _raw(self) -> Iterable[Any]:
        return self.data


def _is_tensor_pair(data: Any) -> bool:
    return (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and data[0].dim() == 4
    )


def _source(
    data: Any, *, batch_size: int, train: bool, seed: int, augment: bool, drop_last: bool
) -> BatchSource:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size {batch_size!r} is invalid: use a positive integer")
    if isinstance(data, DataBundle):
        raise UserError(
            "a whole DataBundle was passed: pass its .train to train, its .val or .test to evaluate"
        )
    if isinstance(data, TensorImageSet | FolderImageSet):
        return _ImageSetSource(
            data, batch_size, train=train, seed=seed, augment=augment, drop_last=drop_last
        )
    if _is_tensor_pair(data):
        images, labels = data
        check_batch((images, labels), "the (images, labels) tensors")
        return _PairSource(images, labels, batch_size, train=train, seed=seed, drop_last=drop_last)
    if isinstance(data, Tensor):
        raise UserError(
            f"a {tuple(data.shape)} tensor has no labels: pass (images, labels) or {_SUPPORTED}"
        )
    if isinstance(data, IterableDataset):
        raise UserError(
            "an IterableDataset yields items, not batches: wrap it in a DataLoader(batch_size=...)"
        )
    if isinstance(data, Dataset):
        return _DatasetSource(data, batch_size, train=train, seed=seed, drop_last=drop_last)
    if isinstance(data, Iterable) and not isinstance(data, str | bytes | dict):
        return IterableSource(data, train)
    raise UserError(f"cannot read batches from a {type(data).__name__}: pass {_SUPPORTED}")


def training_source(
    data: Any,
    *,
    batch_size: int,
    seed: int = 0,
    augment: bool = True,
    drop_last: bool = True,
    shard: Shard = SINGLE,
) -> BatchSource:
    """Shuffled training batches; epoch ``e`` is ordered by :func:`epoch_generator` (seed, e).

    adasap's own sets are augmented (``augment``) exactly as :func:`adasap.data.batches` does;
    a Dataset is sampled without augmentation; a DataLoader or list of batches is used as
    given (``batch_size``, ``seed`` and ``augment`` do not apply to it). With ``shard=(rank,
    world)`` it yields this rank's part of each global batch of ``world * batch_size``.
    """
    return _source(
        data, batch_size=batch_size, train=True, seed=seed, augment=augment, drop_last=drop_last
    ).sharded(shard)


def evaluation_source(data: Any, *, batch_size: int = 512, shard: Shard = SINGLE) -> BatchSource:
    """Every image once, in order, unaugmented (a DataLoader or list is used as given);
    with ``shard``, this rank's part of them (the ranks' parts add up to every image)."""
    source = _source(
        data, batch_size=batch_size, train=False, seed=0, augment=False, drop_last=False
    )
    return source.sharded(shard)
