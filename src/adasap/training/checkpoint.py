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

from adasap.distributed import world_size
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


def resume(checkpoint: Path, identity: dict[str, Any], pruner: Any, loop: Any) -> None:
    """Restore ``pruner`` (and its model) and ``loop`` from an EpochLoop ``checkpoint``.

    It must have been written under the same ``identity`` (the settings that must match) and
    by as many processes (each global batch's split depends on it), else :class:`UserError`.
    """
    state = load_checkpoint(checkpoint)
    if {k: state.get(k) for k in identity} != identity:
        raise UserError(
            f"{checkpoint} was written with other settings: resume with the run's own "
            "config, or delete the checkpoint to start afresh"
        )
    written_by = state.get("world_size", 1)
    if written_by != world_size():
        how = "without torchrun" if written_by == 1 else f"as {written_by} torchrun processes"
        raise UserError(
            f"{checkpoint} was written by {written_by} process(es), not {world_size()}: "
            f"resume {how}, or delete the checkpoint to start afresh"
        )
    try:
        pruner.load_state_dict(state["pruner"])
        pruner.model.load_state_dict(state["model"])
        loop.restore(state["loop"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise UserError(
            f"checkpoint {checkpoint} is damaged ({exception_reason(exc, 120)}): delete "
            "it to start that part afresh"
        ) from exc


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
