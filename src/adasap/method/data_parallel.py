"""A :class:`~adasap.method.pruner.Pruner`'s model under DistributedDataParallel.

DDP holds references to a model's parameters; a removal replaces them (smaller tensors), so
the wrapper is rebuilt after every removal, after checking that every rank removed the same
neurons (:func:`adasap.distributed.check_same_model`). :meth:`Pruner.distribute` makes the
:class:`DataParallel` object; it is called like the model, always through the current wrapper.

A sharpness-aware step takes two passes. By default the first (ascent) pass runs inside
``no_sync``: each rank perturbs the weights with its own batch's gradient (the original SAM
code's m-sharpness, m = the per-rank batch size), and only the second pass's gradient is
averaged over the ranks. ``sync_ascent`` averages the ascent gradient too, so the step is the
one a single process takes with the global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adasap.distributed import all_reduce_mean, broadcast_buffers, check_same_model


class DataParallel:
    """The pruner's model wrapped for data-parallel training, rebuilt after each removal.

    Args:
        pruner: the :class:`~adasap.method.pruner.Pruner` whose model is trained.
        wrap: ``model -> wrapper`` (default: ``DistributedDataParallel(model, **ddp_kwargs)``).
        ddp_kwargs: for the default wrapper, e.g. ``device_ids=[local_rank]``.
    """

    def __init__(
        self,
        pruner: Any,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        **ddp_kwargs: Any,
    ) -> None:
        self.pruner = pruner
        self.wrap = wrap or (lambda model: DistributedDataParallel(model, **ddp_kwargs))
        self.module = self.wrap(pruner.model)
        if hasattr(pruner.importance, "reduce"):  # gradient scores: averaged over the ranks
            pruner.importance.reduce = all_reduce_mean
        pruner.register_removal_hook(self._after_removal)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @property
    def local_ascent(self) -> bool:
        """Whether the ascent gradient stays on each rank.

        LookSAM (``sam_every > 1``) keeps a direction made from the ascent gradient, which
        must be the same on every rank, so its ascent is always synchronised.
        """
        s = self.pruner.settings
        return not s.sync_ascent and s.sam_every == 1 and hasattr(self.module, "no_sync")

    def first_pass(self) -> AbstractContextManager[Any]:
        """The context of the ascent's forward and backward pass: ``no_sync`` unless synced."""
        return self.module.no_sync() if self.local_ascent else contextlib.nullcontext()

    def rebuild(self) -> None:
        """Wrap the model's current parameters (after a removal or a restored state)."""
        self.module = self.wrap(self.pruner.model)

    def sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics on every rank (they drift apart between forwards)."""
        broadcast_buffers(self.pruner.model)

    def _after_removal(self, pruner: Any) -> None:
        check_same_model(pruner.model, f"the removal at step {pruner.steps_done}")
        self.rebuild()
