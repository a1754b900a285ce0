import multiprocessing
import os
import time

import pytest

from adasap.io import (
    CacheMiss,
    atomic_write,
    atomic_write_json,
    cached,
    read_checked_json,
    write_checked_json,
)


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "result.json"
    atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")

    def crash(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


# --------------------------------------------------------------------------- cache entries


def build_entry(path, marker, delay=0.0):
    """A cache entry whose build takes ``delay`` seconds and leaves a line in ``marker``."""

    def load():
        return read_checked_json(path)["value"]

    def build():
        with open(marker, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(delay)
        write_checked_json(path, {"value": os.getpid()})
        return os.getpid()

    return cached(path, load, build)


def race(path, marker, start, results):
    start.wait()
    results.put(build_entry(path, marker, delay=0.5))


def test_processes_racing_on_an_empty_cache_build_the_entry_once(tmp_path):
    # fork: the children need only this module's functions (spawn would import torch again)
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    entry, marker = tmp_path / "cache" / "entry.json", tmp_path / "built"
    workers = [context.Process(target=race, args=(entry, marker, start, results)) for _ in "ab"]
    for worker in workers:
        worker.start()
    start.set()
    values = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    builders = marker.read_text().split()
    assert len(builders) == 1  # one process built it, the other waited and loaded it
    assert values == [int(builders[0])] * 2
    assert not list(entry.parent.glob("*.tmp"))


def test_damaged_entry_is_detected_and_rebuilt(tmp_path):
    entry, marker = tmp_path / "entry.json", tmp_path / "built"
    first = build_entry(entry, marker)
    assert build_entry(entry, marker) == first and len(marker.read_text().split()) == 1
    whole = entry.read_text()
    for damage in (whole[: len(whole) // 2], whole.replace(str(first), str(first + 1)), "{}"):
        entry.write_text(damage)
        with pytest.raises(CacheMiss):
            read_checked_json(entry)
        reasons = []
        assert (
            cached(entry, lambda: read_checked_json(entry), lambda: 7, on_damaged=reasons.append)
            == 7
        )
        assert len(reasons) == 1 and reasons[0] != CacheMiss.MISSING
    entry.unlink()
    with pytest.raises(CacheMiss) as missing:
        read_checked_json(entry)
    assert missing.value.reason == CacheMiss.MISSING
