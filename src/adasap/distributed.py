"""Several processes, one training job: torchrun's process group and what the ranks agree on.

adasap runs data-parallel under ``torchrun`` (one process per device; docs/distributed.md).
Without torchrun's variables nothing here does anything: every helper is then the
single-process identity (rank 0 of 1), so code calls them unconditionally.

- :func:`init_from_env` joins the process group that torchrun describes (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``): NCCL on CUDA, Gloo on the CPU;
- reductions (:func:`all_reduce_sum`, :func:`all_reduce_mean`) and agreement
  (:func:`broadcast_value`, :func:`on_main`): rank 0 decides and writes, the others follow;
- :func:`check_same_model`: every rank holds the same architecture and parameter values
  (checked after each removal), failing with a :class:`UserError` that names the difference.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from adasap.errors import UserError, exception_summary

T = TypeVar("T")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """Whether this process was started by torchrun (or any launcher setting its variables)."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def local_rank() -> int:
    """This process's index on its machine (picks its GPU)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def init_from_env(device: str = "auto") -> bool:
    """Join torchrun's process group when launched by it; returns whether a group was made.

    ``device`` is the run's device setting: CUDA (``auto`` with a GPU, ``cuda``) uses NCCL
    with one GPU per process (``cuda:LOCAL_RANK``); the CPU uses Gloo.
    """
    if not launched() or not dist.is_available() or dist.is_initialized():
        return False
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but CUDA is not available: use cpu")
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def close() -> None:
    """Leave the process group (at the end of a command that joined it)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_distributed() -> bool:
    """More than one process trains: reductions and checks are needed."""
    return world_size() > 1


def is_main() -> bool:
    """Rank 0: the process that writes files, logs and progress bars."""
    return rank() == 0


def shard() -> tuple[int, int]:
    """``(rank, world size)``: which part of every global batch this process takes."""
    return rank(), world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors (on this process's GPU), Gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Tensor) -> Tensor:
    """The sum of ``values`` over all ranks (a new tensor on ``values``' device)."""
    if not is_distributed():
        return values.clone()
    total = values.detach().to(_collective_device(), copy=True)
    dist.all_reduce(total)
    return total.to(values.device)


def all_reduce_mean(values: Tensor) -> Tensor:
    """The mean of ``values`` over all ranks."""
    return all_reduce_sum(values) / world_size()


def broadcast_value(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def gather_values(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on some rank (so that all ranks stop at the same step)."""
    if not is_distributed():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def on_main(action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 only (a write, a decision); every rank returns its result.

    A failure on rank 0 is raised on every rank (its :class:`UserError` message on the others),
    so no rank waits forever for a rank that gave up.
    """
    if not is_distributed():
        return action()
    outcome: tuple[str, Any] | None = None
    error: BaseException | None = None
    if is_main():
        try:
            outcome = ("ok", action())
        except BaseException as exc:  # re-raised below, after the others have heard of it
            error = exc
            user = isinstance(exc, UserError)
            outcome = ("error" if user else "crash", str(exc) if user else exception_summary(exc))
    outcome = broadcast_value(outcome)
    if error is not None:
        raise error
    kind, value = outcome
    if kind == "error":
        raise UserError(value)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed ({value})")
    return value


def model_fingerprint(model: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, digest of the values)`` of every parameter, in order."""
    found = []
    for name, p in model.named_parameters():
        raw = p.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        found.append((name, tuple(p.shape), hashlib.blake2b(raw, digest_size=8).hexdigest()))
    return found


def _first_difference(mine: list, theirs: list) -> str:
    if len(mine) != len(theirs):
        return f"{len(theirs)} parameter tensors instead of {len(mine)}"
    for (name, shape, digest), (_, other_shape, other_digest) in zip(mine, theirs, strict=True):
        if shape != other_shape:
            return f"{name} has shape {list(other_shape)} instead of {list(shape)}"
        if digest != other_digest:
            return f"the values of {name} differ"
    return "the parameter names differ"


def check_same_model(model: nn.Module, when: str) -> None:
    """Raise :class:`UserError` unless every rank's ``model`` has the same parameters.

    Same names, shapes and (bit for bit) values: after a removal this proves that every rank
    removed the same neurons. Buffers (BatchNorm statistics) are not compared: DDP broadcasts
    rank 0's at each forward pass.
    """
    if not is_distributed():
        return
    everyone = gather_values(model_fingerprint(model))
    for index, theirs in enumerate(everyone[1:], start=1):
        if theirs != everyone[0]:
            raise UserError(
                f"after {when}, rank {index}'s model differs from rank 0's "
                f"({_first_difference(everyone[0], theirs)}): every rank must score the "
                "neurons alike (a criterion that gives the same scores on every rank, the same "
                "dense model and settings everywhere; docs/distributed.md)"
            )


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), e.g. before evaluating."""
    if not is_distributed():
        return
    device = _collective_device()
    for buffer in model.buffers():
        values = buffer.detach().to(device, copy=True)
        dist.broadcast(values, src=0)
        buffer.data.copy_(values)
