"""Atomic file writes: a reader never sees a half-written file, a crash leaves the old one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from adasap.errors import UserError

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
WRITABLE_FIX = "make it writable or choose another location"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """adasap's cache root: ``cache_dir``, else ``$ADASAP_CACHE``, else ``~/.cache/adasap``."""
    if cache_dir:
        return Path(cache_dir)
    root = os.environ.get("ADASAP_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "adasap"


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (mkstemp's temp files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def read_json_mapping(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; a :class:`UserError` ``"<path> is damaged (why): <fix>"``
    when the file is not valid JSON or holds something other than an object."""
    try:
        values = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({exc}): {fix}") from exc
    if not isinstance(values, dict):
        raise UserError(f"{path} is damaged (not a mapping): {fix}")
    return values


def write_error(path: str | Path, exc: OSError, fix: str = WRITABLE_FIX) -> UserError:
    """The one message for an output that cannot be written: a full disk, no permission,
    a read-only file system, a file where a folder should be, ..."""
    if exc.errno in _NO_SPACE:
        return UserError(
            f"no space left on the device to write {path}: free some space there, or {fix}"
        )
    return UserError(f"cannot write to {path} ({exc.strerror or exc}): {fix}")


@contextlib.contextmanager
def writing(path: str | Path, fix: str = WRITABLE_FIX) -> Iterator[None]:
    """Turn an :class:`OSError` with an errno raised inside into :func:`write_error`'s
    :class:`UserError` naming ``path`` and ``fix`` (e.g. "choose a writable --out")."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:  # not from the operating system: a bug, not the user's input
            raise
        raise write_error(path, exc, fix) from exc


def atomic_write(
    path: str | Path, write: Callable[[Path], None], *, fix: str = WRITABLE_FIX
) -> Path:
    """Call ``write(tmp_path)``, fsync the result and rename it onto ``path``.

    A failure leaves the old file (if any) and no temporary file; an operating-system error
    (no space left, no permission, ...) becomes a :class:`UserError` naming ``path`` and
    ``fix``.
    """
    path = Path(path)
    with writing(path, fix):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, fix: str = WRITABLE_FIX) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fix=fix)


def atomic_write_text(path: str | Path, text: str, *, fix: str = WRITABLE_FIX) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fix=fix)


def atomic_write_json(path: str | Path, obj: Any, *, fix: str = WRITABLE_FIX) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write_text(path, text, fix=fix)
