"""Class-balanced subsets and stratified splits, drawn from a seeded generator."""

from __future__ import annotations

import torch
from torch import Tensor


def _class_ranks(labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random permutation of the indices and each permuted sample's rank within its class."""
    perm = torch.randperm(len(labels), generator=generator)
    lab = labels.cpu()[perm]
    order = torch.argsort(lab, stable=True)
    counts = torch.bincount(lab)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(perm)
    ranks[order] = torch.arange(len(lab)) - starts[lab[order]]
    return perm, ranks


def stratified_split(
    labels: Tensor, fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Indices (kept, held out), holding out ``round(fraction * n_c)`` random samples per class."""
    perm, ranks = _class_ranks(labels, generator)
    per_class = torch.round(torch.bincount(labels.cpu()) * fraction).long()
    held = ranks < per_class[labels.cpu()[perm]]
    return perm[~held].sort().values, perm[held].sort().values


def balanced_subset(labels: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Indices of ``k`` samples taken round-robin over classes in a seeded random order."""
    perm, ranks = _class_ranks(labels, generator)
    return perm[torch.argsort(ranks, stable=True)[:k]].sort().values
