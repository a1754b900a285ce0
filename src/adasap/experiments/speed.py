"""A run's speed and INT8 parts, and models evaluated in a runtime.

- :func:`timed_rows`: the dense model and every pruned one timed in the runtime the run deploys
  to (its ``runtime`` setting), at batch 1 and at the throughput batch
  (:data:`~adasap.experiments.results.SPEED_BATCHES`), taking turns; each
  pruned row gets its MACs ratio, time ratios with their 95% intervals and efficiency (the
  speed table, docs/deployment.md, "Speed in the run table").
- :func:`int8_rows` (``adasap run --int8``): every model quantized to INT8 in ONNX Runtime,
  calibrated on training images, its scores computed by ONNX Runtime on the quantized model
  and its time set against the dense fp32 model in ONNX Runtime.
- :func:`evaluate_in` (``adasap eval --runtime``): one model's scores computed by the model
  deployed to a runtime, so that a quantized model's robustness is its own.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from adasap.deploy.comparison import row_ratio
from adasap.deploy.latency import LatencyRatio, compare_latency
from adasap.deploy.runtimes import DEFAULT_RUNTIME, DeployedModel, get_runtime
from adasap.deploy.serialization import load_model
from adasap.deploy.timing import time_runs
from adasap.distributed import is_main, on_main
from adasap.errors import UserError
from adasap.experiments.config import ExperimentConfig
from adasap.experiments.job import Job
from adasap.experiments.results import SPEED_BATCHES, ResultRow
from adasap.tasks import make_task

# The speed table: each model makes this many timed passes after the warm-up ones, at batch 1
# (about 1 s in all for ResNet-20 on an idle 2-core CPU) and at the throughput batch, whose
# passes take up to 64 times longer (a ResNet-50 at 224 px: about 1 s each on 2 cores)
LATENCY_WARMUP = 10
LATENCY_ROUNDS = 100
THROUGHPUT_ROUNDS = 30
# INT8 rows: quantized by this runtime, timed against the dense model in the fp32 one
INT8_RUNTIME = "ort-int8"
INT8_REFERENCE = "ort"


def speed_runtime(config: ExperimentConfig) -> str:
    """The runtime a run times its models in: its ``runtime``, but PyTorch for a task whose
    ONNX graph takes one image at a time (a detector's)."""
    return config.prune.pruner.runtime if make_task(config.task).onnx_timing else "torch"


def speed_title(config: ExperimentConfig) -> str:
    """The speed table's title: where its times come from."""
    runtime = speed_runtime(config)
    if runtime != config.prune.pruner.runtime:
        return f"Speed in torch, pruned/dense ({config.task} models time in PyTorch)"
    return f"Speed in {runtime}, pruned/dense"


def check_deployable(task: str, runtime: str, fix: str) -> None:
    """Raise unless ``task``'s models can be evaluated in ``runtime``: known, able to run
    here, and given batches of images there (``fix``: what the message tells to do else)."""
    get_runtime(runtime)
    if runtime != "torch" and not make_task(task).onnx_timing:
        raise UserError(
            f"{task} models are evaluated and timed in torch only (their ONNX graph takes one "
            f"image of one size, not {runtime}'s batches): {fix}"
        )


def check_runtimes(config: ExperimentConfig) -> None:
    """Fail before any work when the run's runtime, or INT8 with ``int8``, cannot run here."""
    get_runtime(config.prune.pruner.runtime)
    if config.int8:
        check_deployable(config.task, INT8_RUNTIME, "drop --int8")


def speed_fields(macs_ratio: float | None, times: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A row's speed fields from its ``time_b<N>`` entries (with a ratio for a pruned model)."""
    fields: dict[str, Any] = {"macs_ratio": macs_ratio}
    for batch, entry in times.items():
        fields[f"time_b{batch}"] = entry
        ratio = entry.get("ratio")
        if ratio is not None and macs_ratio is not None:
            fields[f"efficiency_b{batch}"] = macs_ratio / ratio
    return fields


def rounds(batch: int) -> int:
    """The timed passes per model at ``batch`` in the speed table."""
    return LATENCY_ROUNDS if batch == 1 else THROUGHPUT_ROUNDS


def with_speed(
    rows: Sequence[ResultRow], comparison_rows: Sequence[dict[str, Any]]
) -> list[ResultRow]:
    """``rows`` (dense first, then one per pruned model) with their speed fields from the
    rows of :func:`~adasap.deploy.comparison.compare_latency` (one runtime)."""
    dense, *pruned = rows
    entries = {(r["model"], r["batch_size"]): r for r in comparison_rows}
    runtime = comparison_rows[0]["runtime"]
    dense_times = {b: {"ms": entries[pruned[0].method, b]["dense_ms"]} for b in SPEED_BATCHES}
    timed = [replace(dense, runtime=runtime, **speed_fields(1.0, dense_times))]
    for row in pruned:
        times = {}
        for batch in SPEED_BATCHES:
            entry = entries[row.method, batch]
            times[batch] = {"ms": entry["pruned_ms"], **row_ratio(entry).to_dict()}
        timed.append(replace(row, runtime=runtime, **speed_fields(row.macs / dense.macs, times)))
    return timed


def timed_rows(
    rows: list[ResultRow],
    dense: nn.Module,
    run_dir: Path,
    input_shape: tuple[int, ...],
    images: torch.Tensor | None = None,
    runtime: str = DEFAULT_RUNTIME,
) -> list[ResultRow]:
    """``rows`` (dense first, then one per method) with their speed in ``runtime``, on images
    of ``input_shape`` (C, H, W), random unless ``images``.

    The dense model and every pruned one (read back from ``run_dir/<method>``) are timed
    together at each batch size (:func:`~adasap.deploy.comparison.compare_latency`), taking
    turns where the runtime allows it, so that a change in machine load hits them alike; each
    pruned row gets its pruned/dense ratios with their 95% intervals and whether they are too
    wide to trust (:mod:`adasap.deploy.ratio`).
    """
    pruned = {row.method: load_model(run_dir / row.method) for row in rows[1:]}
    comparison_rows = []
    for batch in SPEED_BATCHES:
        comparison = compare_latency(
            dense.cpu(), pruned, input_shape, batch_sizes=(batch,), runtimes=(runtime,),
            warmup=LATENCY_WARMUP, repeats=rounds(batch), images=images,
        )  # fmt: skip
        comparison_rows += comparison.rows
    return with_speed(rows, comparison_rows)


@contextlib.contextmanager
def _workdir(folder: Path) -> Iterator[Path]:
    """Where a deployment writes its files: ``folder`` on rank 0 (they stay, beside the
    model), a temporary folder on the other ranks of a torchrun job."""
    if is_main():
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="adasap-deploy-") as tmp:
        yield Path(tmp)


def _on_cpu(config: ExperimentConfig) -> ExperimentConfig:
    # a deployed model takes and returns CPU tensors (adasap.deploy.runtimes)
    return replace(config, prune=replace(config.prune, device="cpu"))


def evaluate_in(
    runtime: str,
    job: Job,
    model: nn.Module,
    data: Any,
    config: ExperimentConfig,
    model_dir: Path,
    *,
    calibration: torch.Tensor | None = None,
    official: tuple[str, str] | None = None,
    shifted: Any = None,
) -> tuple[ResultRow, DeployedModel]:
    """The row of the model saved in ``model_dir``, its scores computed by ``model`` deployed
    to ``runtime`` (calibrated on ``calibration`` where it quantizes), and the deployed model.

    Its files (the ONNX export, the corruption reports) go to ``model_dir/<runtime>``.
    """
    shape, images = job.timing_inputs(config, data)
    with _workdir(model_dir / runtime) as workdir:
        deployed = get_runtime(runtime).deploy(
            model, shape, task=config.task, workdir=workdir, images=images,
            calibration=calibration,
        )  # fmt: skip
        row = job.evaluate(deployed, data, _on_cpu(config), model_dir, runtime, official, shifted)
    return replace(row, method=model_dir.name, runtime=runtime), deployed


def deployed_times(
    deployed: Sequence[DeployedModel], batch: int, interleaved: bool
) -> list[list[float]]:
    """Per deployed model, the milliseconds of its timed passes at ``batch``: the models take
    turns where ``interleaved``, else one after the other (see :func:`compare_latency`)."""
    runs = [model.runner(batch) for model in deployed]
    return time_runs(runs, LATENCY_WARMUP, rounds(batch), interleaved=interleaved)


def int8_rows(
    job: Job,
    config: ExperimentConfig,
    data: Any,
    rows: Sequence[ResultRow],
    run_dir: Path,
    console: Console,
) -> list[ResultRow]:
    """Each model of ``rows`` (dense first) quantized to INT8: its scores computed by ONNX
    Runtime on the quantized model, its file's size, and its time against the dense fp32 model
    in ONNX Runtime (timed on rank 0). Files: ``<run>/<model>/ort-int8/``."""
    console.print(f"[bold]int8[/bold]: quantizing every model ({INT8_RUNTIME}), evaluating it")
    calibration = job.calibration_images(config, data)
    quantized, deployed = [], []
    for row in rows:
        model_dir = run_dir / row.method
        int8_row, model = evaluate_in(
            INT8_RUNTIME, job, load_model(model_dir), data, config, model_dir,
            calibration=calibration,
        )  # fmt: skip
        size = (model_dir / INT8_RUNTIME / "model.int8.onnx").stat().st_size if is_main() else None
        quantized.append(replace(int8_row, params=row.params, macs=row.macs, file_bytes=size))
        deployed.append(model)
    return on_main(lambda: _int8_speed(quantized, deployed, job, config, data, run_dir))


def _int8_speed(
    rows: list[ResultRow],
    deployed: list[DeployedModel],
    job: Job,
    config: ExperimentConfig,
    data: Any,
    run_dir: Path,
) -> list[ResultRow]:
    shape, images = job.timing_inputs(config, data)
    with tempfile.TemporaryDirectory(prefix="adasap-int8-") as tmp:
        reference = get_runtime(INT8_REFERENCE).deploy(
            load_model(run_dir / rows[0].method), shape, task=config.task, workdir=Path(tmp),
            images=images,
        )  # fmt: skip
        interleaved = get_runtime(INT8_RUNTIME).interleaved
        times: list[dict[int, dict[str, Any]]] = [{} for _ in rows]
        for batch in SPEED_BATCHES:
            dense_ms, *int8_ms = deployed_times([reference, *deployed], batch, interleaved)
            for entries, ms in zip(times, int8_ms, strict=True):
                ratio = LatencyRatio.from_times(dense_ms, ms)
                entries[batch] = {"ms": float(np.median(ms)), **ratio.to_dict()}
    dense_macs = rows[0].macs
    return [
        replace(row, **speed_fields(row.macs / dense_macs, entries))
        for row, entries in zip(rows, times, strict=True)
    ]
