"""Sharpness of a trained model: the worst-case loss increase and the top Hessian eigenvalue.

Both are measured on a fixed list of ``(images, labels)`` batches, with the model in eval mode
(BatchNorm uses its running statistics, so the loss is a fixed function of the weights), and
leave the model's weights, gradients and mode as they were. The loss over the batches is the
mean over all their images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[list[Tensor]]:
    """Eval mode and the trainable parameters; on exit the exact weights and mode are back."""
    was_training = model.training
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    model.eval()
    try:
        yield params
    finally:
        with torch.no_grad():
            for p, old in zip(params, saved, strict=True):
                p.copy_(old)
        model.train(was_training)


def _check(batches: Sequence[Batch]) -> int:
    total = sum(len(y) for _, y in batches)
    if total == 0:
        raise ValueError("sharpness needs at least one non-empty batch")
    return total


def _loss(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, total: int) -> float:
    with torch.no_grad():
        return sum(float(loss_fn(model(x), y)) * len(y) for x, y in batches) / total


def _gradient(
    model: nn.Module, params: list[Tensor], batches: Sequence[Batch], loss_fn: LossFn, total: int
) -> list[Tensor]:
    grads = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        # autograd.grad, not backward(): the model's .grad fields stay untouched
        parts = torch.autograd.grad(loss_fn(model(x), y) * (len(y) / total), params)
        for g, part in zip(grads, parts, strict=True):
            g.add_(part)
    return grads


def worst_case_loss_increase(
    model: nn.Module,
    batches: Sequence[Batch],
    rho: float,
    loss_fn: LossFn = F.cross_entropy,
) -> float:
    """``L(w + e) - L(w)`` at SAM's first-order worst case ``e = rho * g / ||g||``.

    ``g`` is the gradient of the loss over all ``batches`` at the current weights ``w``.
    """
    total = _check(batches)
    with _eval_mode(model) as params:
        before = _loss(model, batches, loss_fn, total)
        grads = _gradient(model, params, batches, loss_fn, total)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(g, alpha=rho / (float(norm) + 1e-12))
        after = _loss(model, batches, loss_fn, total)
    return after - before


def _hessian_vector_product(
    model: nn.Module,
    params: list[Tensor],
    batches: Sequence[Batch],
    vector: list[Tensor],
    loss_fn: LossFn,
    total: int,
) -> list[Tensor]:
    out = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        loss = loss_fn(model(x), y) * (len(y) / total)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
        for h, part in zip(out, torch.autograd.grad(dot, params), strict=True):
            h.add_(part)
    return out


def top_hessian_eigenvalue(
    model: nn.Module,
    batches: Sequence[Batch],
    iterations: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
) -> float:
    """The Hessian eigenvalue of largest magnitude, by power iteration (as PyHessian does).

    Each iteration is one Hessian-vector product by double backpropagation over all
    ``batches``; it stops after ``iterations`` or once the estimate changes by less than
    ``tol`` relative to itself. The start vector comes from ``seed``, so the result is
    deterministic. At a trained minimum the Hessian is nearly positive semi-definite and this
    is its top eigenvalue.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    total = _check(batches)
    with _eval_mode(model) as params:
        generator = torch.Generator().manual_seed(seed)
        vector = [torch.randn(p.shape, generator=generator).to(p) for p in params]
        eigenvalue = None
        for _ in range(iterations):
            norm = torch.sqrt(sum(v.pow(2).sum() for v in vector))
            vector = [v / (norm + 1e-12) for v in vector]
            product = _hessian_vector_product(model, params, batches, vector, loss_fn, total)
            estimate = float(sum((h * v).sum() for h, v in zip(product, vector, strict=True)))
            converged = eigenvalue is not None and abs(estimate - eigenvalue) <= tol * abs(estimate)
            eigenvalue, vector = estimate, product
            if converged:
                break
    return eigenvalue
