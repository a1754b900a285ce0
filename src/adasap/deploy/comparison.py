"""Dense beside pruned: latency medians, the pruned/dense ratio and whether it can be trusted.

The models are timed in each runtime asked for (:mod:`adasap.deploy.runtimes`), taking turns
at each repeat where the runtime allows (PyTorch), and each pruned model's ratio to the dense
one comes from the rounds, one pair of passes at a time
(:class:`~adasap.deploy.ratio.LatencyRatio`), with a confidence interval that says when the
machine was too busy to trust it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from torch import Tensor, nn

from adasap.deploy.onnx import find_models, onnx_runs_on
from adasap.deploy.ratio import NOISY_WIDTH, LatencyRatio
from adasap.deploy.runtimes import DEFAULT_RUNTIME
from adasap.deploy.serialization import DENSE, load_model, read_description, saved_task
from adasap.deploy.timing import LatencyResult, machine_info, model_times
from adasap.devices import resolve_device
from adasap.errors import UserError
from adasap.tasks import make_task


def row_ratio(row: Mapping[str, Any]) -> LatencyRatio:
    """The :class:`LatencyRatio` of a :func:`compare_latency` row."""
    return LatencyRatio(row["ratio"], row["ratio_low"], row["ratio_high"], row["rounds"])


@dataclass
class LatencyComparison:
    """Dense beside pruned latency, one row per (pruned model, runtime, batch size).

    A row holds both medians with p10/p90 (``dense_ms``, ``pruned_ms``, ...), the pruned/dense
    ``ratio`` (median per-round ratio) with its 95% interval ``ratio_low``-``ratio_high``,
    ``rounds``, ``noisy`` (the interval is too wide to trust) and ``speedup`` = 1 / ratio.
    """

    rows: list[dict[str, Any]]
    machine: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "rows": self.rows}

    def table(self, title: str = "Inference latency, dense vs pruned") -> Table:
        where = self.machine["device"]
        if where == "cpu":
            where = f"{self.machine['cpu']}, {self.machine['threads']} threads"
        table = Table(title=f"{title} ({where})")
        columns = ("model", "runtime", "batch", "dense ms", "pruned ms", "pruned/dense", "img/s")
        for column in columns:
            table.add_column(column, justify="left" if column in ("model", "runtime") else "right")
        for r in self.rows:
            table.add_row(
                r["model"],
                r["runtime"],
                str(r["batch_size"]),
                f"{r['dense_ms']:.2f} ({r['dense_p10_ms']:.2f}-{r['dense_p90_ms']:.2f})",
                f"{r['pruned_ms']:.2f} ({r['pruned_p10_ms']:.2f}-{r['pruned_p90_ms']:.2f})",
                str(row_ratio(r)),
                f"{r['pruned_images_per_second']:,.0f}",
            )
        table.caption = (
            "median (p10-p90) per forward pass; pruned/dense: median of the per-round ratios "
            f"(95% interval), 'noisy' when the interval is wider than {NOISY_WIDTH:.0%} of the "
            "ratio; img/s of the pruned model"
        )
        return table


def compare_latency(
    dense: nn.Module,
    pruned: nn.Module | Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    runtimes: Sequence[str] = (DEFAULT_RUNTIME,),
    device: str = "cpu",
    warmup: int = 5,
    repeats: int = 20,
    images: Tensor | None = None,
) -> LatencyComparison:
    """Time the dense model and each pruned one in each of ``runtimes``; ratio = pruned /
    dense, speedup = 1 / ratio.

    Inputs are random, or batches of real ``images`` (``N x *input_shape``), the same for
    every model, which a detector's timing needs (:func:`~adasap.deploy.runtimes.image_batch`).

    In an interleaved runtime (``torch``) the models take turns at each repeat (dense, pruned
    1, pruned 2, dense, ...), so that a change in machine load hits them alike, and the ratio
    is the median over the rounds of ``pruned_i / dense_i``. The other runtimes time one model
    after the other (see :func:`~adasap.deploy.timing.model_times`): their rounds are paired
    by index only.
    """
    models = dict(pruned) if isinstance(pruned, Mapping) else {"pruned": pruned}
    where = str(resolve_device(device))
    rows = []
    for runtime in runtimes:
        base, *others = model_times(
            [dense, *models.values()],
            input_shape,
            batch_sizes=batch_sizes,
            runtime=runtime,
            device=device,
            warmup=warmup,
            repeats=repeats,
            images=images,
        )
        for name, times in zip(models, others, strict=True):
            for batch, dense_t, pruned_t in zip(batch_sizes, base, times, strict=True):
                d = LatencyResult.from_times(dense_t, runtime, where, batch)
                p = LatencyResult.from_times(pruned_t, runtime, where, batch)
                ratio = LatencyRatio.from_times(dense_t, pruned_t)
                rows.append(
                    {
                        "model": name,
                        "runtime": runtime,
                        "device": where,
                        "batch_size": batch,
                        "dense_ms": d.median_ms,
                        "pruned_ms": p.median_ms,
                        **ratio.to_dict(),
                        "speedup": 1 / ratio.ratio,
                        "dense_p10_ms": d.p10_ms,
                        "dense_p90_ms": d.p90_ms,
                        "pruned_p10_ms": p.p10_ms,
                        "pruned_p90_ms": p.p90_ms,
                        "dense_images_per_second": d.images_per_second,
                        "pruned_images_per_second": p.images_per_second,
                    }
                )
    return LatencyComparison(rows, machine_info(device))


def run_latency(
    run_dir: str | Path,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    runtimes: Sequence[str] | None = None,
    device: str = "cpu",
    warmup: int = 5,
    repeats: int = 20,
    images: Tensor | None = None,
) -> LatencyComparison:
    """Every pruned model of a run directory beside its dense model, on ``images`` (default:
    random ones of the saved input shape).

    ``runtimes`` defaults to :data:`~adasap.deploy.runtimes.DEFAULT_RUNTIME` (onnxruntime)
    where it runs on ``device`` and the task's ONNX graph takes batches, else PyTorch. The dense
    model is the run's own (``<run>/dense``); a run without one (written before runs kept it)
    gets a dense model rebuilt with fresh weights from the saved architecture where the task's
    time does not depend on the weights.
    """
    models = find_models(run_dir)
    dense_dir = models.pop(DENSE, None)
    if not models:
        raise UserError(f"{run_dir} holds no pruned model beside its dense one: time a run")
    description = read_description(next(iter(models.values())))
    architecture, task = description["architecture"], make_task(saved_task(description))
    if runtimes is None:
        default = onnx_runs_on(device) and task.onnx_timing
        runtimes = (DEFAULT_RUNTIME,) if default else ("torch",)
    if dense_dir is not None:
        dense = load_model(dense_dir)
    elif task.timed_by_architecture:
        dense = task.build_saved(architecture)
    else:
        raise UserError(
            f"{run_dir} holds {task.name} models, whose time depends on their weights and "
            f"input, but no dense model: adasap run --resume {run_dir} saves it there"
        )
    pruned = {name: load_model(path) for name, path in models.items()}
    size = int(architecture["image_size"])
    return compare_latency(
        dense,
        pruned,
        (int(architecture["in_channels"]), size, size),
        batch_sizes=batch_sizes,
        runtimes=runtimes,
        device=device,
        warmup=warmup,
        repeats=repeats,
        images=images,
    )
