"""Result rows, and the folders of resumable results that the benchmark and the sweep write.

A :class:`ResultRow` is one evaluated model, as result tables show it and ``results.json``
holds it; a :class:`BenchRow` adds what the benchmark grid measures. Rows become dicts only
when written: :meth:`Row.to_dict` and :meth:`Row.from_dict` are the JSON form, and
:meth:`from_dict` reads rows written before a field existed (it is ``None`` there). A grid's
folder (:class:`GridFiles`) holds a JSON line per finished cell and each cell's own run folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from rich.console import Console

from adasap.deploy.latency import machine_info
from adasap.errors import UserError
from adasap.io import atomic_write_json, load_json, parse_json, read_json_mapping, writing
from adasap.method.pruner_settings import EFFORT_SETTINGS
from adasap.method.pruning import ModelSize

RESULTS_FILE = "results.jsonl"
# The batch sizes a run times its models at: latency (1) and throughput; ResultRow's time_b<N>
THROUGHPUT_BATCH = 64
SPEED_BATCHES = (1, THROUGHPUT_BATCH)
RUNS_DIR = "runs"  # <out>/runs/<cell>/: a benchmark cell's models, reports and row
ROW_FILE = "row.json"  # a finished cell's own copy of its line, in its run folder
FAILURES_FILE = "failures.jsonl"
PRESET_FILE = "bench.json"

R = TypeVar("R", bound="Row")


class Row:
    """The JSON form of a row dataclass."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """A row from its JSON form; keys that are not fields (e.g. ``history``) are left out."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(kw_only=True)
class ResultRow(Row):
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
    seconds: float | None = None
    # with keep_kind latency: the pruned model's measured latency against its budget
    latency: dict[str, float] | None = None
    # a pruned model's channel rounding as the pruner resolved it (round_to "auto": what it became)
    round_to: int | None = None
    # Speed in ``runtime`` (adasap.deploy.runtimes) against the dense model in the same session:
    # ``macs_ratio`` is pruned/dense MACs; ``time_b<N>`` is a forward pass at batch N (1, and
    # THROUGHPUT_BATCH): ``ms`` (median), and for a pruned model the pruned/dense ``ratio``
    # (median per-round ratio), its 95% interval ``ratio_low``-``ratio_high``, ``rounds`` and
    # ``noisy`` (the interval too wide to trust: adasap.deploy.ratio); ``efficiency_b<N>`` is
    # macs_ratio / ratio. An INT8 row is timed against the dense fp32 model in ONNX Runtime.
    runtime: str | None = None
    macs_ratio: float | None = None
    time_b1: dict[str, Any] | None = None
    time_b64: dict[str, Any] | None = None
    efficiency_b1: float | None = None
    efficiency_b64: float | None = None
    # an INT8 row: the size of its quantized ONNX file
    file_bytes: int | None = None

    @property
    def times(self) -> dict[int, dict[str, Any]]:
        """The ``time_b<N>`` entries measured, by batch size."""
        entries = {b: getattr(self, f"time_b{b}") for b in SPEED_BATCHES}
        return {b: entry for b, entry in entries.items() if entry}

    def with_cost(self: R, size: ModelSize, **values: Any) -> R:
        """This row with its model's size (params and MACs) and any other field ``values``
        (``seconds=``: its training time)."""
        return replace(self, params=size.params, macs=size.macs, **values)


@dataclass(kw_only=True)
class BenchRow(ResultRow):
    """One cell of the benchmark grid: its identity, the row of its model, and sharpness of the
    dense model (``dense_*``, before pruning) and of this one (after).

    A detection cell's row has the detection meaning of :class:`ResultRow`'s fields, as
    ``adasap run --task detection`` gives them: ``clean_accuracy`` is P (mAP@0.5),
    ``corruption_accuracy`` mPC, ``relative_robustness`` rPC; it measures no sharpness.
    """

    cell: str
    criterion: str | None
    keep: float
    seed: int
    keep_kind: str | None = None
    keep_achieved: float | None = None
    per_corruption: dict[str, float] | None = None
    # batch-1 latency in the cell's runtime (median ms, p10, p90); a pruned model's is timed in
    # turns with the dense one, which gives its pruned/dense ratio, the ratio's 95% interval
    # and whether that interval is too wide to trust (adasap.deploy.ratio)
    latency_ms: float | None = None
    latency_p10_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_ratio: float | None = None
    latency_ratio_low: float | None = None
    latency_ratio_high: float | None = None
    latency_noisy: bool | None = None
    loss_increase: float | None = None
    hessian_eigenvalue: float | None = None
    sharpness_rho: float | None = None
    dense_loss_increase: float | None = None
    dense_hessian_eigenvalue: float | None = None
    cell_seconds: float | None = None
    # torch threads the cell computed with: its numbers are the serial grid's at this count
    threads: int | None = None
    # sha256 of the dense model's weights file: a seed's rows all come from one dense model
    dense_sha256: str | None = None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(parse_json(line))
        except ValueError:
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


@dataclass(frozen=True)
class GridFiles(Generic[R]):
    """Where a grid (the benchmark's, the sweep's) keeps its rows: a line of ``<out>/<results>``
    per finished cell, and the cell's run in ``<out>/<runs>/<cell>/`` with its own copy of its
    row (``row.json``). ``key`` is the row field that names the cell, ``what`` the key of the
    grid's definition in ``bench.json`` (:func:`prepare_out`)."""

    results: str
    runs: str
    row: type[R]
    key: str
    what: str

    def run_dir(self, out: Path, cell: str) -> Path:
        """The folder of a cell: ``<out>/<runs>/<cell>``."""
        return out / self.runs / cell

    def read(self, out: Path) -> list[R]:
        """The finished cells, from the results file."""
        return [self.row.from_dict(record) for record in read_jsonl(out / self.results)]

    def append(self, out: Path, row: R) -> None:
        append_jsonl(out / self.results, row.to_dict())

    def save(self, out: Path, row: R) -> R:
        """Write ``row`` to its cell's ``row.json`` too, so that it outlives the process that
        computed it (:meth:`open`); returns it."""
        atomic_write_json(self.run_dir(out, getattr(row, self.key)) / ROW_FILE, row.to_dict())
        return row

    def open(
        self, out_dir: str | Path, definition: dict[str, Any], cells: Iterable[str]
    ) -> tuple[Path, dict[str, R]]:
        """The folder (absolute: the cells of a cluster run elsewhere, and it must be shared
        with them), created or checked to hold results of ``definition``, and its finished rows
        by cell; rows that ``cells`` saved (:meth:`save`) but that never reached the results
        file (the grid stopped first) join it, in the order of ``cells``."""
        out = prepare_out(out_dir, definition, self.what).resolve()
        done = {getattr(row, self.key): row for row in self.read(out)}
        for cell in cells:
            path = self.run_dir(out, cell) / ROW_FILE
            if cell not in done and path.is_file():
                try:
                    done[cell] = self.row.from_dict(load_json(path))
                except (ValueError, TypeError):
                    continue  # the cell runs again and rewrites it
                self.append(out, done[cell])
        return out, done


BENCH_FILES = GridFiles(RESULTS_FILE, RUNS_DIR, BenchRow, key="cell", what="preset")
# the benchmark's own names for them, as its reports and the detection benchmark use them
cell_dir = BENCH_FILES.run_dir
read_bench_rows = BENCH_FILES.read
save_row = BENCH_FILES.save


# Prose in a preset's or sweep's definition: rewording it (say, "planned" to "ran in 9 h")
# changes no result, so a rerun still continues the folder.
PROSE_KEYS = ("description",)


# Settings added after results were saved, with the value those results ran with (timing in
# PyTorch, exact channel counts, no INT8 rows, no distillation): a saved definition that lacks
# one is the same as one that sets it so, and its folder continues. The EFFORT_SETTINGS are
# no part of a definition at all: they bound the work, not the results.
ADDED_SETTINGS: dict[str, Any] = {
    "round_to": 1,
    "runtime": "torch",
    "int8": False,
    "distill_weight": 0.0,
    "distill_temperature": 4.0,
    "distill_from": "prune",
}


def _results_part(definition: Any) -> Any:
    if not isinstance(definition, dict):
        return definition
    part = {k: v for k, v in definition.items() if k not in PROSE_KEYS}
    for settings in ("base", "resolved"):
        if isinstance(part.get(settings), dict):
            part[settings] = {
                k: v
                for k, v in part[settings].items()
                if k not in EFFORT_SETTINGS and (k not in ADDED_SETTINGS or ADDED_SETTINGS[k] != v)
            }
    return part


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
