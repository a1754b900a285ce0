"""Hostile image folders and settings that fail only once a run has begun: each is one line
``error: ...`` with exit code 2 and no traceback, and no run directory is left behind."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from adasap.data import FolderImageSet, ImageFolderFiles
from adasap.data import folders as folders_module
from adasap.data.batching import batches
from adasap.errors import UserError
from test_bad_input import cli_fails

TINY = ["--train-limit", "8", "--test-limit", "4", "--dense-epochs", "1", "--warmup-epochs", "0",
        "--prune-epochs", "1", "--finetune-epochs", "0", "--batch-size", "4",
        "--corruptions", "none", "--no-progress", "--workers", "1"]  # fmt: skip


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ADASAP_DATA", raising=False)
    return tmp_path


def png_bytes(height: int = 20, width: int = 24, seed: int = 0) -> bytes:
    from io import BytesIO

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels, with only a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_folder(root: Path, per_class: int = 4) -> Path:
    """``root/{train,val}/{cat,dog}/<i>.png``: small, valid images."""
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                (root / split / cls / f"{i}.png").write_bytes(png_bytes(seed=i))
    return root


HOSTILE: dict[str, tuple[Callable[[], bytes], list[str]]] = {
    "text-named-png": (lambda: b"just text\n", ["cannot decode", "replace or delete"]),
    "zero-bytes": (lambda: b"", ["cannot decode", "replace or delete"]),
    "truncated": (lambda: png_bytes(64, 64)[:4000], ["cannot decode", "replace or delete"]),
    "decompression-bomb": (bomb_png, ["too large to decode", "shrink or delete"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_run_on_a_hostile_image(isolated, capsys, case):
    make, words = HOSTILE[case]
    root = image_folder(isolated / "images")
    bad = root / "train" / "dog" / "9.png"
    bad.write_bytes(make())
    runs = isolated / "runs"
    args = ["run", "--dataset", f"imagefolder:{root}", *TINY, "--out", str(runs)]
    cli_fails(capsys, args, str(bad), *words)
    assert not runs.exists()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_loader_worker_names_the_hostile_image_in_one_line(tmp_path, monkeypatch, case):
    # a folder too large to check when listed: the loader's worker meets the file
    monkeypatch.setattr(folders_module, "CHECK_BYTES", 0)
    make, words = HOSTILE[case]
    root = image_folder(tmp_path)
    bad = root / "train" / "cat" / "9.png"
    bad.write_bytes(make())
    images = FolderImageSet(ImageFolderFiles(root / "train"), 16, num_workers=1)
    with pytest.raises(UserError) as info:
        list(batches(images, 4, shuffle=False))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith(f"cannot decode {bad}") or message.startswith(f"{bad}"), message
    for word in words:
        assert word in message


def test_a_loader_worker_names_an_unreadable_image(tmp_path, monkeypatch):
    # root reads every file, so the permission error is made where the worker opens the file
    from PIL import Image

    monkeypatch.setattr(folders_module, "CHECK_BYTES", 0)
    root = image_folder(tmp_path)
    bad = root / "train" / "cat" / "1.png"
    real_open = Image.open

    def guarded_open(path, *args, **kwargs):
        if Path(path) == bad:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", guarded_open)
    images = FolderImageSet(ImageFolderFiles(root / "train"), 16, num_workers=1)
    with pytest.raises(UserError) as info:
        list(batches(images, 4, shuffle=False))
    assert str(info.value) == f"cannot read {bad} (permission denied): make it readable"


def test_run_on_an_unreadable_class_folder(isolated, capsys, monkeypatch):
    root = image_folder(isolated / "images")
    locked = root / "train" / "dog"
    real_iterdir = Path.iterdir

    def guarded_iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", guarded_iterdir)
    runs = isolated / "runs"
    args = ["run", "--dataset", f"imagefolder:{root}", *TINY, "--out", str(runs)]
    words = [f"cannot list {locked}", "Permission denied", "make the folder readable"]
    cli_fails(capsys, args, *words)
    assert not runs.exists()


def test_run_on_an_unreadable_image(isolated, capsys, monkeypatch):
    from PIL import Image

    root = image_folder(isolated / "images")
    bad = root / "val" / "cat" / "2.png"
    real_open = Image.open

    def guarded_open(path, *args, **kwargs):
        if Path(path) == bad:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", guarded_open)
    runs = isolated / "runs"
    args = ["run", "--dataset", f"imagefolder:{root}", *TINY, "--out", str(runs)]
    cli_fails(capsys, args, f"cannot read {bad} (permission denied)", "make it readable")
    assert not runs.exists()


# --------------------------------------------------------------------------- settings

SYNTHETIC = ["--dataset", "synthetic", "--train-limit", "200", "--test-limit", "50",
             "--dense-epochs", "1", "--warmup-epochs", "0.5", "--prune-epochs", "1",
             "--finetune-epochs", "0.5", "--batch-size", "50", "--corruptions", "none",
             "--no-progress"]  # fmt: skip


@pytest.mark.parametrize(
    "args,words",
    [
        (["--cache-dir", "/dev/null"], ["/dev/null is not a folder", "--cache-dir a folder"]),
        (["--cache-dir", "/dev/null/cache"], ["/dev/null is not a folder", "ADASAP_CACHE"]),
        (["--base-optimizer", "LBFGS"], ["'LBFGS' cannot be used", "closure", "adamw", "sgd"]),
        (["--base-optimizer", "SparseAdam"], ["'SparseAdam' cannot be used", "sparse", "sgd"]),
    ],
    ids=["cache-dir-a-device", "cache-dir-below-a-file", "lbfgs", "sparseadam"],
)
def test_run_with_settings_that_fail_after_the_start(isolated, capsys, args, words):
    runs = isolated / "runs"
    cli_fails(capsys, ["run", *SYNTHETIC, *args, "--out", str(runs), "--name", "new"], *words)
    assert not runs.exists()


def test_an_image_only_a_loader_meets_leaves_no_run_directory(isolated, capsys, monkeypatch):
    # a folder too large to check when listed: the training loader meets the bad image after
    # the run directory exists, and the run that finished no method takes it away again
    monkeypatch.setattr(folders_module, "CHECK_BYTES", 0)
    root = image_folder(isolated / "images")
    bad = root / "train" / "dog" / "9.png"
    bad.write_bytes(b"just text\n")
    runs = isolated / "runs"
    args = ["run", "--dataset", f"imagefolder:{root}", *TINY, "--out", str(runs)]
    cli_fails(capsys, args, str(bad), "cannot decode")
    assert not runs.exists() or not any(runs.iterdir())
