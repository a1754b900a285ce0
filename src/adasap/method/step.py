"""One training update for any optimizer: :func:`sharpness_aware_step`.

It runs SAM's sequence (:mod:`adasap.method.optim`) with BatchNorm statistics protected, AMP and
gradient clipping, and a plain single-pass step for a non-SAM optimizer, so training loops need
one code path for every method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from adasap.distributed import any_rank
from adasap.method.cheap_sam import add_direction, gradients, store_direction
from adasap.method.optim import SAM


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but leave running statistics alone.

    Used for SAM's second pass, which sees perturbed weights whose activations must not leak
    into the statistics used at inference.
    """
    layers = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    saved = [m.track_running_stats for m in layers]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, value in zip(layers, saved, strict=True):
            m.track_running_stats = value


def sharpness_aware_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    compute_loss: Callable[[], Tensor],
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
    after_first_backward: Callable[[], None] | None = None,
    *,
    ascent: bool = True,
    ascent_loss: Callable[[], Tensor] | None = None,
    looksam_alpha: float | None = None,
    first_pass: contextlib.AbstractContextManager[Any] | None = None,
) -> Tensor:
    """One training update with any optimizer; two passes for SAM/AdaSAP, one otherwise.

    ``compute_loss`` runs the forward pass on the current batch (inside autocast when AMP is
    wanted) and returns the loss. Returns the loss of the first pass, at the unperturbed
    weights, detached. With a grad scaler the perturbation direction uses the scaled gradient:
    its scale cancels in ``g / ||g||``, so only the final update needs unscaling.
    ``after_first_backward`` is called while the gradients at the unperturbed weights are
    present (e.g. to accumulate Taylor scores).

    The cheaper variants (:mod:`adasap.method.cheap_sam`) for a SAM/AdaSAP optimizer:
    ``ascent=False`` is a single-pass step with the base optimizer (RST's plain steps);
    ``ascent_loss`` computes the first pass's loss instead of ``compute_loss`` (on a
    sub-batch: that gradient only sets the perturbation's direction); ``looksam_alpha`` set
    makes an ascent step store LookSAM's orthogonal direction and a single-pass step add it.
    ``first_pass`` is the context an ascent's first forward and backward pass run in (DDP's
    ``no_sync``: the ascent gradient stays on each rank); a single-pass step ignores it.
    """
    optimizer.zero_grad(set_to_none=True)
    sharpness_aware = isinstance(optimizer, SAM)
    ascending = sharpness_aware and ascent
    with first_pass if ascending and first_pass is not None else contextlib.nullcontext():
        loss = (ascent_loss or compute_loss)() if ascending else compute_loss()
        _backward(loss, scaler)
    if after_first_backward is not None:
        after_first_backward()
    if ascending and scaler is not None and any_rank(not _finite_gradients(optimizer)):
        # An fp16 overflow gives no direction to ascend: skip the second pass and let the
        # scaler skip this update (it finds the inf) and lower its scale, as a plain step does.
        # Under DDP with a local ascent the overflow may be one rank's: every rank skips
        # alike (the second pass's all-reduce must be everyone's or no one's).
        ascending = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.fill_(float("inf"))
    if ascending:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        plain = gradients(params) if looksam_alpha is not None else None
        optimizer.first_step(zero_grad=True)
        with frozen_bn_statistics(model):
            _backward(compute_loss(), scaler)
        optimizer.restore()
        if plain is not None:
            store_direction(optimizer.state, plain)
    elif sharpness_aware and not ascent and looksam_alpha is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        add_direction(optimizer.state, params, looksam_alpha)
    if sharpness_aware:
        base = optimizer.base_optimizer
        clip = optimizer.max_grad_norm if max_grad_norm is None else max_grad_norm
    else:
        base, clip = optimizer, max_grad_norm
    if scaler is not None:
        scaler.unscale_(base)
    if clip is not None:
        params = [p for g in base.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler is not None:
        scaler.step(base)
        scaler.update()
    else:
        base.step()
    return loss.detach()


def _finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return bool(torch.stack([g.abs().max() for g in grads]).isfinite().all()) if grads else True


def _backward(loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()
