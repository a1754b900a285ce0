"""Datasets as in-memory uint8 tensors (or lazy image folders) and a fast batch iterator.

Images leave :func:`batches` as float32 NCHW in [0, 1], not normalised: models normalise inside
(:class:`adasap.models.Normalize`), so corruption benchmarks and exported models see raw pixels.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adasap.errors import UserError

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path.home() / ".cache" / "adasap" / "data"
ENV_VAR = "ADASAP_DATA"

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Big-endian element types of the IDX format, keyed by the third magic byte.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_DIGIT_NAMES = tuple(str(d) for d in range(10))
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_SYNTHETIC_SEED = 20240601
_DIGITS_TEST_SEED = 0
_SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "num_classes": 10,
    "channels": 3,
    "image_size": 16,
    "num_train": 1000,
    "num_test": 200,
    "noise": 0.2,
}
_FOLDER_DEFAULTS: dict[str, Any] = {"image_size": 224, "num_workers": min(8, os.cpu_count() or 1)}


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset; ``hflip`` says if mirroring keeps the class."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None
    hflip: bool = True


_SPECS = {
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        10,
        1,
        28,
        (0.2860,),
        (0.3530,),
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    # Mirrored handwritten digits are not digits (2, 3, 4, 5, 7), so no flips for either set.
    "mnist": DatasetSpec("mnist", 10, 1, 28, (0.1307,), (0.3081,), _DIGIT_NAMES, hflip=False),
    "cifar10": DatasetSpec(
        "cifar10",
        10,
        3,
        32,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        (
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
    ),
    "cifar100": DatasetSpec(
        "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
    "digits": DatasetSpec("digits", 10, 1, 8, (0.3053,), (0.3759,), _DIGIT_NAMES, hflip=False),
}
DATASETS = (*_SPECS, "synthetic", "imagefolder:<path>")

# Folder names torchvision uses below its root, so a torchvision download can be reused.
_TORCHVISION_NAMES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


@dataclass(eq=False)
class TensorImageSet:
    """Images held in memory: ``images`` uint8 NCHW, ``labels`` int64 N."""

    images: Tensor
    labels: Tensor
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 NCHW, got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"{self.images.shape[0]} images but labels of shape {self.labels.shape}"
            )
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: Tensor | Sequence[int]) -> TensorImageSet:
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        return TensorImageSet(self.images[idx], self.labels[idx.to(self.labels.device)], self.hflip)

    def float_images(self) -> Tensor:
        """All images as float32 in [0, 1]."""
        return self.images.float().div_(255)

    def to(self, device: torch.device | str) -> TensorImageSet:
        """Move the whole set, e.g. onto the GPU so batches need no host-to-device copies."""
        return TensorImageSet(self.images.to(device), self.labels.to(device), self.hflip)


class FolderImageSet:
    """Lazily decoded images of a torchvision ``ImageFolder``, restricted to ``indices``.

    Batches are made by a ``DataLoader`` with ``num_workers`` processes; training batches use
    RandomResizedCrop + flip, evaluation batches resize to size*256/224 and center-crop.
    """

    def __init__(
        self,
        folder: Any,  # torchvision.datasets.ImageFolder, imported lazily
        image_size: int,
        indices: Tensor | None = None,
        num_workers: int = 0,
    ) -> None:
        self.folder = folder
        self.image_size = image_size
        self.indices = torch.arange(len(folder.samples)) if indices is None else indices
        self.num_workers = num_workers
        self.labels = torch.as_tensor(folder.targets, dtype=torch.int64)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices: Tensor | Sequence[int]) -> FolderImageSet:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return FolderImageSet(self.folder, self.image_size, self.indices[idx], self.num_workers)

    def view(self, augment: bool) -> torch.utils.data.Dataset:
        """A map-style dataset yielding ``(float image in [0, 1], label)``."""
        import torchvision.transforms as T

        size = self.image_size
        if augment:
            steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
        samples = [self.folder.samples[i] for i in self.indices.tolist()]
        return _FolderView(samples, T.Compose([*steps, T.ToTensor()]))


class _FolderView(torch.utils.data.Dataset):
    def __init__(self, samples: list[tuple[str, int]], transform: Any) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        return self.transform(default_loader(path)), label


ImageSet = TensorImageSet | FolderImageSet


@dataclass(eq=False)
class DataBundle:
    """A dataset's spec and its three splits; ``val`` is carved from the training data."""

    spec: DatasetSpec
    train: ImageSet
    val: ImageSet
    test: ImageSet


# --------------------------------------------------------------------------- IDX files


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped, detected by content) into a native-endian array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(
            f"cannot read {path} ({exc}): the file is damaged, delete it and fetch it again"
        ) from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_DTYPES:
        raise UserError(
            f"{path} is not an IDX file (magic number {raw[:4].hex() or 'missing'}): "
            "replace it with the original dataset file"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else None
    expected = header + math.prod(dims) * dtype.itemsize if dims is not None else header
    if dims is None or len(raw) != expected:
        raise UserError(
            f"{path} is truncated or corrupt ({len(raw)} bytes where its header promises "
            f"{expected}): delete it and fetch it again"
        )
    return np.frombuffer(raw, dtype, offset=header).astype(dtype.newbyteorder("=")).reshape(dims)


def _idx_files_in(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The four IDX files in ``folder`` (plain preferred over .gz) and the names missing."""
    found, missing = {}, []
    for base in IDX_FILES:
        for candidate in (folder / base, folder / f"{base}.gz"):
            if candidate.is_file():
                found[base] = candidate
                break
        else:
            missing.append(f"{base}[.gz]")
    return found, missing


def _idx_layouts(root: Path, name: str, *, direct: bool) -> list[Path]:
    """Folders below ``root`` that may hold ``name``'s files, torchvision's layout included."""
    subdirs = [root / name, root / _TORCHVISION_NAMES[name] / "raw"]
    return [root, *subdirs] if direct else subdirs


def locate_idx_files(name: str, data_dir: str | Path | None = None) -> dict[str, Path]:
    """Find Fashion-MNIST/MNIST IDX files: ``data_dir``, ``$ADASAP_DATA``, Debian's, the cache.

    A folder counts if it holds the four files directly, in ``<name>/`` or in torchvision's
    ``<FashionMNIST|MNIST>/raw/``. With nothing found, torchvision downloads into the cache.
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        for folder in _idx_layouts(root, name, direct=True):
            found, _ = _idx_files_in(folder)
            if len(found) == len(IDX_FILES):
                return found
        _, missing = _idx_files_in(root)
        raise UserError(
            f"no {name} files in {root}: missing {', '.join(missing)}; "
            f"put the four IDX files there or leave out --data-dir"
        )
    folders: list[Path] = []
    if os.environ.get(ENV_VAR):
        # MNIST and Fashion-MNIST files share names: only Fashion-MNIST may sit at the top.
        env_root = Path(os.environ[ENV_VAR]).expanduser()
        folders += _idx_layouts(env_root, name, direct=name == "fashion-mnist")
    if name == "fashion-mnist":
        folders.append(DEBIAN_FASHION_DIR)
    folders += _idx_layouts(CACHE_DIR, name, direct=False)
    for folder in folders:
        found, _ = _idx_files_in(folder)
        if len(found) == len(IDX_FILES):
            return found
    _torchvision_download(name, CACHE_DIR)
    found, missing = _idx_files_in(CACHE_DIR / _TORCHVISION_NAMES[name] / "raw")
    if missing:
        raise UserError(f"download of {name} left {', '.join(missing)} missing in {CACHE_DIR}")
    return found


def _torchvision_download(name: str, root: Path, train: bool = True) -> Any:
    """Build torchvision's dataset with download=True; a failure becomes a UserError."""
    import torchvision.datasets as tvd

    cls = {
        "fashion-mnist": tvd.FashionMNIST,
        "mnist": tvd.MNIST,
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
    }[name]
    hint = {
        "fashion-mnist": "install the Debian package dataset-fashion-mnist, set ADASAP_DATA to "
        "a folder holding its four IDX files, or pass --data-dir",
        "mnist": "put its four IDX files in $ADASAP_DATA/mnist/ or pass --data-dir",
        "cifar10": f"put cifar-10-python.tar.gz or cifar-10-batches-py/ in {root} "
        "or pass --data-dir",
        "cifar100": f"put cifar-100-python.tar.gz or cifar-100-python/ in {root} "
        "or pass --data-dir",
    }[name]
    try:
        root.mkdir(parents=True, exist_ok=True)
        return cls(str(root), train=train, download=True)
    except (OSError, RuntimeError, EOFError, tarfile.TarError, pickle.UnpicklingError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"{name} not found and its download failed ({reason}): {hint}") from None


def _load_idx_dataset(
    spec: DatasetSpec, data_dir: str | Path | None
) -> tuple[TensorImageSet, TensorImageSet]:
    files = locate_idx_files(spec.name, data_dir)
    sets = []
    for split in ("train", "t10k"):
        images = read_idx(files[f"{split}-images-idx3-ubyte"])
        labels = read_idx(files[f"{split}-labels-idx1-ubyte"])
        size = spec.image_size
        if images.dtype != np.uint8 or images.shape[1:] != (size, size):
            raise UserError(
                f"{files[f'{split}-images-idx3-ubyte']} holds {images.dtype} images of shape "
                f"{images.shape[1:]}, not {spec.name}'s uint8 {size}x{size}: use the right files"
            )
        if labels.ndim != 1 or len(labels) != len(images) or labels.max(initial=0) >= 10:
            raise UserError(
                f"{files[f'{split}-labels-idx1-ubyte']} does not match its {len(images)} images "
                "(count or label range): use the labels file from the same dataset"
            )
        sets.append(
            TensorImageSet(
                torch.from_numpy(images).unsqueeze(1),
                torch.from_numpy(labels.astype(np.int64)),
                spec.hflip,
            )
        )
    return sets[0], sets[1]


# --------------------------------------------------------------------------- other sources


def _data_root(data_dir: str | Path | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return CACHE_DIR


def _load_cifar(
    spec: DatasetSpec, data_dir: str | Path | None
) -> tuple[DatasetSpec, TensorImageSet, TensorImageSet]:
    root = _data_root(data_dir)
    sets = []
    for train in (True, False):
        ds = _torchvision_download(spec.name, root, train=train)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        sets.append(TensorImageSet(images, torch.as_tensor(ds.targets), spec.hflip))
    return replace(spec, class_names=tuple(ds.classes)), sets[0], sets[1]


def _load_digits(spec: DatasetSpec) -> tuple[TensorImageSet, TensorImageSet]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts 0..16; scaled to 0..255 so all sets share one uint8 format.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    full = TensorImageSet(
        torch.from_numpy(images).unsqueeze(1), torch.from_numpy(digits.target), spec.hflip
    )
    # A fixed seed: the test set must not change with the run's seed.
    keep, held = _stratified_split(
        full.labels, 0.2, torch.Generator().manual_seed(_DIGITS_TEST_SEED)
    )
    return full.subset(keep), full.subset(held)


def _synthetic_spec(options: dict[str, Any]) -> DatasetSpec:
    c, k = options["channels"], options["num_classes"]
    return DatasetSpec(
        "synthetic",
        k,
        c,
        options["image_size"],
        (0.5,) * c,
        (0.25,) * c,
        tuple(f"class{i}" for i in range(k)),
    )


def _load_synthetic(options: dict[str, Any]) -> tuple[TensorImageSet, TensorImageSet]:
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

    return make(options["num_train"]), make(options["num_test"])


def _check_options(name: str, options: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"takes only {', '.join(allowed)}" if allowed else "takes no options"
        raise UserError(f"dataset {name} {takes}, not {', '.join(unknown)}: drop them")
    merged = {**allowed, **options}
    for key, value in merged.items():
        if key == "noise":
            if not isinstance(value, int | float) or value < 0:
                raise UserError(f"{name} option noise={value!r} is invalid: use a number >= 0")
            continue
        least = 0 if key == "num_workers" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise UserError(f"{name} option {key}={value!r} is invalid: use an integer >= {least}")
    if name == "synthetic" and merged["num_classes"] < 2:
        raise UserError("synthetic num_classes must be at least 2: pick a larger value")
    return merged


def _folder_root(name: str) -> Path:
    path = name.split(":", 1)[1]
    if not path:
        raise UserError("imagefolder needs a path: write imagefolder:<path>")
    return Path(path).expanduser()


def _folder_classes(root: Path) -> list[str]:
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(
                f"{root / split} is not a folder: imagefolder:<path> expects <path>/train/<class>/ "
                "and <path>/val/<class>/ (ImageNet layout)"
            )
    classes = sorted(entry.name for entry in os.scandir(root / "train") if entry.is_dir())
    if not classes:
        raise UserError(f"{root / 'train'} has no class folders: add one folder per class")
    return classes


def get_spec(name: str, **options: Any) -> DatasetSpec:
    """The spec of dataset ``name``, without loading images (``imagefolder`` lists its classes).

    For cifar100 ``class_names`` is only known after loading (see ``load_dataset``).
    """
    key = name.strip()
    if key.lower() in _SPECS:
        _check_options(key.lower(), options, {})
        return _SPECS[key.lower()]
    if key.lower() == "synthetic":
        return _synthetic_spec(_check_options("synthetic", options, _SYNTHETIC_DEFAULTS))
    if key.lower().startswith("imagefolder:"):
        opts = _check_options("imagefolder", options, _FOLDER_DEFAULTS)
        root = _folder_root(key)
        classes = _folder_classes(root)
        return DatasetSpec(
            f"imagefolder:{root}",
            len(classes),
            3,
            opts["image_size"],
            _IMAGENET_MEAN,
            _IMAGENET_STD,
            tuple(classes),
        )
    raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def _load_folder(
    spec: DatasetSpec, options: dict[str, Any]
) -> tuple[FolderImageSet, FolderImageSet]:
    from torchvision.datasets import ImageFolder

    opts = {**_FOLDER_DEFAULTS, **options}
    root = _folder_root(spec.name)
    sets = []
    for split in ("train", "val"):
        try:
            folder = ImageFolder(str(root / split))
        except FileNotFoundError as exc:  # a class folder without images (or no classes)
            reason = " ".join(str(exc).split()).split(". ")[0]
            raise UserError(
                f"{root / split} lacks images ({reason}): put .jpg/.png files in every class "
                "folder of train/ and val/"
            ) from exc
        if folder.classes != list(spec.class_names or ()):
            raise UserError(
                f"{root / split} has classes {folder.classes[:5]}... unlike train's: "
                "give train/ and val/ the same class folders"
            )
        sets.append(FolderImageSet(folder, opts["image_size"], num_workers=opts["num_workers"]))
    return sets[0], sets[1]


# --------------------------------------------------------------------------- splits and limits


def _class_ranks(labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random permutation of the indices and each permuted sample's rank within its class."""
    perm = torch.randperm(len(labels), generator=generator)
    lab = labels.cpu()[perm]
    order = torch.argsort(lab, stable=True)
    counts = torch.bincount(lab)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(perm)
    ranks[order] = torch.arange(len(lab)) - starts[lab[order]]
    return perm, ranks


def _stratified_split(
    labels: Tensor, fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Indices (kept, held out), holding out ``round(fraction * n_c)`` random samples per class."""
    perm, ranks = _class_ranks(labels, generator)
    per_class = torch.round(torch.bincount(labels.cpu()) * fraction).long()
    held = ranks < per_class[labels.cpu()[perm]]
    return perm[~held].sort().values, perm[held].sort().values


def balanced_subset(labels: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Indices of ``k`` samples taken round-robin over classes in a seeded random order."""
    perm, ranks = _class_ranks(labels, generator)
    return perm[torch.argsort(ranks, stable=True)[:k]].sort().values


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
    spec = get_spec(name, **options)
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction} is out of range: use 0 <= value < 1")
    for label, limit in (("train_limit", train_limit), ("test_limit", test_limit)):
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise UserError(f"{label}={limit!r} is invalid: use a positive integer or none")

    train: ImageSet
    test: ImageSet
    if spec.name in ("fashion-mnist", "mnist"):
        train, test = _load_idx_dataset(spec, data_dir)
    elif spec.name in ("cifar10", "cifar100"):
        spec, train, test = _load_cifar(spec, data_dir)
    elif spec.name == "digits":
        train, test = _load_digits(spec)
    elif spec.name == "synthetic":
        train, test = _load_synthetic({**_SYNTHETIC_DEFAULTS, **options})
    else:
        train, test = _load_folder(spec, options)

    gen = torch.Generator().manual_seed(seed)
    if train_limit is not None and train_limit < len(train):
        train = train.subset(balanced_subset(train.labels, train_limit, gen))
    if test_limit is not None and test_limit < len(test):
        test = test.subset(balanced_subset(test.labels, test_limit, gen))
    keep, held = _stratified_split(train.labels, val_fraction, gen)
    return DataBundle(spec, train.subset(keep), train.subset(held), test)


# --------------------------------------------------------------------------- batches


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
        for x, y in loader:
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            yield x, y.to(device, non_blocking=True)
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
