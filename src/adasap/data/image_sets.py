"""adasap's image sets: images in memory (:class:`TensorImageSet`) or in folders
(:class:`~adasap.data.folders.FolderImageSet`), and a dataset's three splits (:class:`DataBundle`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adasap.data.folders import FolderImageSet
from adasap.data.specs import DatasetSpec
from adasap.errors import UserError


@dataclass(eq=False)
class TensorImageSet:
    """Images held in memory: ``images`` uint8 NCHW, ``labels`` int64 N.

    ``num_classes`` is the dataset's class count when known (adasap's own datasets); ``source``
    says where the images come from, for reports.
    """

    images: Tensor
    labels: Tensor
    hflip: bool = True
    num_classes: int | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise UserError(
                f"images must be uint8 NCHW, got {self.images.dtype} {tuple(self.images.shape)}: "
                "convert them with (x * 255).round().to(torch.uint8)"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise UserError(
                f"{self.images.shape[0]} images do not fit labels of shape "
                f"{tuple(self.labels.shape)}: pass NCHW images and one label per image"
            )
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: Tensor | Sequence[int]) -> TensorImageSet:
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        labels = self.labels[idx.to(self.labels.device)]
        return TensorImageSet(self.images[idx], labels, self.hflip, self.num_classes, self.source)

    def float_images(self) -> Tensor:
        """All images as float32 in [0, 1]."""
        return self.images.float().div_(255)

    def to(self, device: torch.device | str) -> TensorImageSet:
        """Move the whole set, e.g. onto the GPU so batches need no host-to-device copies."""
        images, labels = self.images.to(device), self.labels.to(device)
        return TensorImageSet(images, labels, self.hflip, self.num_classes, self.source)


ImageSet = TensorImageSet | FolderImageSet


@dataclass(eq=False)
class DataBundle:
    """A dataset's spec and its three splits; ``val`` is carved from the training data."""

    spec: DatasetSpec
    train: ImageSet
    val: ImageSet
    test: ImageSet
