"""Image folders: ``<root>/<class>/<image>`` files, decoded lazily into an adasap image set.

One reader serves training folders (``imagefolder:<path>``) and the official test folders of
:mod:`adasap.robustness` (ImageNet-C, ImageNet-V2).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from adasap.errors import UserError, exception_reason

# DataLoader processes per training process: more rarely pay for a ResNet-50's step, and 8
# GPU processes x 8 already ask for 64 cores (docs/paper.md, benchmarks/bench_loader.py)
MAX_DEFAULT_WORKERS = 8
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".gif")
# Folders of at most this many bytes have every image opened and verified when listed, before
# a run directory exists: a few seconds of reading. A larger one (ImageNet's 140 GB) would wait
# minutes first; its damaged files are named by the loader (:class:`UnreadableImage`) instead.
CHECK_BYTES = 256 * 2**20


class ImageFolderFiles:
    """The image files of ``<root>/<class>/<image>``; sorted class folder names give the labels.

    With ``digit_labels``, folders named only by digits ("0".."999", ImageNet-V2) are read as
    the class index itself. Files without an image suffix are skipped; an unreadable folder or
    (in a folder of at most :data:`CHECK_BYTES`) a damaged image raises :class:`UserError`.
    """

    def __init__(self, root: str | Path, *, digit_labels: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"missing image folder {self.root}: check the dataset path")
        classes = sorted(p.name for p in _entries(self.root) if p.is_dir())
        if not classes:
            raise UserError(f"no class folders in {self.root}: expected <root>/<class>/<image>")
        numeric = digit_labels and all(c.isdigit() for c in classes)
        if numeric:
            classes.sort(key=int)
        self.classes = classes
        self.samples: list[tuple[Path, int]] = []
        empty = []
        total_bytes = 0
        for index, name in enumerate(classes):
            label = int(name) if numeric else index
            files = []
            for path in _entries(self.root / name):
                size = _image_size(path)
                if size is not None:
                    files.append(path)
                    total_bytes += size
            self.samples += [(f, label) for f in files]
            if not files:
                empty.append(name)
        if empty:
            raise UserError(
                f"{self.root} lacks images (none in {', '.join(empty[:5])}): put .jpg/.png files "
                "in every class folder"
            )
        if total_bytes <= CHECK_BYTES:
            for path, _ in self.samples:
                check_image(path)
        self.targets = [label for _, label in self.samples]


class UnreadableImage(UserError):
    """An image file that cannot be read or decoded, as one line naming it.

    A ``DataLoader`` worker's exception comes back as ``type(exc)(message)`` with the worker's
    whole traceback as the message; the one line, the traceback's last, is taken back out of
    it so that the user sees the file and the fix, not 30 lines of worker frames.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith(f"Caught {type(self).__name__} ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def _unreadable(path: Path | str, exc: BaseException) -> UnreadableImage:
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, PermissionError):
        return UnreadableImage(f"cannot read {path} (permission denied): make it readable")
    if isinstance(exc, Image.DecompressionBombError):
        return UnreadableImage(
            f"{path} is too large to decode ({exception_reason(exc, 120)}): shrink or delete it"
        )
    # Pillow's message for a file it cannot identify repeats the path
    identified = not isinstance(exc, UnidentifiedImageError)
    reason = exception_reason(exc, 120) if identified else "not an image format Pillow reads"
    return UnreadableImage(f"cannot decode {path} ({reason}): replace or delete the file")


def _entries(folder: Path) -> list[Path]:
    """The sorted entries of a dataset folder; an unreadable folder is the user's to fix."""
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise UserError(
            f"cannot list {folder} ({exc.strerror or exc}): make the folder readable"
        ) from None


def _image_size(path: Path) -> int | None:
    """The byte size of an image file, or None for another file (no image suffix, a folder)."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    try:
        status = path.stat()
    except OSError as exc:
        raise _unreadable(path, exc) from None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def check_image(path: Path | str) -> None:
    """Raise :class:`UnreadableImage` unless ``path`` opens as an image whose size Pillow
    accepts and whose data is intact (as far as Pillow's ``verify`` reads: every PNG chunk)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # a damaged file raises one of many types in Pillow's plugins
        raise _unreadable(path, exc) from None


def default_workers() -> int:
    """Loader processes for one training process: this machine's cores shared by the processes
    torchrun started on it (``LOCAL_WORLD_SIZE``), at least 1 and at most 8."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1)
    return max(1, min(MAX_DEFAULT_WORKERS, (os.cpu_count() or 1) // processes))


def read_image(path: str | Path, channels: int = 3) -> Tensor:
    """Decode one image file into a uint8 CHW tensor with 3 (RGB) or 1 (grey) channels."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB" if channels == 3 else "L"))
    except Exception as exc:  # a damaged file raises one of many types in Pillow's plugins
        raise _unreadable(path, exc) from None
    return torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)


class FolderImageSet:
    """Lazily decoded images of an :class:`ImageFolderFiles`, restricted to ``indices``.

    Batches are made by a ``DataLoader`` with ``num_workers`` processes. Training batches use
    RandomResizedCrop(``image_size``) + flip; evaluation batches scale the shorter side to
    ``resize`` (if given), then centre-crop ``image_size`` (if given). ``source`` says where
    the images come from, for reports.
    """

    def __init__(
        self,
        files: ImageFolderFiles,
        image_size: int | None,
        indices: Tensor | None = None,
        num_workers: int = 0,
        *,
        resize: int | None = None,
        channels: int = 3,
        source: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.files = files
        self.image_size = image_size
        self.indices = torch.arange(len(files.samples)) if indices is None else indices
        self.num_workers = num_workers
        self.resize = resize
        self.channels = channels
        self.source = source
        self.num_classes = num_classes
        self.labels = torch.as_tensor(files.targets, dtype=torch.int64)[self.indices]

    @property
    def classes(self) -> list[str]:
        return self.files.classes

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices: Tensor | Sequence[int]) -> FolderImageSet:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return FolderImageSet(
            self.files,
            self.image_size,
            self.indices[idx],
            self.num_workers,
            resize=self.resize,
            channels=self.channels,
            source=self.source,
            num_classes=self.num_classes,
        )

    def view(self, augment: bool) -> torch.utils.data.Dataset:
        """A map-style dataset yielding ``(float image in [0, 1], label)``."""
        from torchvision.transforms import v2

        size = self.image_size
        if augment:
            if size is None:
                raise UserError("training on a folder needs an image_size: give the set one")
            steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps = [v2.Resize(self.resize, antialias=True)] if self.resize is not None else []
            steps += [v2.CenterCrop(size)] if size is not None else []
        samples = [self.files.samples[i] for i in self.indices.tolist()]
        transform = v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])
        return _FolderView(samples, transform, self.channels)


class _FolderView(torch.utils.data.Dataset):
    def __init__(self, samples: list[tuple[Path, int]], transform, channels: int) -> None:
        self.samples = samples
        self.transform = transform
        self.channels = channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        return self.transform(read_image(path, self.channels)), label
