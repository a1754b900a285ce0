"""Checkpoints that survive ``kill -9``, and the ways a run stops early."""

from __future__ import annotations

import contextlib
import io
import pickle
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from adasap.errors import UserError, exception_reason
from adasap.io import atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.pt"


class RunInterrupted(Exception):
    """SIGINT or SIGTERM arrived; the state at the last finished step is saved."""

    def __init__(self, checkpoint: Path | None) -> None:
        where = f"; the checkpoint is {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted{where}")
        self.checkpoint = checkpoint
        self.run_dir: Path | None = None  # set by the experiment that can be resumed


class TrainingDiverged(UserError):
    """A non-finite loss: the run stops, and the last good checkpoint is kept."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (temp file, fsync, rename): a kill leaves the old one.

    Serialised in memory first, so that a full disk is an ``OSError`` from our own write
    (a one-line error) rather than a ``RuntimeError`` from inside ``torch.save``.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue(), fix="choose another --out")


# what an EpochLoop checkpoint holds besides its owner's identity (training/pipeline.py)
STATE_KEYS = ("loop", "model", "pruner")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: tensors and plain data, never code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as exc:
        reason = exception_reason(exc, 160)
        raise UserError(
            f"checkpoint {path} cannot be read ({reason}): delete it to start that part afresh"
        ) from exc
    if not (isinstance(state, dict) and all(isinstance(state.get(k), dict) for k in STATE_KEYS)):
        raise UserError(
            f"checkpoint {path} is not an adasap training state (no {', '.join(STATE_KEYS)}): "
            "delete it to start that part afresh"
        )
    return state


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """While active, SIGINT/SIGTERM only raise a flag that the training loop polls."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda _signum, _frame: requested.set())
    try:
        yield requested.is_set
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
