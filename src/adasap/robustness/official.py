"""The official pre-rendered test sets: CIFAR-10/100-C arrays, ImageNet-C style trees, ImageNet-V2.

Each loader returns an adasap image set whose ``source`` names the files, for the report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from adasap.data.folders import FolderImageSet, ImageFolderFiles
from adasap.data.image_sets import ImageSet, TensorImageSet
from adasap.errors import UserError, quote
from adasap.robustness import corruptions as C
from adasap.robustness.corruptions.apply import check_severity

OFFICIAL_DATASETS = ("cifar10-c", "cifar100-c", "tinyimagenet-c", "imagenet-c")


def check_corruption(name: str) -> None:
    if name not in C.CORRUPTIONS:
        raise UserError(
            f"unknown corruption {quote(name)}: choose one of {', '.join(C.CORRUPTIONS)}"
        )


def load_cifar_c(
    root: str | Path, corruption: str, severity: int, *, name: str = "CIFAR-10-C"
) -> TensorImageSet:
    """One severity of CIFAR-10-C / CIFAR-100-C from ``<root>/<corruption>.npy`` and ``labels.npy``.

    Each ``.npy`` holds the test set once per severity, severity-major (rows
    ``[(s-1)*n, s*n)``); only that block is read, through a memory map.
    """
    check_corruption(corruption)
    check_severity(severity)
    root = Path(root)
    data_path, labels_path = root / f"{corruption}.npy", root / "labels.npy"
    for path in (data_path, labels_path):
        if not path.is_file():
            raise UserError(f"missing {path}: download {name} from Zenodo and pass its folder")
    data = np.load(data_path, mmap_mode="r", allow_pickle=False)
    if (
        data.ndim != 4
        or data.shape[-1] not in (1, 3)
        or data.shape[0] % 5
        or data.dtype != np.uint8
    ):
        raise UserError(
            f"{data_path} holds {data.dtype} {data.shape}, not uint8 (5*n, H, W, 3): "
            f"is it a {name} file?"
        )
    n = data.shape[0] // 5
    block = np.array(data[(severity - 1) * n : severity * n])  # a writable copy of one block
    labels = np.load(labels_path, allow_pickle=False)
    if labels.shape == (5 * n,):
        labels = labels[(severity - 1) * n : severity * n]
    elif labels.shape != (n,):
        raise UserError(
            f"{labels_path} has shape {labels.shape}, expected ({5 * n},) or ({n},) "
            f"to match {data_path}"
        )
    images = torch.from_numpy(block).permute(0, 3, 1, 2).contiguous()
    labels_tensor = torch.from_numpy(labels.astype(np.int64))
    return TensorImageSet(images, labels_tensor, source=f"{name} official files")


def load_folder_c(
    root: str | Path,
    corruption: str,
    severity: int,
    *,
    name: str,
    crop: int | None = None,
    num_workers: int = 0,
) -> FolderImageSet:
    """One severity of an ImageNet-C tree: ``<root>/<corruption>/<severity>/<class>/<image>``."""
    check_corruption(corruption)
    check_severity(severity)
    folder = Path(root) / corruption / str(severity)
    if not folder.is_dir():
        raise UserError(
            f"missing {folder}: download {name} and pass the folder holding {corruption}/"
        )
    return folder_set(folder, source=f"{name} official files", crop=crop, num_workers=num_workers)


def load_imagenet_c(
    root: str | Path, corruption: str, severity: int, *, crop: int = 224, num_workers: int = 0
) -> FolderImageSet:
    """ImageNet-C; the official evaluation centre-crops 224 px, as ``crop`` does here."""
    return load_folder_c(
        root, corruption, severity, name="ImageNet-C", crop=crop, num_workers=num_workers
    )


def load_tiny_imagenet_c(
    root: str | Path, corruption: str, severity: int, *, num_workers: int = 0
) -> FolderImageSet:
    """Tiny-ImageNet-C (64 px, 200 classes)."""
    return load_folder_c(
        root, corruption, severity, name="Tiny-ImageNet-C", num_workers=num_workers
    )


def load_imagenet_v2(
    root: str | Path,
    *,
    resize: int = 256,
    crop: int = 224,
    name: str = "ImageNet-V2",
    num_workers: int = 0,
) -> FolderImageSet:
    """An ImageNet-V2 style test folder ``<root>/<class index>/<image>``, resized and cropped."""
    source = f"{name} official files"
    return folder_set(root, source=source, resize=resize, crop=crop, num_workers=num_workers)


def official_sets(
    root: str | Path, dataset: str, *, num_workers: int = 0
) -> Callable[[str, int], ImageSet]:
    """A loader ``(corruption, severity) -> images`` for an official -C dataset at ``root``.

    ``dataset`` is one of "cifar10-c", "cifar100-c", "tinyimagenet-c", "imagenet-c"; pass the
    result as ``corrupted=`` to :func:`evaluate_corruptions`. ``num_workers`` processes decode
    the JPEG folders.
    """
    loaders: dict[str, Callable[[str, int], ImageSet]] = {
        "cifar10-c": lambda c, s: load_cifar_c(root, c, s, name="CIFAR-10-C"),
        "cifar100-c": lambda c, s: load_cifar_c(root, c, s, name="CIFAR-100-C"),
        "tinyimagenet-c": lambda c, s: load_tiny_imagenet_c(root, c, s, num_workers=num_workers),
        "imagenet-c": lambda c, s: load_imagenet_c(root, c, s, num_workers=num_workers),
    }
    if dataset not in OFFICIAL_DATASETS:
        raise UserError(
            f"unknown official dataset {quote(dataset)}: choose one of "
            f"{', '.join(OFFICIAL_DATASETS)}"
        )
    return loaders[dataset]


def folder_set(
    root: str | Path,
    *,
    source: str,
    resize: int | None = None,
    crop: int | None = None,
    num_workers: int = 0,
) -> FolderImageSet:
    """The images of ``<root>/<class>/<image>``, lazily decoded, for evaluation.

    Labels follow the sorted class folder names (ImageNet order for WordNet ids); folders named
    only by digits ("0".."999", ImageNet-V2) are the class index itself. ``resize`` scales the
    shorter side, then ``crop`` takes the centre square; images of different sizes need
    ``crop`` to be batched.
    """
    files = ImageFolderFiles(root, digit_labels=True)
    return FolderImageSet(files, crop, num_workers=num_workers, resize=resize, source=source)
