"""Where dataset files come from: IDX files, the folders searched for them, torchvision downloads.

Fashion-MNIST/MNIST files are looked up in ``data_dir``, ``$ADASAP_DATA``, Debian's
dataset-fashion-mnist package and the cache; CIFAR is read (or downloaded) by torchvision.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from adasap.errors import UserError, exception_reason

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

# Folder names torchvision uses below its root, so a torchvision download can be reused.
_TORCHVISION_NAMES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


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
    torchvision_download(name, CACHE_DIR)
    found, missing = _idx_files_in(CACHE_DIR / _TORCHVISION_NAMES[name] / "raw")
    if missing:
        raise UserError(f"download of {name} left {', '.join(missing)} missing in {CACHE_DIR}")
    return found


def torchvision_download(name: str, root: Path, train: bool = True) -> Any:
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
        reason = exception_reason(exc)
        raise UserError(f"{name} not found and its download failed ({reason}): {hint}") from None


def data_root(data_dir: str | Path | None) -> Path:
    """Where torchvision-managed datasets live: ``data_dir``, ``$ADASAP_DATA`` or the cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return CACHE_DIR
