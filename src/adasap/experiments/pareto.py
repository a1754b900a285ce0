"""What each method can buy: clean against corrupted validation accuracy over the swept
settings of one or more sweeps (issue #30), with each method's Pareto front.

A setting is on a method's front when no other setting of that method is at least as good on
both axes and better on one. Validation numbers only, as the sweeps rank them; the folders
must share the sweep's base (dataset, model, schedule, seed), so that their points compare.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from adasap.errors import UserError
from adasap.experiments.plots import plot_pareto
from adasap.experiments.results import PRESET_FILE
from adasap.experiments.sweep import (
    CLEAN_TOLERANCE,
    REFERENCE_METHOD,
    SWEEP_FILES,
    SweepRow,
)
from adasap.io import atomic_write_text, read_json_mapping


def pareto_front(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """The rows no other row beats on clean and corrupted accuracy both, by clean accuracy."""

    def beaten(r: SweepRow) -> bool:
        return any(
            o.val_accuracy >= r.val_accuracy
            and o.corrupted_score >= r.corrupted_score
            and (o.val_accuracy, o.corrupted_score) != (r.val_accuracy, r.corrupted_score)
            for o in rows
        )

    return sorted((r for r in rows if not beaten(r)), key=lambda r: r.val_accuracy)


def sweep_points(folders: Sequence[str | Path]) -> dict[str, list[SweepRow]]:
    """Every finished run of the sweeps in ``folders`` by method; runs of one method at the
    same settings once the base fills in what they do not set (the sgd reference the sweeps
    share, a sweep's run at the default value of the key it varies) count once."""
    if not folders:
        raise UserError("name at least one sweep folder (one that holds sweep.jsonl)")
    bases: dict[str, Path] = {}
    seen: set[str] = set()
    by_method: dict[str, list[SweepRow]] = {}
    for folder in map(Path, folders):
        definition = folder / PRESET_FILE
        if not definition.is_file():
            raise UserError(f"{folder} is not a sweep folder (no {PRESET_FILE}): name one")
        saved = read_json_mapping(definition, "rerun its sweep to rewrite it").get("sweep", {})
        flat = {k: v for k, v in saved.get("base", {}).items() if k != "methods"}
        bases.setdefault(json.dumps(flat, sort_keys=True), folder)
        if len(bases) > 1:
            raise UserError(
                f"{folder} swept from another base than {next(iter(bases.values()))}: their "
                "points do not compare; plot them apart"
            )
        for row in SWEEP_FILES.read(folder):
            key = json.dumps([row.method, {**flat, **row.settings}], sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                by_method.setdefault(row.method, []).append(row)
    if not by_method:
        raise UserError(f"{', '.join(map(str, folders))} hold no finished runs: run them first")
    return by_method


def write_pareto(folders: Sequence[str | Path], path: str | Path) -> tuple[Path, Path]:
    """The plot at ``path`` (PNG) and, beside it (``.md``), each method's front as a table:
    the best trade-off of clean and corrupted accuracy each method reached."""
    by_method = sweep_points(folders)
    fronts = {m: pareto_front(rows) for m, rows in by_method.items()}
    sgd = by_method.get(REFERENCE_METHOD)
    bar = max(r.val_accuracy for r in sgd) - CLEAN_TOLERANCE if sgd else None
    png = Path(path)
    plot_pareto(
        {m: [(r.val_accuracy, r.corrupted_score) for r in rows] for m, rows in by_method.items()},
        {m: [(r.val_accuracy, r.corrupted_score) for r in front] for m, front in fronts.items()},
        bar,
        png,
    )
    lines = [
        "# Clean vs corrupted validation accuracy per method",
        "",
        f"From {', '.join(map(str, folders))}: each method's Pareto front over the swept "
        "settings (validation split; corrupted score = the mean of the held-out cbar and the "
        "extra corruptions' accuracy)."
        + ("" if bar is None else f" The clean bar (best {REFERENCE_METHOD} minus "
           f"{100 * CLEAN_TOLERANCE:.1f} points) is {100 * bar:.2f}%."),
        "",
        "| method | run | val clean acc (%) | val corrupted score (%) |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for method, front in fronts.items():
        lines += [
            f"| {method} | {r.run} | {100 * r.val_accuracy:.2f} | {100 * r.corrupted_score:.2f} |"
            for r in front
        ]
    table = png.with_suffix(".md")
    atomic_write_text(table, "\n".join(lines) + "\n")
    return png, table
