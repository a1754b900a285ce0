"""The built-in datasets, one registry of loaders, and :func:`load_dataset`.

Adding a dataset is one function registered with :func:`register_dataset`; it returns the
training pool and the test set, and :func:`load_dataset` applies limits and the validation split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adasap.data import files, specs
from adasap.data.folders import FolderImageSet, ImageFolderFiles, default_workers
from adasap.data.image_sets import DataBundle, ImageSet, TensorImageSet
from adasap.data.specs import DatasetSpec
from adasap.data.splits import balanced_subset, stratified_split
from adasap.errors import UserError, quote
from adasap.registry import Registry

Splits = tuple[DatasetSpec, ImageSet, ImageSet]
Loader = Callable[[DatasetSpec, dict[str, Any], "str | Path | None"], Splits]
SpecFactory = Callable[["str | None", dict[str, Any]], DatasetSpec]

_SYNTHETIC_SEED = 20240601
_DIGITS_TEST_SEED = 0


@dataclass(frozen=True)
class _Registered:
    spec: DatasetSpec | SpecFactory
    load: Loader
    options: Mapping[str, Any]
    takes_path: bool


_REGISTRY: Registry[_Registered] = Registry("dataset")


def register_dataset(
    name: str,
    spec: DatasetSpec | SpecFactory,
    *,
    options: Mapping[str, Any] | None = None,
    takes_path: bool = False,
) -> Callable[[Loader], Loader]:
    """Register ``load(spec, options, data_dir) -> (spec, train pool, test set)`` as ``name``.

    ``spec`` is a :class:`DatasetSpec`, or ``spec(path, options) -> DatasetSpec`` when it
    depends on them. ``options`` maps each option the dataset takes to its default (ints must
    be >= 1, ``num_workers`` >= 0, floats >= 0). With ``takes_path`` the dataset is written
    ``name:<path>``.
    """

    def register(load: Loader) -> Loader:
        _REGISTRY.add(name, _Registered(spec, load, dict(options or {}), takes_path))
        return load

    return register


def _usage(name: str) -> str:
    return f"{name}:<path>" if _REGISTRY.get(name).takes_path else name


# --------------------------------------------------------------------------- loaders


@register_dataset("mnist", specs.MNIST)
@register_dataset("fashion-mnist", specs.FASHION_MNIST)
def _load_idx_dataset(spec: DatasetSpec, options: dict[str, Any], data_dir) -> Splits:
    found = files.locate_idx_files(spec.name, data_dir)
    sets = []
    for split in ("train", "t10k"):
        images = files.read_idx(found[f"{split}-images-idx3-ubyte"])
        labels = files.read_idx(found[f"{split}-labels-idx1-ubyte"])
        size = spec.image_size
        if images.dtype != np.uint8 or images.shape[1:] != (size, size):
            raise UserError(
                f"{found[f'{split}-images-idx3-ubyte']} holds {images.dtype} images of shape "
                f"{images.shape[1:]}, not {spec.name}'s uint8 {size}x{size}: use the right files"
            )
        if labels.ndim != 1 or len(labels) != len(images) or labels.max(initial=0) >= 10:
            raise UserError(
                f"{found[f'{split}-labels-idx1-ubyte']} does not match its {len(images)} images "
                "(count or label range): use the labels file from the same dataset"
            )
        sets.append(
            TensorImageSet(
                torch.from_numpy(images).unsqueeze(1),
                torch.from_numpy(labels.astype(np.int64)),
                spec.hflip,
            )
        )
    return spec, sets[0], sets[1]


@register_dataset("cifar100", specs.CIFAR100)
@register_dataset("cifar10", specs.CIFAR10)
def _load_cifar(spec: DatasetSpec, options: dict[str, Any], data_dir) -> Splits:
    root = files.data_root(data_dir)
    sets = []
    for train in (True, False):
        ds = files.torchvision_download(spec.name, root, train=train)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        sets.append(TensorImageSet(images, torch.as_tensor(ds.targets), spec.hflip))
    return replace(spec, class_names=tuple(ds.classes)), sets[0], sets[1]


@register_dataset("digits", specs.DIGITS)
def _load_digits(spec: DatasetSpec, options: dict[str, Any], data_dir) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts 0..16; scaled to 0..255 so all sets share one uint8 format.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    full = TensorImageSet(
        torch.from_numpy(images).unsqueeze(1), torch.from_numpy(digits.target), spec.hflip
    )
    # A fixed seed: the test set must not change with the run's seed.
    keep, held = stratified_split(
        full.labels, 0.2, torch.Generator().manual_seed(_DIGITS_TEST_SEED)
    )
    return spec, full.subset(keep), full.subset(held)


def _synthetic_spec(path: str | None, options: dict[str, Any]) -> DatasetSpec:
    c, k = options["channels"], options["num_classes"]
    if k < 2:
        raise UserError("synthetic num_classes must be at least 2: pick a larger value")
    return DatasetSpec(
        "synthetic",
        k,
        c,
        options["image_size"],
        (0.5,) * c,
        (0.25,) * c,
        tuple(f"class{i}" for i in range(k)),
    )


_SYNTHETIC_OPTIONS = {
    "num_classes": 10,
    "channels": 3,
    "image_size": 16,
    "num_train": 1000,
    "num_test": 200,
    "noise": 0.2,
}


@register_dataset("synthetic", _synthetic_spec, options=_SYNTHETIC_OPTIONS)
def _load_synthetic(spec: DatasetSpec, options: dict[str, Any], data_dir) -> Splits:
    """Class prototypes (smooth random patterns) plus per-image Gaussian noise."""
    k, c, size = options["num_classes"], options["channels"], options["image_size"]
    gen = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    coarse = torch.rand(k, c, max(2, size // 4), max(2, size // 4), generator=gen)
    protos = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def make(n: int) -> TensorImageSet:
        labels = torch.arange(n) % k
        noisy = protos[labels] + options["noise"] * torch.randn(n, c, size, size, generator=gen)
        images = noisy.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return TensorImageSet(images, labels)

    return spec, make(options["num_train"]), make(options["num_test"])


def _folder_spec(path: str | None, options: dict[str, Any]) -> DatasetSpec:
    root = Path(path or "").expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(
                f"{root / split} is not a folder: imagefolder:<path> expects <path>/train/<class>/ "
                "and <path>/val/<class>/ (ImageNet layout)"
            )
    classes = sorted(entry.name for entry in os.scandir(root / "train") if entry.is_dir())
    if not classes:
        raise UserError(f"{root / 'train'} has no class folders: add one folder per class")
    return DatasetSpec(
        f"imagefolder:{root}",
        len(classes),
        3,
        options["image_size"],
        specs.IMAGENET_MEAN,
        specs.IMAGENET_STD,
        tuple(classes),
    )


@register_dataset(
    "imagefolder",
    _folder_spec,
    options={"image_size": 224, "num_workers": default_workers()},
    takes_path=True,
)
def _load_folder(spec: DatasetSpec, options: dict[str, Any], data_dir) -> Splits:
    root = Path(spec.name.split(":", 1)[1])
    size = options["image_size"]
    sets = []
    for split in ("train", "val"):
        folder = ImageFolderFiles(root / split)
        if folder.classes != list(spec.class_names or ()):
            raise UserError(
                f"{root / split} has classes {folder.classes[:5]}... unlike train's: "
                "give train/ and val/ the same class folders"
            )
        resize = round(size * 256 / 224)
        sets.append(FolderImageSet(folder, size, num_workers=options["num_workers"], resize=resize))
    return spec, sets[0], sets[1]


DATASETS = tuple(_usage(name) for name in _REGISTRY)


# --------------------------------------------------------------------------- lookup and loading


def _check_options(
    name: str, options: dict[str, Any], allowed: Mapping[str, Any]
) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"takes only {', '.join(allowed)}" if allowed else "takes no options"
        raise UserError(f"dataset {name} {takes}, not {', '.join(unknown)}: drop them")
    merged = {**allowed, **options}
    for key, value in merged.items():
        if isinstance(allowed[key], float):
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise UserError(f"{name} option {key}={value!r} is invalid: use a number >= 0")
            continue
        least = 0 if key == "num_workers" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise UserError(f"{name} option {key}={value!r} is invalid: use an integer >= {least}")
    return merged


def _resolve(name: str, options: dict[str, Any]) -> tuple[_Registered, DatasetSpec, dict]:
    key, colon, path = name.strip().partition(":")
    key = key.lower()
    # Not the registry's message: it shows how to write a dataset that takes a path, and a
    # path after a name that takes none is unknown too.
    if key not in _REGISTRY or (colon and not _REGISTRY.get(key).takes_path):
        choices = ", ".join(_usage(n) for n in _REGISTRY)
        raise UserError(f"unknown dataset {quote(name)}: choose one of {choices}")
    entry = _REGISTRY.get(key)
    merged = _check_options(key, options, entry.options)
    if entry.takes_path and not path:
        raise UserError(f"{key} needs a path: write {key}:<path>")
    if isinstance(entry.spec, DatasetSpec):
        return entry, entry.spec, merged
    return entry, entry.spec(path if entry.takes_path else None, merged), merged


def dataset_options(name: str) -> dict[str, Any]:
    """The options dataset ``name`` takes and their defaults ({} for an unknown name)."""
    key = name.strip().partition(":")[0].lower()
    return dict(_REGISTRY.get(key).options) if key in _REGISTRY else {}


def get_spec(name: str, **options: Any) -> DatasetSpec:
    """The spec of dataset ``name``, without loading images (``imagefolder`` lists its classes).

    For cifar100 ``class_names`` is only known after loading (see ``load_dataset``).
    """
    return _resolve(name, options)[1]


def load_dataset(
    name: str = "fashion-mnist",
    *,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    **options: Any,
) -> DataBundle:
    """Load a dataset and split it into train/val/test.

    ``train_limit`` caps the training pool *before* the stratified validation split (so
    ``len(train) + len(val) == train_limit``); ``test_limit`` caps the test set. Both keep a
    class-balanced, ``seed``-determined subset. ``options`` configure ``synthetic``
    (num_classes, channels, image_size, num_train, num_test, noise) and ``imagefolder``
    (image_size, num_workers).
    """
    entry, spec, merged = _resolve(name, options)
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction} is out of range: use 0 <= value < 1")
    for label, limit in (("train_limit", train_limit), ("test_limit", test_limit)):
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise UserError(f"{label}={limit!r} is invalid: use a positive integer or none")
    spec, train, test = entry.load(spec, merged, data_dir)
    train.num_classes = test.num_classes = spec.num_classes

    gen = torch.Generator().manual_seed(seed)
    if train_limit is not None and train_limit < len(train):
        train = train.subset(balanced_subset(train.labels, train_limit, gen))
    if test_limit is not None and test_limit < len(test):
        test = test.subset(balanced_subset(test.labels, test_limit, gen))
    keep, held = stratified_split(train.labels, val_fraction, gen)
    return DataBundle(spec, train.subset(keep), train.subset(held), test)
