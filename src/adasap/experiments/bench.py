"""The benchmark: every (method, criterion) x size x seed from one dense model per seed.

A preset is data: a base flat config (the keys of :data:`adasap.config.SCHEMA`) and a grid.
:func:`run_bench` prunes one grid cell at a time and appends one JSON line per finished cell to
``<out>/results.jsonl``; an interrupted cell resumes from ``<out>/runs/<cell>/``, a finished one
is skipped. Each line holds clean and corruption accuracy, sharpness of the dense model (before
pruning) and of the pruned one (after), size, measured CPU latency and wall time.
:func:`write_report` turns the lines into Markdown tables (mean +- std over seeds) and plots.

:func:`run_sweep` is the tuning sweep that picks defaults: it scores each setting on the
validation split carved from the training data, corrupted with the 4 extra corruptions only,
never on the test set or the 15 benchmark corruptions.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from adasap.data.datasets import DataBundle, batches
from adasap.deploy.latency import machine_info, measure_latency
from adasap.deploy.serialization import load_model
from adasap.errors import UserError
from adasap.experiments.config import from_flat
from adasap.experiments.run import (
    ExperimentConfig,
    as_tensor,
    dense_model,
    evaluate_model,
    load_data,
    pruned_row,
)
from adasap.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cache_root,
    read_json_mapping,
    writing,
)
from adasap.method.pruner import METHODS
from adasap.method.pruning import measure_size
from adasap.robustness.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS
from adasap.robustness.evaluation import evaluate_corruptions
from adasap.robustness.sharpness import top_hessian_eigenvalue, worst_case_loss_increase
from adasap.training.checkpoint import CHECKPOINT_FILE, RunInterrupted
from adasap.training.loop import resolve_device
from adasap.training.pipeline import prune

RESULTS_FILE = "results.jsonl"
FAILURES_FILE = "failures.jsonl"
SWEEP_FILE = "sweep.jsonl"
PRESET_FILE = "bench.json"
REPORT_DIR = "report"

# Throughputs of a 2-core CPU on ResNet-20 at 28 px (images/s), for estimate_seconds().
SGD_RATE, SAM_RATE, EVAL_RATE = 700.0, 380.0, 2000.0
HVP_COST = 3.0  # a Hessian-vector product costs about 3 forward/backward passes (measured)
VAL_FRACTION = 0.1  # load_dataset's default validation split


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Cell:
    """One run of the grid; ``method == "dense"`` is the seed's unpruned reference."""

    method: str
    criterion: str | None
    keep: float
    seed: int

    @property
    def id(self) -> str:
        if self.method == "dense":
            return f"dense-seed{self.seed}"
        return f"{self.method}-{self.criterion}-keep{self.keep:g}-seed{self.seed}"


@dataclass(frozen=True)
class BenchPreset:
    """A benchmark: a base flat config and the grid (method, criterion) x keeps x seeds.

    ``pairs`` lists (method, criterion) combinations, since not every method runs with every
    criterion. Sharpness is measured on ``sharpness_batches`` fixed training batches of
    ``sharpness_batch_size`` images at the base config's ``rho``.
    """

    name: str
    description: str
    base: Mapping[str, Any]
    pairs: tuple[tuple[str, str], ...]
    keeps: tuple[float, ...]
    seeds: tuple[int, ...]
    sharpness_batches: int = 4
    sharpness_batch_size: int = 128
    hessian_iterations: int = 20
    latency_repeats: int = 50

    def with_base(self, **values: Any) -> BenchPreset:
        """The same grid with some base config keys replaced (e.g. fewer epochs)."""
        return replace(self, base={**self.base, **values})

    def cells(self) -> list[Cell]:
        """The grid in run order: seed-major, so one dense model serves a block of cells."""
        return [
            Cell(method, criterion, keep, seed)
            for seed in self.seeds
            for keep in self.keeps
            for method, criterion in self.pairs
        ]

    def config(self, cell: Cell) -> ExperimentConfig:
        values = {**self.base, "seed": cell.seed}
        if cell.method != "dense":
            values.update(methods=[cell.method], criterion=cell.criterion, keep=cell.keep)
        return from_flat(values)

    def identity(self) -> dict[str, Any]:
        """The preset as JSON data, less what does not change results (progress bars).

        ``resolved`` is the base with every default filled in, so that results made under
        other defaults (say, radii before a sweep changed them) are never mixed in.
        """
        data = json.loads(json.dumps(asdict(self)))
        data["base"].pop("progress", None)
        data["resolved"] = from_flat(self.base).to_flat()
        data["resolved"].pop("progress", None)
        return data


SMALL_BASE: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "model": "resnet20",
    "train_limit": 10000,  # 9000 to train, 1000 for validation
    "test_limit": 2000,
    "corruption_limit": 300,
    "corruptions": "all",
    "dense_epochs": 10.0,
    "dense_lr": 0.1,
    "keep_kind": "params",
    "warmup_epochs": 2.0,
    "prune_epochs": 3.0,
    "finetune_epochs": 5.0,
    "prune_steps": 4,
    "batch_size": 128,
    "lr": 0.05,
    # rho, rho_min and rho_max are OptimizerSettings' defaults: the `small` sweep chose them.
}

PRESETS: dict[str, BenchPreset] = {
    "smoke": BenchPreset(
        name="smoke",
        description="Checks that the whole benchmark runs (about a minute on 2 CPU cores): "
        "sklearn digits (8 px), ResNet-20, keep 50%, sgd vs adasap, one seed, 2 corruptions "
        "(gaussian_noise, gaussian_blur) on 100 test images. The numbers mean nothing.",
        base={
            "dataset": "digits",
            "model": "resnet20",
            "train_limit": 1200,
            "test_limit": None,
            "corruption_limit": 100,
            "corruptions": "quick",
            "dense_epochs": 4.0,
            "dense_lr": 0.1,
            "keep_kind": "params",
            "warmup_epochs": 1.0,
            "prune_epochs": 1.0,
            "finetune_epochs": 1.0,
            "prune_steps": 2,
            "batch_size": 64,
            "lr": 0.05,
            "rho": 0.05,
            "rho_min": 0.02,
            "rho_max": 0.2,
        },
        pairs=(("sgd", "magnitude"), ("adasap", "magnitude")),
        keeps=(0.5,),
        seeds=(0,),
        sharpness_batches=2,
        sharpness_batch_size=64,
        hessian_iterations=5,
        latency_repeats=20,
    ),
    "small": BenchPreset(
        name="small",
        description="A CPU-sized comparison (at most 3 hours on 2 cores): Fashion-MNIST "
        "(9000 training images), ResNet-20, keep 80/50/30% of the parameters; sgd, sam and "
        "adasap with magnitude scores, sgd and adasap with Taylor scores; 2 seeds; all "
        "19 corruptions x 5 severities on 300 test images.",
        base=SMALL_BASE,
        pairs=(
            ("sgd", "magnitude"),
            ("sam", "magnitude"),
            ("adasap", "magnitude"),
            ("sgd", "taylor"),
            ("adasap", "taylor"),
        ),
        keeps=(0.8, 0.5, 0.3),
        seeds=(0, 1),
        sharpness_batches=4,
        sharpness_batch_size=64,
    ),
    "paper": BenchPreset(
        name="paper",
        description="The paper's ImageNet setting as far as it is known, for a GPU machine "
        "(days of GPU time; not run on a CPU). ResNet-50 on an ImageFolder tree "
        "(train/ and val/ under data/imagenet: pass another path with with_base(dataset=...)); "
        "keep ~40% and ~20% of the parameters (the paper's 0.40x and 0.20x sizes); magnitude "
        "and Taylor (HALP's BatchNorm form); 90 epochs in all with HALP's recipe (NVlabs/HALP "
        "rn50_imagenet_prune.yaml: lr 1.024 at batch 1024, here scaled to 0.256 at 256, "
        "momentum 0.875, weight decay 3.05e-5, cosine with 8 warm-up epochs, label smoothing "
        "0.1, 30 removal steps). The phase split (5 adaptive warm-up, 5 removal, 80 uniform "
        "SAM fine-tuning) and the radii (SAM's usual ImageNet rho 0.05; AdaSAP 0.02..0.2, the "
        "project defaults) are our choices: the paper's exact values are not confirmed. "
        "Corruptions are rendered on the fly from 5000 validation images, so the numbers are "
        "not comparable with published ImageNet-C ones (use adasap eval with the official "
        "files for those). The dense model is trained for 90 epochs unless a pretrained one "
        "is in the dense cache.",
        base={
            "dataset": "imagefolder:data/imagenet",
            "model": "resnet50",
            "train_limit": None,
            "test_limit": None,
            "corruption_limit": 5000,
            "corruptions": "all",
            "dense_epochs": 90.0,
            "dense_lr": 0.256,
            "keep_kind": "params",
            "warmup_epochs": 5.0,
            "prune_epochs": 5.0,
            "finetune_epochs": 80.0,
            "prune_steps": 30,
            "batch_size": 256,
            "lr": 0.256,
            "momentum": 0.875,
            "weight_decay": 3.0517578125e-05,
            "label_smoothing": 0.1,
            "lr_warmup_epochs": 8.0,
            "taylor_form": "bn",
            "rho": 0.05,
            "rho_min": 0.02,
            "rho_max": 0.2,
            "amp": True,
        },
        pairs=(
            ("sgd", "magnitude"),
            ("sam", "magnitude"),
            ("adasap", "magnitude"),
            ("sgd", "taylor"),
            ("adasap", "taylor"),
        ),
        keeps=(0.4, 0.2),
        seeds=(0,),
        sharpness_batches=4,
        sharpness_batch_size=64,
    ),
}


def estimate_seconds(
    preset: BenchPreset,
    train_images: int | None = None,
    *,
    sgd_rate: float = SGD_RATE,
    sam_rate: float = SAM_RATE,
    eval_rate: float = EVAL_RATE,
) -> float:
    """A planning estimate of the whole preset's wall time from images/s throughputs.

    Counts dense training, every pruning run (a sharpness-aware phase at ``sam_rate``),
    validation every epoch, clean and corrupted test images, and the sharpness probes. It
    ignores that pruned models train faster and the one-off rendering of corruptions.
    ``train_images`` defaults to the training part of ``train_limit``.
    """
    config = preset.config(preset.cells()[0])
    limit = config.train_limit
    if train_images is None:
        if limit is None:
            raise UserError(f"preset {preset.name} has no train_limit: pass train_images")
        train_images = round(limit * (1 - VAL_FRACTION))
    val_images = train_images * VAL_FRACTION / (1 - VAL_FRACTION)
    per_corruption = {"all": len(CORRUPTIONS), "quick": 2, "none": 0}[config.corruptions]
    eval_images = (config.test_limit or 10000) + (
        (config.corruption_limit or config.test_limit or 10000) * per_corruption * 5
    )
    probe = preset.sharpness_batches * preset.sharpness_batch_size
    sharpness = probe * (3 + HVP_COST * preset.hessian_iterations) / sgd_rate
    per_model = eval_images / eval_rate + sharpness
    s = config.prune
    phases = (s.warmup_epochs + s.prune_epochs, s.finetune_epochs)
    total = 0.0
    for seed in preset.seeds:
        total += config.dense_epochs * (train_images / sgd_rate + val_images / eval_rate)
        total += per_model
        for cell in (c for c in preset.cells() if c.seed == seed):
            for kind, epochs in zip(METHODS[cell.method], phases, strict=True):
                rate = sgd_rate if kind == "sgd" else sam_rate
                total += epochs * (train_images / rate + val_images / eval_rate)
            total += per_model
    return total


# --------------------------------------------------------------------------- files


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


def _prepare_out(out_dir: str | Path, definition: dict[str, Any], what: str) -> Path:
    """Create ``out_dir``, or check that it holds results of the same definition."""
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
        if saved.get(what) != definition:
            raise UserError(
                f"{out} holds results of another {what}: choose another --out to keep both"
            )
    else:
        atomic_write_json(
            path, {what: definition, "machine": machine_info("cpu")}, fix="choose a writable --out"
        )
    return out


def _report_failure(out: Path, run_id: str, exc: UserError, console: Console) -> None:
    console.print(f"[bold red]{run_id} failed[/bold red]: {exc}; going on with the next run")
    append_jsonl(out / FAILURES_FILE, {"run": run_id, "error": str(exc), "time": time.time()})


# --------------------------------------------------------------------------- measurements


def probe_batches(
    data: DataBundle, count: int, batch_size: int, seed: int, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """A fixed set of training batches (seeded, no augmentation) for the sharpness metrics."""
    stream = batches(
        data.train,
        batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        device=device,
    )
    return list(itertools.islice(stream, count))


def _per_corruption(directory: Path) -> dict[str, float] | None:
    path = directory / "corruptions.json"
    return json.loads(path.read_text())["per_corruption"] if path.is_file() else None


@dataclass
class _Seed:
    """What the cells of one seed share: its data, dense model and sharpness batches."""

    preset: BenchPreset
    out: Path
    data: DataBundle
    dense: nn.Module
    probe: list[tuple[Tensor, Tensor]]
    console: Console

    def measure(self, model: nn.Module, config: ExperimentConfig) -> dict[str, Any]:
        """Sharpness on the probe batches and CPU latency at batch 1."""
        spec = self.data.spec
        model.to(self.probe[0][0].device)
        latency = measure_latency(
            model,
            (spec.channels, spec.image_size, spec.image_size),
            batch_sizes=(1,),
            repeats=self.preset.latency_repeats,
        )[0]
        rho = config.prune.optimizer.rho
        return {
            "loss_increase": worst_case_loss_increase(model, self.probe, rho),
            "hessian_eigenvalue": top_hessian_eigenvalue(
                model, self.probe, iterations=self.preset.hessian_iterations
            ),
            "sharpness_rho": rho,
            "latency_ms": latency.median_ms,
            "latency_p10_ms": latency.p10_ms,
            "latency_p90_ms": latency.p90_ms,
        }

    def dense_row(self, cell: Cell, config: ExperimentConfig, info: dict) -> dict[str, Any]:
        start = time.perf_counter()
        row = evaluate_model(self.dense, self.data, config, self.out / "runs", cell.id)
        measured = self.measure(self.dense, config)
        size = measure_size(self.dense.cpu(), self.probe[0][0][:1].cpu())
        return {
            "cell": cell.id,
            "method": "dense",
            "criterion": None,
            "keep": 1.0,
            "seed": cell.seed,
            "keep_kind": config.prune.keep_kind,
            "keep_achieved": 1.0,
            **row,
            "per_corruption": _per_corruption(self.out / "runs" / cell.id),
            "params": size.params,
            "macs": size.macs,
            **measured,
            # before = after for the unpruned model, so every row has both columns
            "dense_loss_increase": measured["loss_increase"],
            "dense_hessian_eigenvalue": measured["hessian_eigenvalue"],
            "seconds": info.get("seconds"),
            "cell_seconds": time.perf_counter() - start,
        }

    def pruned_row(
        self, cell: Cell, config: ExperimentConfig, dense_row: dict[str, Any]
    ) -> dict[str, Any]:
        """Prune (or resume, or reuse a finished run's summary), then evaluate and measure."""
        start = time.perf_counter()
        run_dir = self.out / "runs" / cell.id
        row = pruned_row(cell.method, self.dense, self.data, config, run_dir, self.console)
        model = load_model(run_dir / cell.method)
        kind = config.prune.keep_kind
        return {
            "cell": cell.id,
            "method": cell.method,
            "criterion": cell.criterion,
            "keep": cell.keep,
            "seed": cell.seed,
            "keep_kind": kind,
            "keep_achieved": row[kind] / dense_row[kind],
            **{k: v for k, v in row.items() if k != "method"},
            "per_corruption": _per_corruption(run_dir / cell.method),
            **self.measure(model, config),
            "dense_loss_increase": dense_row["loss_increase"],
            "dense_hessian_eigenvalue": dense_row["hessian_eigenvalue"],
            "cell_seconds": time.perf_counter() - start,
        }


def _resolve_preset(preset: str | BenchPreset) -> BenchPreset:
    if isinstance(preset, BenchPreset):
        return preset
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _run_seed(
    preset: BenchPreset,
    seed: int,
    cells: list[Cell],
    configs: dict[str, ExperimentConfig],
    done: dict[str, dict[str, Any]],
    out: Path,
    console: Console,
) -> None:
    """The dense reference and the unfinished cells of one seed; ``done`` gains their rows."""
    reference = Cell("dense", None, 1.0, seed)
    todo = [c for c in cells if c.id not in done]
    if reference.id in done and not todo:
        return
    config = preset.config(reference)
    data = load_data(config)
    dense, info = dense_model(config, data, console)
    device = resolve_device(config.prune.device)
    probe = probe_batches(data, preset.sharpness_batches, preset.sharpness_batch_size, seed, device)
    shared = _Seed(preset, out, data, dense, probe, console)
    results = out / RESULTS_FILE
    if reference.id not in done:
        console.print(f"[bold]{reference.id}[/bold]: evaluating the dense model")
        done[reference.id] = append_jsonl(results, shared.dense_row(reference, config, info))
    for cell in todo:
        try:
            row = shared.pruned_row(cell, configs[cell.id], done[reference.id])
        except UserError as exc:
            _report_failure(out, cell.id, exc, console)
            continue
        done[cell.id] = append_jsonl(results, row)
        console.print(
            f"[bold]{cell.id}[/bold]: clean {row['clean_accuracy']:.2%}, "
            f"size {row['keep_achieved']:.2f} of the dense {row['keep_kind']}"
        )


def run_bench(
    preset_or_config: str | BenchPreset, out_dir: str | Path, *, console: Console | None = None
) -> Path:
    """Run every cell of a preset not yet in ``<out>/results.jsonl``, then write the report.

    Every cell's config is validated before any work. A cell that fails with a
    :class:`UserError` (e.g. a diverged run) is reported, logged to ``failures.jsonl`` and
    skipped; it is tried again by the next run. Returns ``out_dir``.
    """
    console = console or Console()
    preset = _resolve_preset(preset_or_config)
    cells = preset.cells()
    if not cells:
        raise UserError(f"preset {preset.name} has an empty grid: give pairs, keeps and seeds")
    configs = {cell.id: preset.config(cell) for cell in cells}
    out = _prepare_out(out_dir, preset.identity(), "preset")
    results = out / RESULTS_FILE
    done = {row["cell"]: row for row in read_jsonl(results)}
    try:
        for seed in preset.seeds:
            _run_seed(
                preset, seed, [c for c in cells if c.seed == seed], configs, done, out, console
            )
    except RunInterrupted as exc:
        exc.run_dir = out
        raise
    report = write_report(out)
    console.print(f"benchmark report: {report / 'report.md'}")
    return out


# --------------------------------------------------------------------------- report

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

GroupKey = tuple[str, str | None, float]


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values) of the non-None."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def _key(row: Mapping[str, Any]) -> GroupKey:
    return row["method"], row.get("criterion"), float(row["keep"])


def _ordered_groups(rows: Sequence[Mapping[str, Any]]) -> dict[GroupKey, list[Mapping]]:
    """Rows grouped by (method, criterion, keep): dense first, then by size, criterion, method."""
    first_seen: dict[Any, int] = {}
    for row in rows:
        first_seen.setdefault(row["method"], len(first_seen))
        first_seen.setdefault(("criterion", row.get("criterion")), len(first_seen))
    groups: dict[GroupKey, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(_key(row), []).append(row)

    def order(key: GroupKey) -> tuple:
        method, criterion, keep = key
        return method != "dense", -keep, first_seen[("criterion", criterion)], first_seen[method]

    return {key: groups[key] for key in sorted(groups, key=order)}


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, criterion, keep): ``seeds`` and ``(mean, std)`` of every reported metric."""
    keys = {k for k, _, _ in ACCURACY_COLUMNS + COST_COLUMNS}
    return [
        {
            "method": method,
            "criterion": criterion,
            "keep": keep,
            "seeds": len(group),
            **{k: mean_std(r.get(k) for r in group) for k in sorted(keys)},
        }
        for (method, criterion, keep), group in _ordered_groups(rows).items()
    ]


def differences(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-seed differences from ``sgd`` at the same criterion and keep, as (mean, std)."""
    by_cell = {(*_key(r), r["seed"]): r for r in rows}
    out = []
    for (method, criterion, keep), group in _ordered_groups(rows).items():
        if method in ("dense", BASELINE):
            continue
        pairs = [(r, by_cell.get((BASELINE, criterion, keep, r["seed"]))) for r in group]
        pairs = [(r, b) for r, b in pairs if b is not None]
        if not pairs:
            continue
        deltas = {
            key: mean_std(r[key] - b[key] for r, b in pairs if None not in (r.get(key), b.get(key)))
            for key, _, _ in DELTA_COLUMNS
        }
        out.append(
            {"method": method, "criterion": criterion, "keep": keep, "seeds": len(pairs), **deltas}
        )
    return out


def _number(kind: str, value: float, scale: float | None = None) -> str:
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
    return _number(kind, mean) + ("" if std is None else f" ± {_number(kind, std, mean)}")


def _table(entries: list[dict[str, Any]], columns: tuple[tuple[str, str, str], ...]) -> list[str]:
    header = ["method", "criterion", "keep", "seeds", *(title for _, title, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        cells = [e["method"], e["criterion"] or "-", f"{e['keep']:g}", str(e["seeds"])]
        cells += [_cell(kind, e[key]) for key, _, kind in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_markdown(rows: Sequence[Mapping[str, Any]], failures: Sequence[Mapping] = ()) -> str:
    """The benchmark report: accuracy, cost and sharpness, and differences from sgd."""
    summary = summarize(rows)
    seeds = sorted({r["seed"] for r in rows})
    sources = sorted({r["corruption_source"] for r in rows if r.get("corruption_source")})
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
        "Sharpness on fixed training batches: loss increase at the worst-case perturbation "
        "of radius rho and the top Hessian eigenvalue, of the dense model (before) and of the "
        "pruned model (after). Train time: the dense training or the pruning run.",
        "",
        *_table(summary, COST_COLUMNS),
        "",
        f"## Differences vs {BASELINE} with the same criterion and keep",
        "",
        f"Per seed: method minus {BASELINE}; then mean ± std over the seeds.",
        "",
        *_table(differences(rows), DELTA_COLUMNS),
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


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def _label(method: str, criterion: str | None) -> str:
    return method if criterion is None else f"{method} ({criterion})"


def _plot_size(summary: list[dict[str, Any]], path: Path) -> None:
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    lines: dict[tuple[str, str | None], list[dict]] = {}
    for e in summary:
        if e["corruption_accuracy"][0] is not None:
            lines.setdefault((e["method"], e["criterion"]), []).append(e)
    for (method, criterion), entries in lines.items():
        entries.sort(key=lambda e: e["params"][0])
        ax.errorbar(
            [e["params"][0] / 1e6 for e in entries],
            [100 * e["corruption_accuracy"][0] for e in entries],
            yerr=[100 * (e["corruption_accuracy"][1] or 0) for e in entries],
            marker="*" if method == "dense" else "o",
            markersize=12 if method == "dense" else 6,
            capsize=3,
            label=_label(method, criterion),
        )
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("corruption accuracy (%)")
    ax.set_title("Corruption accuracy vs model size (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_png(fig, path)


def _plot_scatter(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    markers = {}
    points: dict[str, list[Mapping]] = {}
    for row in rows:
        if row.get("corruption_accuracy") is not None:
            points.setdefault(_label(row["method"], row.get("criterion")), []).append(row)
    for label, group in points.items():
        marker = markers.setdefault(group[0].get("criterion"), "os^Dv*"[len(markers) % 6])
        ax.scatter(
            [100 * r["clean_accuracy"] for r in group],
            [100 * r["corruption_accuracy"] for r in group],
            marker=marker,
            label=label,
            alpha=0.8,
        )
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("corruption accuracy (%)")
    ax.set_title("Clean vs corrupted accuracy (one point per run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_png(fig, path)


def _plot_per_corruption(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Bars per corruption for each (method, criterion) at the smallest keep, mean over seeds."""
    pruned = [r for r in rows if r["method"] != "dense" and r.get("per_corruption")]
    keep = min((r["keep"] for r in pruned), default=None)
    fig = _figure(11.0, 4.5)
    ax = fig.add_subplot()
    if keep is not None:
        groups: dict[str, list[Mapping]] = {}
        for r in pruned:
            if r["keep"] == keep:
                groups.setdefault(_label(r["method"], r.get("criterion")), []).append(r)
        names = [n for n in CORRUPTIONS if any(n in r["per_corruption"] for r in pruned)]
        width = 0.8 / len(groups)
        for i, (label, group) in enumerate(groups.items()):
            heights = [
                100 * (mean_std(r["per_corruption"].get(n) for r in group)[0] or 0) for n in names
            ]
            ax.bar([j + i * width for j in range(len(names))], heights, width, label=label)
        ticks = [n + " (extra)" if n in EXTRA_CORRUPTIONS else n for n in names]
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(names))], ticks, rotation=60, ha="right"
        )
        ax.set_title(f"Accuracy per corruption (mean of 5 severities) at keep {keep:g}")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    _save_png(fig, path)


def write_report(out_dir: str | Path) -> Path:
    """``<out>/report/report.md`` and its PNG plots from ``<out>/results.jsonl``."""
    out = Path(out_dir)
    rows = read_jsonl(out / RESULTS_FILE)
    if not rows:
        raise UserError(f"{out / RESULTS_FILE} holds no results: run the benchmark first")
    finished = {r["cell"] for r in rows}
    failed = {f["run"]: f for f in read_jsonl(out / FAILURES_FILE) if f["run"] not in finished}
    report = out / REPORT_DIR
    summary = summarize(rows)
    _plot_size(summary, report / "corruption_vs_size.png")
    _plot_scatter(rows, report / "clean_vs_corrupted.png")
    _plot_per_corruption(rows, report / "per_corruption.png")
    atomic_write_json(report / "summary.json", {"summary": summary, "deltas": differences(rows)})
    atomic_write_text(report / "report.md", report_markdown(rows, list(failed.values())))
    return report


# --------------------------------------------------------------------------- tuning sweep


@dataclass(frozen=True)
class SweepPreset:
    """A tuning sweep: a base flat config and grids whose cartesian products are run."""

    name: str
    description: str
    base: Mapping[str, Any]
    grid: tuple[Mapping[str, Sequence[Any]], ...]


SWEEP_PRESETS: dict[str, SweepPreset] = {
    "small": SweepPreset(
        name="small",
        description="Defaults for small images (about 50 minutes on 2 CPU cores): the small "
        "benchmark's setting at keep 50% with magnitude scores and seed 0; AdaSAP's radii "
        "rho_max x rho_min (8 runs), then the uniform radius rho of SAM, which is also "
        "AdaSAP's phase 3 (3 runs). Scored on the 1000 validation images with the 4 extra "
        "corruptions.",
        base={**SMALL_BASE, "keep": 0.5, "criterion": "magnitude", "seed": 0},
        grid=(
            {"methods": [["adasap"]], "rho_max": [0.1, 0.2, 0.5, 1.0], "rho_min": [0.01, 0.05]},
            {"methods": [["sam"]], "rho": [0.02, 0.05, 0.1]},
        ),
    ),
    "small-schedule": SweepPreset(
        name="small-schedule",
        description="AdaSAP's other choices at the radii the `small` sweep chose (about 40 "
        "minutes on 2 CPU cores): the defaults and sgd for reference; per-neuron instead of "
        "global perturbation normalisation; per-layer radii; max or no score normalisation; "
        "radii refreshed every step or every 50; the 10 epochs split 1/2/7 or 4/3/3 instead "
        "of 2/3/5. Same base and scoring as `small`.",
        base={**SMALL_BASE, "keep": 0.5, "criterion": "magnitude", "seed": 0},
        grid=(
            {"methods": [["adasap", "sgd"]]},
            {"methods": [["adasap"]], "normalization": ["neuron"]},
            {"methods": [["adasap"]], "per_layer_radii": [True]},
            {"methods": [["adasap"]], "score_normalization": ["max", "none"]},
            {"methods": [["adasap"]], "score_refresh": [1, 50]},
            {
                "methods": [["adasap"]],
                "warmup_epochs": [1.0],
                "prune_epochs": [2.0],
                "finetune_epochs": [7.0],
            },
            {
                "methods": [["adasap"]],
                "warmup_epochs": [4.0],
                "prune_epochs": [3.0],
                "finetune_epochs": [3.0],
            },
        ),
    ),
}


def sweep_settings(
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]],
) -> list[dict[str, Any]]:
    """Every combination of one grid, or of each grid in a list, in order."""
    grids = [grid] if isinstance(grid, Mapping) else list(grid)
    combos = []
    for g in grids:
        keys = list(g)
        combos += [
            dict(zip(keys, values, strict=True)) for values in itertools.product(*g.values())
        ]
    return combos


def _sweep_id(method: str, settings: Mapping[str, Any]) -> str:
    return "-".join([method, *(f"{k}={v}" for k, v in settings.items() if k != "methods")])


def _sweep_row(
    run_id: str,
    method: str,
    settings: dict[str, Any],
    config: ExperimentConfig,
    data: DataBundle,
    out: Path,
    console: Console,
) -> dict[str, Any]:
    """Prune, then score on the validation split with the extra corruptions only."""
    run_dir = out / "sweep_runs" / run_id
    dense, _ = dense_model(config, data, console)
    console.print(f"[bold]{run_id}[/bold]: pruning")
    result = prune(dense, data, replace(config.prune, method=method), checkpoint_dir=run_dir)
    device = resolve_device(config.prune.device)
    report = evaluate_corruptions(
        result.model.to(device),
        as_tensor(data.val),
        data.val.labels,
        dataset_key=f"{config.dataset}-val{len(data.val)}",
        corruptions=EXTRA_CORRUPTIONS,
        device=device,
        seed=config.prune.seed,
        cache_dir=cache_root(config.cache_dir) / "corruptions",
        progress=config.prune.progress,
    )
    report.save(run_dir)
    kind = config.prune.keep_kind
    return {
        "run": run_id,
        "method": method,
        "settings": {k: v for k, v in settings.items() if k != "methods"},
        "val_accuracy": report.clean_accuracy,
        "val_extra_accuracy": report.extra_accuracy,
        "val_images": len(data.val),
        "per_corruption": report.per_corruption,
        "params": result.size.params,
        "keep_achieved": result.keep_fraction(kind),
        "seconds": result.seconds,
    }


def run_sweep(
    base_config: ExperimentConfig | Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]],
    out_dir: str | Path,
    *,
    console: Console | None = None,
) -> Path:
    """Prune with every combination of ``grid`` (flat config keys -> values) over the base.

    Each combination runs every method of its config's ``methods``. Scores come from the
    validation split only (clean and the 4 extra corruptions); the test set is never read.
    Finished runs are lines of ``<out>/sweep.jsonl`` and are skipped; an interrupted one
    resumes from ``<out>/sweep_runs/<run>/``. Writes ``sweep.md`` and returns ``out_dir``.
    """
    console = console or Console()
    base = base_config if isinstance(base_config, ExperimentConfig) else from_flat(base_config)
    runs = [
        (_sweep_id(method, settings), method, settings, config)
        for settings in sweep_settings(grid)
        for config in [from_flat(settings, base)]
        for method in config.methods
    ]
    if not runs:
        raise UserError("the sweep grid is empty: give each key at least one value")
    flat = {k: v for k, v in base.to_flat().items() if k != "progress"}
    definition = {"base": flat, "runs": [r[0] for r in runs]}
    out = _prepare_out(out_dir, json.loads(json.dumps(definition, default=str)), "sweep")
    path = out / SWEEP_FILE
    done = {row["run"] for row in read_jsonl(path)}
    datasets: dict[tuple, DataBundle] = {}
    for run_id, method, settings, config in runs:
        if run_id in done:
            continue
        key = (config.dataset, config.data_dir, config.prune.seed, config.train_limit)
        if key not in datasets:
            datasets[key] = load_data(config)
        try:
            row = _sweep_row(run_id, method, settings, config, datasets[key], out, console)
        except UserError as exc:
            _report_failure(out, run_id, exc, console)
            continue
        except RunInterrupted as exc:
            exc.run_dir = out
            raise
        append_jsonl(path, row)
        (out / "sweep_runs" / run_id / CHECKPOINT_FILE).unlink(missing_ok=True)
    report = sweep_report(out)
    console.print(f"sweep report: {report}")
    return out


def sweep_report(out_dir: str | Path) -> Path:
    """``<out>/sweep.md``: the sweep's runs, best validation extra-corruption accuracy first."""
    out = Path(out_dir)
    rows = read_jsonl(out / SWEEP_FILE)
    if not rows:
        raise UserError(f"{out / SWEEP_FILE} holds no results: run the sweep first")
    rows.sort(key=lambda r: (-(r["val_extra_accuracy"] or 0), -r["val_accuracy"]))
    keys = list(dict.fromkeys(k for r in rows for k in r["settings"]))
    header = ["rank", "method", *keys, "val extra corruption acc (%)", "val clean acc (%)",
              "size kept", "train time (min)"]  # fmt: skip
    lines = [
        "# Tuning sweep",
        "",
        f"Scored on the validation split ({rows[0]['val_images']} images carved from the "
        f"training data), corrupted with the 4 extra corruptions ({', '.join(EXTRA_CORRUPTIONS)}) "
        "x 5 severities; the test set and the 15 benchmark corruptions are never used.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for rank, r in enumerate(rows, 1):
        cells = [str(rank), r["method"], *(str(r["settings"].get(k, "-")) for k in keys)]
        cells += [
            _number("pct", r["val_extra_accuracy"] or 0),
            _number("pct", r["val_accuracy"]),
            f"{r['keep_achieved']:.3f}",
            _number("min", r["seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    finished = {r["run"] for r in rows}
    failed = {f["run"]: f for f in read_jsonl(out / FAILURES_FILE) if f["run"] not in finished}
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {f['run']}: {f['error']}" for f in failed.values()]
    return atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
