"""The benchmark report from ``<out>/results.jsonl``: Markdown tables of the statistics of
:mod:`adasap.experiments.bench_stats` (mean +- std over seeds; the differences from ``sgd``,
adasap's from ``sam``, and by corruption family) and the plots of
:mod:`adasap.experiments.plots`. The detection benchmark's report
(:mod:`adasap.experiments.detection_bench`) is made of the same tables.

Result folders written by earlier versions are read back as they are: a field a row lacks
counts as not measured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adasap.deploy.ratio import NOISY_WIDTH
from adasap.errors import UserError
from adasap.experiments.bench_stats import (
    ACCURACY_COLUMNS,
    BASELINE,
    CONFIDENCE,
    COST_COLUMNS,
    DELTA_COLUMNS,
    SHARPNESS_BASELINE,
    Columns,
    differences,
    family_differences,
    mean_std,
    resolved,
    summarize,
)
from adasap.experiments.plots import plot_per_corruption, plot_scatter, plot_size, run_label
from adasap.experiments.results import (
    RESULTS_FILE,
    BenchRow,
    read_bench_rows,
    unfinished_failures,
)
from adasap.io import atomic_write_json, atomic_write_text

REPORT_DIR = "report"


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


def _markdown_table(
    entries: list[dict[str, Any]], titles: Sequence[str], cells: Callable[[dict], list[str]]
) -> list[str]:
    """One row per (method, criterion, keep) entry: its labels, then ``cells(entry)``."""
    header = ["method", "criterion", "keep", "seeds", *titles]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        labels = [e["method"], e["criterion"] or "-", f"{e['keep']:g}", str(e["seeds"])]
        lines.append("| " + " | ".join(labels + cells(e)) + " |")
    return lines


def _interval_text(kind: str, interval: Sequence[float]) -> str:
    low, high = (format_number(kind, v) for v in interval)
    return f"[{low}, {high}]"


def summary_table(entries: list[dict[str, Any]], columns: Columns) -> list[str]:
    """:func:`~adasap.experiments.bench_stats.summarize` entries: mean ± std of ``columns``."""
    return _markdown_table(
        entries,
        [title for _, title, _ in columns],
        lambda e: [_cell(kind, e[key]) + _noisy(e, key) for key, _, kind in columns],
    )


def _delta_cells(entry: dict[str, Any], columns: Columns) -> list[str]:
    cells = []
    for key, _, kind in columns:
        interval = entry[f"{key}_interval"]
        cells.append(_cell(kind, entry[key]))
        if interval is None:
            cells += ["-", "-"]
        else:
            cells += [_interval_text(kind, interval), "**yes**" if resolved(interval) else "no"]
    return cells


def _differences_table(entries: list[dict[str, Any]], columns: Columns) -> list[str]:
    titles = []
    for _, title, _ in columns:
        titles += [title, f"{CONFIDENCE:.0%} interval", "resolved"]
    return _markdown_table(entries, titles, lambda e: _delta_cells(e, columns))


def differences_section(
    entries: list[dict[str, Any]], columns: Columns = DELTA_COLUMNS
) -> list[str]:
    """The paired differences from sgd (:func:`~adasap.experiments.bench_stats.differences`),
    ``columns`` titling the keys of :data:`~adasap.experiments.bench_stats.DELTA_COLUMNS`."""
    return [
        f"## Differences vs {BASELINE} with the same criterion and keep",
        "",
        f"Per seed: method minus {BASELINE}; then mean ± std over the seeds, and the "
        f"{CONFIDENCE:.0%} t-interval of the mean over the paired seeds (mean ± t(n-1) std / "
        "sqrt(n)). **yes**: the interval excludes 0, so the difference is resolved at this "
        "confidence; no interval with one seed.",
        "",
        *_differences_table(entries, columns),
        "",
    ]


def failures_section(failures: Sequence[Mapping]) -> list[str]:
    """The cells whose last run failed and that have not finished since (none: no section)."""
    if not failures:
        return []
    return ["## Failed runs", "", *(f"- {f['run']}: {f['error']}" for f in failures), ""]


def _family_cell(found: dict[str, Any] | None) -> str:
    if found is None:
        return "-"
    text = format_number("pct", found["delta"][0])
    if found["interval"] is not None:
        text += " " + _interval_text("pct", found["interval"])
    return f"**{text}**" if resolved(found["interval"]) else text


def _family_table(entries: list[dict[str, Any]]) -> list[str]:
    families = list(dict.fromkeys(f for e in entries for f in e["families"]))
    return _markdown_table(
        entries, families, lambda e: [_family_cell(e["families"].get(f)) for f in families]
    )


AGAINST_SAM = f"adasap_vs_{SHARPNESS_BASELINE}"


def report_statistics(rows: Sequence[BenchRow]) -> dict[str, list[dict[str, Any]]]:
    """What the report shows, as written to ``summary.json``: the per-setting ``summary``, the
    ``deltas`` from sgd, adasap's from sam and the ``family_deltas``."""
    return {
        "summary": summarize(rows),
        "deltas": differences(rows),
        AGAINST_SAM: differences(rows, SHARPNESS_BASELINE, ("adasap",)),
        "family_deltas": family_differences(rows),
    }


def report_markdown(
    rows: Sequence[BenchRow],
    failures: Sequence[Mapping] = (),
    statistics: Mapping[str, list[dict[str, Any]]] | None = None,
) -> str:
    """The benchmark report: accuracy, cost and sharpness, and differences from sgd (and
    adasap's from sam). ``statistics``: :func:`report_statistics` of ``rows`` when the caller
    has it already."""
    statistics = report_statistics(rows) if statistics is None else statistics
    summary = statistics["summary"]
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
        *summary_table(summary, ACCURACY_COLUMNS),
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
        *summary_table(summary, COST_COLUMNS),
        "",
        *differences_section(statistics["deltas"]),
    ]
    against_sam = statistics[AGAINST_SAM]
    if against_sam:
        lines += [
            f"## adasap vs {SHARPNESS_BASELINE} with the same criterion and keep",
            "",
            f"As above, with {SHARPNESS_BASELINE} (uniform perturbations, the same extra cost) "
            "as the baseline.",
            "",
            *_differences_table(against_sam, DELTA_COLUMNS),
            "",
        ]
    by_family = statistics["family_deltas"]
    if by_family:
        lines += [
            f"## Where the corruption differences vs {BASELINE} lie, by family",
            "",
            f"Per seed: the method's mean accuracy over a family's corruptions (5 severities "
            f"each) minus {BASELINE}'s; the mean over the seeds and its {CONFIDENCE:.0%} "
            "interval, in points, **bold** where resolved. `extra`: the 4 extra corruptions.",
            "",
            *_family_table(by_family),
            "",
        ]
    if sources:
        lines += [f"Corrupted images: {'; '.join(sources)}.", ""]
    lines += failures_section(failures)
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
    statistics = report_statistics(rows)
    plot_size(statistics["summary"], report / "corruption_vs_size.png")
    plot_scatter(rows, report / "clean_vs_corrupted.png")
    plot_per_corruption(*per_corruption_means(rows), report / "per_corruption.png")
    atomic_write_json(report / "summary.json", statistics)
    atomic_write_text(report / "report.md", report_markdown(rows, failed, statistics))
    return report
