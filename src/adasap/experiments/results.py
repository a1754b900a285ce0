"""Result rows, and the folders of resumable results that the benchmark and the sweep write.

A :class:`ResultRow` is one evaluated model, as result tables show it and ``results.json``
holds it; a :class:`BenchRow` adds what the benchmark grid measures. Rows become dicts only
when written: :meth:`ResultRow.to_dict` and :meth:`ResultRow.from_dict` are the JSON form, and
:meth:`from_dict` reads rows written before a field existed (it is ``None`` there).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from adasap.deploy.latency import machine_info
from adasap.errors import UserError
from adasap.io import atomic_write_json, read_json_mapping, writing
from adasap.method.pruning import ModelSize

RESULTS_FILE = "results.jsonl"
ROW_FILE = "row.json"  # a finished cell's own copy of its line, in its run folder
FAILURES_FILE = "failures.jsonl"
PRESET_FILE = "bench.json"

Row = TypeVar("Row", bound="ResultRow")


@dataclass(kw_only=True)
class ResultRow:
    """One model: size, clean and corruption accuracy, speed and cost (None: not measured)."""

    method: str
    clean_accuracy: float | None = None
    corruption_accuracy: float | None = None
    extra_accuracy: float | None = None
    relative_robustness: float | None = None
    corruption_source: str | None = None
    # accuracy on a distribution-shifted test folder (ImageNet-V2; adasap eval --imagenet-v2)
    shift_accuracy: float | None = None
    params: int | None = None
    macs: int | None = None
    # batch-1 CPU latency (median ms); a pruned model's is timed in turns with the dense one,
    # which gives its pruned/dense ratio, the ratio's 95% interval and whether that interval
    # is too wide to trust (adasap.deploy.ratio)
    latency_ms: float | None = None
    latency_ratio: float | None = None
    latency_ratio_low: float | None = None
    latency_ratio_high: float | None = None
    latency_noisy: bool | None = None
    seconds: float | None = None
    # with keep_kind latency: the pruned model's measured latency against its budget
    latency: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_cost(self: Row, size: ModelSize, **values: Any) -> Row:
        """This row with its model's size (params and MACs) and any other field ``values``
        (``seconds=``: its training time)."""
        return replace(self, params=size.params, macs=size.macs, **values)

    @classmethod
    def from_dict(cls: type[Row], data: dict[str, Any]) -> Row:
        """A row from its JSON form; keys that are not fields (e.g. ``history``) are left out."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(kw_only=True)
class BenchRow(ResultRow):
    """One cell of the benchmark grid: its identity, the row of its model, and sharpness of the
    dense model (``dense_*``, before pruning) and of this one (after)."""

    cell: str
    criterion: str | None
    keep: float
    seed: int
    keep_kind: str | None = None
    keep_achieved: float | None = None
    per_corruption: dict[str, float] | None = None
    latency_p10_ms: float | None = None
    latency_p90_ms: float | None = None
    loss_increase: float | None = None
    hessian_eigenvalue: float | None = None
    sharpness_rho: float | None = None
    dense_loss_increase: float | None = None
    dense_hessian_eigenvalue: float | None = None
    cell_seconds: float | None = None
    # sha256 of the dense model's weights file: a seed's rows all come from one dense model
    dense_sha256: str | None = None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_jsonl(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Append one record as a line, flushed and fsynced before returning it."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as handle:
            # a crash may have left a partial last line: start on a fresh one
            if handle.tell() > 0:
                with open(path, "rb") as tail:
                    tail.seek(-1, os.SEEK_END)
                    if tail.read(1) != b"\n":
                        handle.write(b"\n")
            handle.write(json.dumps(record, default=str).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
    return record


def read_bench_rows(out: Path) -> list[BenchRow]:
    """The benchmark's finished cells in ``<out>/results.jsonl``."""
    return [BenchRow.from_dict(record) for record in read_jsonl(out / RESULTS_FILE)]


# Prose in a preset's or sweep's definition: rewording it (say, "planned" to "ran in 9 h")
# changes no result, so a rerun still continues the folder.
PROSE_KEYS = ("description",)


def _results_part(definition: Any) -> Any:
    if not isinstance(definition, dict):
        return definition
    return {k: v for k, v in definition.items() if k not in PROSE_KEYS}


def prepare_out(out_dir: str | Path, definition: dict[str, Any], what: str) -> Path:
    """Create ``out_dir``, or check that it holds results of the same definition (its
    description may differ)."""
    out = Path(out_dir)
    path = out / PRESET_FILE
    with writing(out, "choose a writable --out"):
        if out.is_dir() and any(out.iterdir()) and not path.is_file():
            raise UserError(
                f"{out} already holds files that are not adasap {what} results: choose an "
                "empty or new --out (a rerun with the same --out continues a run)"
            )
        out.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        saved = read_json_mapping(path, "restore it, or choose another --out")
        if _results_part(saved.get(what)) != _results_part(definition):
            raise UserError(
                f"{out} holds results of another {what}: choose another --out to keep both"
            )
    else:
        atomic_write_json(
            path, {what: definition, "machine": machine_info("cpu")}, fix="choose a writable --out"
        )
    return out


def report_failure(out: Path, run_id: str, exc: UserError, console: Console) -> None:
    console.print(f"[bold red]{run_id} failed[/bold red]: {exc}; going on with the next run")
    append_jsonl(out / FAILURES_FILE, {"run": run_id, "error": str(exc), "time": time.time()})


def unfinished_failures(out: Path, finished: set[str]) -> list[dict[str, Any]]:
    """The logged failures of runs that have not finished since (last failure of each)."""
    failed = {f["run"]: f for f in read_jsonl(out / FAILURES_FILE) if f["run"] not in finished}
    return list(failed.values())
