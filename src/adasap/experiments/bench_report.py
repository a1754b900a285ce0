"""The benchmark report: Markdown tables of mean +- std over seeds, the differences from
``sgd`` (and adasap's from ``sam``), and the plots (:mod:`adasap.experiments.plots`), from
``<out>/results.jsonl``.

Result folders written by earlier versions are read back as they are: a field a row lacks
counts as not measured.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from scipy import stats

from adasap.deploy.ratio import NOISY_WIDTH
from adasap.errors import UserError
from adasap.experiments.plots import plot_per_corruption, plot_scatter, plot_size, run_label
from adasap.experiments.results import (
    RESULTS_FILE,
    BenchRow,
    read_bench_rows,
    unfinished_failures,
)
from adasap.io import atomic_write_json, atomic_write_text

REPORT_DIR = "report"

# (key, title, kind): kind picks the formatting
ACCURACY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("keep_achieved", "size kept", "ratio"),
    ("clean_accuracy", "clean acc (%)", "pct"),
    ("corruption_accuracy", "corruption acc (%)", "pct"),
    ("extra_accuracy", "extra corruption acc (%)", "pct"),
    ("relative_robustness", "relative robustness", "ratio"),
)
COST_COLUMNS: tuple[tuple[str, str, str], ...] = (
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
DELTA_COLUMNS: tuple[tuple[str, str, str], ...] = (
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


def differences(
    rows: Sequence[BenchRow], baseline: str = BASELINE, methods: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Per-seed differences from ``baseline`` at the same criterion and keep, for ``methods``
    (default: every pruning method but the baseline): ``(mean, std)`` of each delta, and its
    95% t-interval over the paired seeds as ``<key>_interval`` (None with one seed)."""
    by_cell = {(*_key(r), r.seed): r for r in rows}
    out = []
    for (method, criterion, keep), group in _ordered_groups(rows).items():
        if method in ("dense", baseline) or (methods is not None and method not in methods):
            continue
        pairs = [(r, by_cell.get((baseline, criterion, keep, r.seed))) for r in group]
        pairs = [(r, b) for r, b in pairs if b is not None]
        if not pairs:
            continue
        entry: dict[str, Any] = {
            "method": method, "criterion": criterion, "keep": keep, "seeds": len(pairs)
        }  # fmt: skip
        for key, _, _ in DELTA_COLUMNS:
            deltas = [
                getattr(r, key) - getattr(b, key)
                for r, b in pairs
                if None not in (getattr(r, key), getattr(b, key))
            ]
            entry[key] = mean_std(deltas)
            entry[f"{key}_interval"] = paired_interval(deltas)
        out.append(entry)
    return out


def per_corruption_means(
    rows: Sequence[BenchRow],
) -> tuple[float | None, dict[str, dict[str, float]]]:
    """The smallest keep, and at it per (method, criterion): corruption -> mean accuracy over
    the seeds."""
    pruned = [r for r in rows if r.method != "dense" and r.per_corruption]
    keep = min((r.keep for r in pruned), default=None)
    groups: dict[str, list[BenchRow]] = {}
    for r in pruned:
        if r.keep == keep:
            groups.setdefault(run_label(r.method, r.criterion), []).append(r)
    return keep, {
        name: {
            corruption: mean_std(r.per_corruption.get(corruption) for r in group)[0] or 0.0
            for corruption in {c for r in group for c in r.per_corruption}
        }
        for name, group in groups.items()
    }


def format_number(kind: str, value: float, scale: float | None = None) -> str:
    """``value`` formatted for its kind; counts use the unit that suits ``scale`` (the mean)."""
    if kind == "pct":
        return f"{100 * value:.2f}"
    if kind == "count":
        big = (value if scale is None else scale) >= 1e5
        return f"{value / 1e6:.3f}M" if big else f"{value / 1e3:.1f}K"
    if kind == "ms":
        return f"{value:.2f}"
    if kind == "min":
        return f"{value / 60:.1f}"
    if kind == "sharp":
        return f"{value:.3g}"
    return f"{value:.3f}"


def _cell(kind: str, stats: tuple[float | None, float | None]) -> str:
    mean, std = stats
    if mean is None:
        return "-"
    return format_number(kind, mean) + (
        "" if std is None else f" ± {format_number(kind, std, mean)}"
    )


def _noisy(entry: dict[str, Any], key: str) -> str:
    count = entry.get("noisy_latency", 0) if key == "latency_ratio" else 0
    return f" ({count} noisy)" if count else ""


def _table(entries: list[dict[str, Any]], columns: tuple[tuple[str, str, str], ...]) -> list[str]:
    header = ["method", "criterion", "keep", "seeds", *(title for _, title, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        cells = [e["method"], e["criterion"] or "-", f"{e['keep']:g}", str(e["seeds"])]
        cells += [_cell(kind, e[key]) + _noisy(e, key) for key, _, kind in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _differences_table(entries: list[dict[str, Any]]) -> list[str]:
    header = ["method", "criterion", "keep", "seeds"]
    for _, title, _ in DELTA_COLUMNS:
        header += [title, f"{CONFIDENCE:.0%} interval", "resolved"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        cells = [e["method"], e["criterion"] or "-", f"{e['keep']:g}", str(e["seeds"])]
        for key, _, kind in DELTA_COLUMNS:
            interval = e[f"{key}_interval"]
            cells.append(_cell(kind, e[key]))
            if interval is None:
                cells += ["-", "-"]
            else:
                low, high = (format_number(kind, v) for v in interval)
                cells += [f"[{low}, {high}]", "**yes**" if resolved(interval) else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_markdown(rows: Sequence[BenchRow], failures: Sequence[Mapping] = ()) -> str:
    """The benchmark report: accuracy, cost and sharpness, and differences from sgd (and
    adasap's from sam)."""
    summary = summarize(rows)
    seeds = sorted({r.seed for r in rows})
    sources = sorted({r.corruption_source for r in rows if r.corruption_source})
    lines = [
        "# AdaSAP benchmark",
        "",
        f"{len(rows)} runs over seeds {', '.join(map(str, seeds))}. Each cell is mean ± "
        "sample standard deviation over the seeds (no ± with a single seed). `keep` is the "
        "target fraction of the dense size, `size kept` the achieved one.",
        "",
        "## Accuracy and robustness",
        "",
        "Corruption accuracy is the mean over the benchmark corruptions x 5 severities "
        "(15 x 5 with `corruptions: all`); the 4 extra corruptions are averaged separately. "
        "Relative robustness = corruption accuracy / clean accuracy.",
        "",
        *_table(summary, ACCURACY_COLUMNS),
        "",
        "## Size, speed, sharpness and cost",
        "",
        "Latency: median of timed forward passes at batch 1 on the CPU (PyTorch eager). "
        "Latency / dense: a pruned model timed in turns with the dense one, the median of the "
        "per-round ratios; a seed whose 95% interval of that ratio is wider than "
        f"{NOISY_WIDTH:.0%} of it is "
        "too noisy and left out (counted as noisy). "
        "Sharpness on fixed training batches: loss increase at the worst-case perturbation "
        "of radius rho and the top Hessian eigenvalue, of the dense model (before) and of the "
        "pruned model (after). Train time: the dense training or the pruning run.",
        "",
        *_table(summary, COST_COLUMNS),
        "",
        f"## Differences vs {BASELINE} with the same criterion and keep",
        "",
        f"Per seed: method minus {BASELINE}; then mean ± std over the seeds, and the "
        f"{CONFIDENCE:.0%} t-interval of the mean over the paired seeds (mean ± t(n-1) std / "
        "sqrt(n)). **yes**: the interval excludes 0, so the difference is resolved at this "
        "confidence; no interval with one seed.",
        "",
        *_differences_table(differences(rows)),
        "",
    ]
    against_sam = differences(rows, SHARPNESS_BASELINE, methods=("adasap",))
    if against_sam:
        lines += [
            f"## adasap vs {SHARPNESS_BASELINE} with the same criterion and keep",
            "",
            f"As above, with {SHARPNESS_BASELINE} (uniform perturbations, the same extra cost) "
            "as the baseline.",
            "",
            *_differences_table(against_sam),
            "",
        ]
    if sources:
        lines += [f"Corrupted images: {'; '.join(sources)}.", ""]
    if failures:
        lines += ["## Failed runs", ""]
        lines += [f"- {f['run']}: {f['error']}" for f in failures]
        lines.append("")
    lines += [
        "![corruption accuracy vs size](corruption_vs_size.png)",
        "![clean vs corrupted accuracy](clean_vs_corrupted.png)",
        "![per-corruption accuracy](per_corruption.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(out_dir: str | Path) -> Path:
    """``<out>/report/report.md`` and its PNG plots from ``<out>/results.jsonl``."""
    out = Path(out_dir)
    rows = read_bench_rows(out)
    if not rows:
        raise UserError(f"{out / RESULTS_FILE} holds no results: run the benchmark first")
    failed = unfinished_failures(out, {r.cell for r in rows})
    report = out / REPORT_DIR
    summary = summarize(rows)
    plot_size(summary, report / "corruption_vs_size.png")
    plot_scatter(rows, report / "clean_vs_corrupted.png")
    plot_per_corruption(*per_corruption_means(rows), report / "per_corruption.png")
    atomic_write_json(
        report / "summary.json",
        {
            "summary": summary,
            "deltas": differences(rows),
            f"adasap_vs_{SHARPNESS_BASELINE}": differences(rows, SHARPNESS_BASELINE, ("adasap",)),
        },
    )
    atomic_write_text(report / "report.md", report_markdown(rows, failed))
    return report
