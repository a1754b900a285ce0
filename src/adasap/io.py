"""Atomic file writes (a reader never sees a half-written file, a crash leaves the old one),
cache entries that processes running at once build only once (:func:`cached`), and locks that
name their holder (:func:`hold_lock`: a run directory's)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from adasap.errors import UserError, exception_reason

T = TypeVar("T")

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
WRITABLE_FIX = "make it writable or choose another location"
# Marks a directory that adasap made as a run directory (the only kind --overwrite deletes) and
# names the process holding its lock, <RUN_MARKER>.lock (:func:`hold_lock`).
RUN_MARKER = ".adasap-run"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """adasap's cache root: ``cache_dir``, else ``$ADASAP_CACHE``, else ``~/.cache/adasap``."""
    if cache_dir:
        return Path(cache_dir)
    root = os.environ.get("ADASAP_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "adasap"


def check_cache_dir(cache_dir: str | Path | None) -> None:
    """Raise :class:`UserError` when :func:`cache_root` of ``cache_dir`` cannot be a folder: it,
    or the nearest of its parents that exists, is a file (say, ``/dev/null``). Checked before
    a run directory is made, since the cache is first written after it."""
    root = cache_root(cache_dir).absolute()
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(
            f"cache directory {root} cannot be made: {existing} is not a folder; pass "
            "--cache-dir a folder (created if missing) or set ADASAP_CACHE to one"
        )


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (mkstemp's temp files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# Bounds for JSON that adasap did not just write (model descriptions, run configs, cache
# manifests, summaries): a hostile or damaged file fails with one line instead of exhausting
# memory or the stack. adasap's own files are far below them.
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64


class BadJSON(ValueError):
    """Why a JSON file cannot be used, in a few words (a ``ValueError``, as ``json`` raises)."""


def load_json(path: str | Path, *, mapping: bool = True) -> Any:
    """The JSON value in ``path`` (an object when ``mapping``), read within
    :data:`MAX_JSON_BYTES` and :data:`MAX_JSON_DEPTH`; :class:`BadJSON` when the file is not
    valid JSON, too big, too deeply nested, holds an integer too long for Python to convert, or
    (``mapping``) is no object. An unreadable file raises its ``OSError``."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise BadJSON(f"larger than {MAX_JSON_BYTES >> 20} MiB")
    value = parse_json(data)
    if mapping and not isinstance(value, dict):
        raise BadJSON("not a mapping")
    return value


def parse_json(data: str | bytes) -> Any:
    """:func:`json.loads` within :data:`MAX_JSON_DEPTH`; :class:`BadJSON` (one line) for
    anything it cannot use: invalid JSON, too deep, an integer over Python's 4300 digits."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise BadJSON(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # also UnicodeDecodeError and int's 4300-digit limit
        raise BadJSON(exception_reason(exc, 160)) from None
    _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    """:class:`BadJSON` when ``value`` nests deeper than :data:`MAX_JSON_DEPTH`: code that later
    walks it recursively (``json.dumps``, comparisons) would overflow the stack. Iterative, so
    the check itself cannot."""
    level = [value]
    for _ in range(MAX_JSON_DEPTH + 1):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return
    raise BadJSON(f"nested deeper than {MAX_JSON_DEPTH} levels")


def read_json_mapping(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``path`` (:func:`load_json`); a :class:`UserError`
    ``"<path> is damaged (why): <fix>"`` when it cannot be used."""
    try:
        return load_json(path)
    except BadJSON as exc:
        raise UserError(f"{path} is damaged ({exc}): {fix}") from exc
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror or exc}): {fix}") from exc


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


class CacheMiss(Exception):
    """A cache entry that cannot be used: absent (:attr:`MISSING`) or damaged (why)."""

    MISSING = "missing"

    def __init__(self, reason: str = MISSING) -> None:
        super().__init__(reason)
        self.reason = reason


def cached(
    path: str | Path,
    load: Callable[[], T],
    build: Callable[[], T],
    *,
    on_damaged: Callable[[str], None] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> T:
    """The cache entry at ``path``: loaded, or built by one process while the others wait.

    ``load()`` returns the entry or raises :class:`CacheMiss`; ``build()`` computes it,
    publishes it with atomic writes (the part holding the checksum last, so that a reader
    never takes a half-published entry for a whole one) and returns it. A miss takes the
    entry's lock (``<path>.lock``), then loads again, since another process may have
    published the entry meanwhile; only then does it build. A damaged entry (a checksum that
    does not match, a truncated file) is reported to ``on_damaged(why)`` and rebuilt;
    ``on_wait()`` is called when another process holds the lock.
    """
    with contextlib.suppress(CacheMiss):
        return load()
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    with writing(lock_path, "make the cache writable or set ADASAP_CACHE / --cache-dir"):
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait()
            lock.acquire()
    try:
        try:
            return load()
        except CacheMiss as miss:
            if miss.reason != CacheMiss.MISSING and on_damaged is not None:
                on_damaged(miss.reason)
        return build()
    finally:
        lock.release()


def hold_lock(path: str | Path, subject: str, fix: str) -> FileLock:
    """Take the lock ``<path>.lock`` without waiting and record this process in ``path``; a
    :class:`UserError` "<subject> is in use by another adasap process (pid N): wait for it, or
    <fix>" when another process holds it. The caller releases the lock it returns.

    An operating-system lock (``flock``): the holder's death, even by ``kill -9``, releases it,
    so a crashed process never blocks the next one. The pid goes to ``path``, not to the lock
    file, which some filelock versions truncate on every attempt to take it; it is written in
    place, as a mere hint for the message (a half-written one reads as "pid unknown").
    """
    path = Path(path)
    lock = FileLock(path.with_name(path.name + ".lock"))
    with writing(path):
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise UserError(
                f"{subject} is in use by another adasap process ({_holder(path)}): wait for it, "
                f"or {fix}"
            ) from None
        try:
            with open(path, "w") as record:
                json.dump({"pid": os.getpid(), "host": socket.gethostname()}, record)
        except BaseException:
            lock.release()
            raise
    return lock


def _holder(record: Path) -> str:
    """The holder named by a lock's record: "pid N", with its host when that is another's."""
    try:
        holder = json.loads(record.read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, TypeError, KeyError):
        return "pid unknown"
    return f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on {host}"


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_checked_json(path: str | Path, obj: dict[str, Any]) -> Path:
    """``obj`` with a ``sha256`` key over its content, written atomically (a cache entry)."""
    return atomic_write_json(path, {**obj, "sha256": _json_sha256(obj)})


def read_checked_json(path: str | Path) -> dict[str, Any]:
    """The object :func:`write_checked_json` wrote (less its checksum); :class:`CacheMiss`
    when the file is absent, or damaged: truncated, not JSON, or not matching its checksum."""
    path = Path(path)
    if not path.is_file():
        raise CacheMiss()
    try:
        data = load_json(path)
    except (OSError, ValueError) as exc:
        raise CacheMiss(f"unreadable ({exc})") from exc
    if "sha256" not in data:
        raise CacheMiss("no checksum")
    digest = data.pop("sha256")
    if digest != _json_sha256(data):
        raise CacheMiss("does not match its sha256")
    return data
