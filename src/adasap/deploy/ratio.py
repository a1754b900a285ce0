"""The pruned/dense latency ratio from interleaved timings, and when it is too noisy to trust.

Dense and pruned take turns, one forward pass each (A B A B ...), so round ``i`` gives one
ratio ``pruned_i / dense_i`` of two passes timed a few milliseconds apart: load that comes and
goes over longer spans hits both alike and cancels out of the ratio. The estimate is the median
of these per-round ratios, and its spread a distribution-free confidence interval of that
median: the order statistics of the per-round ratios that bound it with at least 95%
confidence (the binomial interval of a median, which assumes nothing about the shape of the
timing noise).

The ratio is **noisy** (too wide to trust) when that interval is wider than
:data:`NOISY_WIDTH` (20%) of the ratio, that is roughly more than +-10% around it, or when
there are too few rounds for a 95% interval at all (fewer than 6). A pruned model with half
the MACs typically measures 0.6-0.9x of the dense latency; an interval wider than +-10%
cannot tell such a model from one that is no faster, so a table prints "noisy" and the
interval instead of the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

CONFIDENCE = 0.95
# The widest interval, relative to the ratio, that a table still prints as a number.
NOISY_WIDTH = 0.2


def median_ranks(n: int, confidence: float = CONFIDENCE) -> tuple[int, int] | None:
    """1-based ranks ``(k, n + 1 - k)`` of the sorted samples that bound their median with at
    least ``confidence``; None when ``n`` samples are too few for that.

    ``k`` is the largest rank with ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2``: each
    sample falls below the median with probability 1/2, so fewer than ``k`` of them do so
    that rarely. Exact integer arithmetic: the ``2**n`` sign patterns are equally likely.
    """
    tail = Fraction(1 - confidence) / 2 * 2**n
    k, below = 0, 0
    while k < n:
        below += math.comb(n, k)
        if below > tail:
            break
        k += 1
    return None if k == 0 else (k, n + 1 - k)


@dataclass(frozen=True)
class LatencyRatio:
    """Pruned over dense latency: the median per-round ratio, its confidence interval
    ``[low, high]`` and the number of rounds."""

    ratio: float
    low: float
    high: float
    rounds: int

    @classmethod
    def from_times(cls, dense_ms: Sequence[float], pruned_ms: Sequence[float]) -> LatencyRatio:
        """From the times of interleaved rounds: ``dense_ms[i]`` and ``pruned_ms[i]`` ran in
        turn. With too few rounds for an interval, ``[low, high]`` is the whole range."""
        dense, pruned = np.asarray(dense_ms, float), np.asarray(pruned_ms, float)
        if dense.shape != pruned.shape or dense.ndim != 1 or dense.size == 0:
            raise ValueError("need the same number (>= 1) of dense and pruned times")
        if (dense <= 0).any() or (pruned <= 0).any():
            raise ValueError("times must be positive")
        ratios = np.sort(pruned / dense)
        ranks = median_ranks(len(ratios))
        low, high = (1, len(ratios)) if ranks is None else ranks
        return cls(
            float(np.median(ratios)), float(ratios[low - 1]), float(ratios[high - 1]), len(ratios)
        )

    @property
    def noisy(self) -> bool:
        """Too wide to trust: see the module docstring for the rule."""
        return median_ranks(self.rounds) is None or self.high - self.low > NOISY_WIDTH * self.ratio

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "ratio_low": self.low,
            "ratio_high": self.high,
            "rounds": self.rounds,
            "noisy": self.noisy,
        }

    def __str__(self) -> str:
        """``0.87x (0.84-0.90)``, or ``noisy (0.62-1.41x)`` without the untrustworthy ratio."""
        if self.noisy:
            return f"noisy ({self.low:.2f}-{self.high:.2f}x)"
        return f"{self.ratio:.2f}x ({self.low:.2f}-{self.high:.2f})"
