"""The benchmark's statistics from its rows: mean +- std over seeds, and the paired per-seed
differences from a baseline with their t-intervals, overall and by corruption family.
:mod:`adasap.experiments.bench_report` formats them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from scipy import stats

from adasap.experiments.results import BenchRow
from adasap.robustness.corruptions import CATEGORIES, EXTRA_CORRUPTIONS

Columns = tuple[tuple[str, str, str], ...]  # (key, title, kind): kind picks the formatting
ACCURACY_COLUMNS: Columns = (
    ("keep_achieved", "size kept", "ratio"),
    ("clean_accuracy", "clean acc (%)", "pct"),
    ("corruption_accuracy", "corruption acc (%)", "pct"),
    ("extra_accuracy", "extra corruption acc (%)", "pct"),
    ("relative_robustness", "relative robustness", "ratio"),
)
COST_COLUMNS: Columns = (
    ("params", "params", "count"),
    ("macs", "MACs", "count"),
    ("latency_ms", "CPU latency b1 (ms)", "ms"),
    ("latency_ratio", "latency / dense", "ratio"),
    ("dense_loss_increase", "loss increase before", "sharp"),
    ("loss_increase", "loss increase after", "sharp"),
    ("dense_hessian_eigenvalue", "top eigenvalue before", "sharp"),
    ("hessian_eigenvalue", "top eigenvalue after", "sharp"),
    ("seconds", "train time (min)", "min"),
)
DELTA_COLUMNS: Columns = (
    ("corruption_accuracy", "corruption acc delta (pts)", "pct"),
    ("clean_accuracy", "clean acc delta (pts)", "pct"),
)
BASELINE = "sgd"
# adasap's claim is also against uniform SAM, the baseline that pays the same extra cost
SHARPNESS_BASELINE = "sam"
CONFIDENCE = 0.95

GroupKey = tuple[str, str | None, float]


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values) of the non-None."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def _key(row: BenchRow) -> GroupKey:
    return row.method, row.criterion, float(row.keep)


def _ordered_groups(rows: Sequence[BenchRow]) -> dict[GroupKey, list[BenchRow]]:
    """Rows grouped by (method, criterion, keep): dense first, then by size, criterion, method."""
    first_seen: dict[Any, int] = {}
    for row in rows:
        first_seen.setdefault(row.method, len(first_seen))
        first_seen.setdefault(("criterion", row.criterion), len(first_seen))
    groups: dict[GroupKey, list[BenchRow]] = {}
    for row in rows:
        groups.setdefault(_key(row), []).append(row)

    def order(key: GroupKey) -> tuple:
        method, criterion, keep = key
        return method != "dense", -keep, first_seen[("criterion", criterion)], first_seen[method]

    return {key: groups[key] for key in sorted(groups, key=order)}


def _value(row: BenchRow, key: str) -> Any:
    """A row's ``key``; a latency ratio too noisy to trust counts as not measured."""
    if key == "latency_ratio" and row.latency_noisy:
        return None
    return getattr(row, key)


def summarize(rows: Sequence[BenchRow]) -> list[dict[str, Any]]:
    """Per (method, criterion, keep): ``seeds``, ``(mean, std)`` of every reported metric, and
    ``noisy_latency``, the seeds whose latency ratio was too noisy to count."""
    keys = {k for k, _, _ in ACCURACY_COLUMNS + COST_COLUMNS}
    return [
        {
            "method": method,
            "criterion": criterion,
            "keep": keep,
            "seeds": len(group),
            **{k: mean_std(_value(r, k) for r in group) for k in sorted(keys)},
            "noisy_latency": sum(bool(r.latency_noisy) for r in group),
        }
        for (method, criterion, keep), group in _ordered_groups(rows).items()
    ]


def paired_interval(
    deltas: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """The t-interval of the mean of paired per-seed differences: mean ± t(n-1) sd / sqrt(n);
    None with fewer than 2 pairs."""
    n = len(deltas)
    if n < 2:
        return None
    mean, sd = statistics.fmean(deltas), statistics.stdev(deltas)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def resolved(interval: Sequence[float] | None) -> bool:
    """Whether a difference's interval excludes 0."""
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def _pairs(
    rows: Sequence[BenchRow], baseline: str, methods: Sequence[str] | None
) -> Iterator[tuple[GroupKey, list[tuple[BenchRow, BenchRow]]]]:
    """Per (method, criterion, keep) but dense and ``baseline`` (only ``methods`` when given):
    its rows paired with the baseline's of the same criterion, keep and seed."""
    by_cell = {(*_key(r), r.seed): r for r in rows}
    for (method, criterion, keep), group in _ordered_groups(rows).items():
        if method in ("dense", baseline) or (methods is not None and method not in methods):
            continue
        pairs = [(r, by_cell.get((baseline, criterion, keep, r.seed))) for r in group]
        present = [(r, b) for r, b in pairs if b is not None]
        if present:
            yield (method, criterion, keep), present


def _paired_delta(
    pairs: Sequence[tuple[BenchRow, BenchRow]], value: Callable[[BenchRow], float | None]
) -> tuple[tuple[float | None, float | None], tuple[float, float] | None]:
    """``(mean, std)`` of the per-seed differences of ``value`` and their t-interval."""
    values = [(value(r), value(b)) for r, b in pairs]
    deltas = [v - b for v, b in values if v is not None and b is not None]
    return mean_std(deltas), paired_interval(deltas)


def differences(
    rows: Sequence[BenchRow], baseline: str = BASELINE, methods: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Per-seed differences from ``baseline`` at the same criterion and keep, for ``methods``
    (default: every pruning method but the baseline): ``(mean, std)`` of each delta, and its
    95% t-interval over the paired seeds as ``<key>_interval`` (None with one seed)."""
    out = []
    for (method, criterion, keep), pairs in _pairs(rows, baseline, methods):
        entry: dict[str, Any] = {
            "method": method, "criterion": criterion, "keep": keep, "seeds": len(pairs)
        }  # fmt: skip
        for key, _, _ in DELTA_COLUMNS:
            entry[key], entry[f"{key}_interval"] = _paired_delta(
                pairs, lambda row, key=key: getattr(row, key)
            )
        out.append(entry)
    return out


def corruption_groups() -> dict[str, tuple[str, ...]]:
    """The benchmark corruptions by family, then the extras as ``extra``."""
    return {**CATEGORIES, "extra": EXTRA_CORRUPTIONS}


def _group_accuracy(row: BenchRow, names: Sequence[str]) -> float | None:
    measured = row.per_corruption or {}
    values = [measured[name] for name in names if name in measured]
    return statistics.fmean(values) if values else None


def family_differences(rows: Sequence[BenchRow], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """Where a difference from ``baseline`` lies: per method, criterion and keep, and per
    corruption family (:func:`corruption_groups`), the per-seed difference of the family's mean
    accuracy, as ``families[family] = {"delta": (mean, std), "interval": ...}``."""
    groups = corruption_groups()
    out = []
    for (method, criterion, keep), pairs in _pairs(rows, baseline, None):
        families = {}
        for family, names in groups.items():
            delta, interval = _paired_delta(pairs, lambda row, n=names: _group_accuracy(row, n))
            if delta[0] is not None:
                families[family] = {"delta": delta, "interval": interval}
        if families:
            out.append(
                {
                    "method": method,
                    "criterion": criterion,
                    "keep": keep,
                    "seeds": len(pairs),
                    "families": families,
                }
            )
    return out
