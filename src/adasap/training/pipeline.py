"""The three AdaSAP phases on a dense model: adaptive warm-up, neuron removal, robust fine-tuning.

``prune()`` is the whole method as one function, and ``train()`` trains the dense model it
starts from. Both are users of :class:`~adasap.method.pruner.Pruner` in adasap's own epoch
loop; the baselines (``sgd``, ``sam``) and the ablations run through the same code with other
optimizers per phase, so they share the data order, the schedule, the budget and the
pruning criterion.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adasap.data import BatchSource, DataBundle, training_source
from adasap.devices import autocast_dtype, prepare_model, resolve_device, wants_channels_last
from adasap.distributed import any_rank, is_distributed, is_main, shard, world_size
from adasap.errors import UserError
from adasap.method.neurons import NeuronLayout
from adasap.method.output_layers import default_ignored_layers
from adasap.method.pruner import Pruner
from adasap.method.pruning import ModelSize
from adasap.method.schedule import PHASES, PhaseSchedule
from adasap.method.target import LatencyTarget, PruningTarget, SizeTarget
from adasap.models.builders import find_classifier
from adasap.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, stop_requests
from adasap.training.detection import DetectionPruneResult, prune_detector_copy
from adasap.training.loop import EpochLoop, cosine_lr, grad_scaler, steps_per_epoch
from adasap.training.progress import ProgressLog
from adasap.training.settings import (
    PruneSettings,
    base_optimizer,
    pruner_settings,
    with_overrides,
)

Log = Callable[[dict[str, Any]], None]


@dataclass
class PruneResult:
    """A pruned model and how it was obtained."""

    model: nn.Module
    dense_size: ModelSize
    size: ModelSize
    target: float
    history: list[dict[str, Any]]
    pruning_history: list[list[Any]]
    seconds: float
    val_accuracy: float

    latency: dict[str, float] | None = None

    def keep_fraction(self, kind: str) -> float:
        return self.size.of(kind) / max(self.dense_size.of(kind), 1)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]
    seconds: float
    val_accuracy: float


def _ignored_layers(model: nn.Module, example: torch.Tensor, num_classes: int | None) -> list:
    if num_classes is None:
        return default_ignored_layers(model, example)
    classifier = find_classifier(model, num_classes)
    if classifier is None:
        raise UserError(
            f"found no classifier with {num_classes} outputs (the dataset's classes) to "
            "protect from pruning: pass ignored_layers=[the output layer], or a model with "
            "one output per class"
        )
    return [classifier]


def _latency_target(layout: NeuronLayout, example: torch.Tensor, s: PruneSettings) -> LatencyTarget:
    # timing code is needed only for this target
    from adasap.deploy.latency import TimingSettings, latency_budget

    timing = TimingSettings(device=resolve_device(s.device).type)
    return LatencyTarget(latency_budget(layout, example[:1], s.keep, timing=timing))


def check_target_reachable(
    layout: NeuronLayout, settings: PruneSettings, dense: ModelSize, budget: Any = None
) -> None:
    """Raise :class:`UserError` when ``settings.keep`` would empty a layer of ``layout``.

    The last removal step would find out after hours of training; this asks the same question
    of the dense layout before any. ``budget`` is the latency budget for ``keep_kind: latency``.
    """
    s = settings
    if budget is not None:
        target: PruningTarget = LatencyTarget(budget)
    else:
        target = SizeTarget(s.keep, s.keep_kind)
        target.bind(dense)
    target.check(layout, s.min_channels, s.round_to)


def sync_batchnorm(model: nn.Module, settings: PruneSettings) -> None:
    """Under torchrun with ``sync_bn``, make the BatchNorm layers SyncBatchNorm (in place).

    Every rank then normalises with the statistics of the global batch. In one process
    BatchNorm already sees the whole batch, so nothing changes. SyncBatchNorm is pruned like
    BatchNorm (a subclass) and saved under the same keys, so saved models load as BatchNorm.
    """
    if settings.sync_bn and is_distributed():
        nn.SyncBatchNorm.convert_sync_batchnorm(model)


@dataclass
class _Setup:
    """What dense training and pruning build the same way: device, data, loop, schedule."""

    s: PruneSettings
    source: BatchSource
    device: torch.device
    channels_last: bool
    amp: torch.dtype | None
    example: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, train_data: Any, s: PruneSettings) -> _Setup:
        device = resolve_device(s.device)
        channels_last = wants_channels_last(s.channels_last, device)
        # data-parallel: batch_size per rank, each rank its part of every global batch
        source = training_source(train_data, batch_size=s.batch_size, seed=s.seed, shard=shard())
        steps_per_epoch(source)  # enough training images for one batch?
        source.check()
        sync_batchnorm(model, s)  # before the Pruner traces the model
        prepare_model(model, device, channels_last)
        amp = autocast_dtype(s.amp, device)
        return cls(s, source, device, channels_last, amp, source.example().to(device))

    def cosine(self, total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
        """The learning rate per step: linear warm-up, then cosine decay to zero."""
        return cosine_lr(total_steps, round(self.s.lr_warmup_epochs * len(self.source)))

    def pruner(self, model: nn.Module, schedule: PhaseSchedule, **kwargs: Any) -> Pruner:
        cls, optimizer_kwargs = base_optimizer(self.s.optimizer)
        return Pruner(
            model,
            self.example,
            schedule,
            optimizer=cls,
            optimizer_kwargs=optimizer_kwargs,
            lr_scheduler=self.cosine(schedule.total_steps),
            scaler=grad_scaler(self.device, self.amp),
            settings=pruner_settings(self.s),
            **kwargs,
        )

    def run(
        self,
        pruner: Pruner,
        val_data: Any,
        phases: list[tuple[str, int]],
        label: str,
        identity: dict[str, Any],
        checkpoint_dir: str | Path | None,
        log: Log,
        progress: bool,
    ) -> EpochLoop:
        """Train through ``phases`` (name, end step), resuming a checkpoint of the same run.

        The checkpoint holds the model's weights, the pruner's state and the loop's, under
        ``identity`` (the settings that must match for a resume). Under torchrun every rank
        trains its part of each batch through DDP; rank 0 alone logs, reports and writes.
        """
        if not is_main():
            log, progress = (lambda record: None), False
        checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
        loop = EpochLoop(
            pruner,
            self.source,
            val_data,
            self.device,
            self.channels_last,
            self.amp,
            self.s.label_smoothing,
            checkpoint=checkpoint,
            compile=self.s.compile,
            owner_state=lambda: {
                **identity,
                "world_size": world_size(),
                "model": pruner.model.state_dict(),
                "pruner": pruner.state_dict(),
            },
        )
        if checkpoint is not None and checkpoint.is_file():
            state = load_checkpoint(checkpoint)
            if {k: state.get(k) for k in identity} != identity:
                raise UserError(
                    f"{checkpoint} was written with other settings: resume with the run's own "
                    "config, or delete the checkpoint to start afresh"
                )
            written_by = state.get("world_size", 1)  # each global batch's split depends on it
            if written_by != world_size():
                how = (
                    "without torchrun" if written_by == 1 else f"as {written_by} torchrun processes"
                )
                raise UserError(
                    f"{checkpoint} was written by {written_by} process(es), not {world_size()}: "
                    f"resume {how}, or delete the checkpoint to start afresh"
                )
            pruner.load_state_dict(state["pruner"])
            pruner.model.load_state_dict(state["model"])
            loop.restore(state["loop"])
            for record in loop.history:  # a resumed run reports its earlier epochs too
                log(record)
        if is_distributed():
            cuda = self.device.type == "cuda"
            pruner.distribute(device_ids=[self.device.index] if cuda else None)
        with stop_requests() as should_stop, ProgressLog(enabled=progress) as report:
            # data-parallel: every rank stops at the same step, so none waits for the others
            loop.should_stop = (
                (lambda: any_rank(should_stop())) if is_distributed() else should_stop
            )
            for phase, end in phases:
                loop.run(report, phase, end, log, label=f"{label} {phase}".strip())
        if pruner.ddp is not None:
            pruner.ddp.sync_buffers()
        pruner.model.eval()
        return loop


def _split(data: Any, val: Any) -> tuple[Any, Any, int | None]:
    """Training data, validation data and the number of classes, from what the user gave."""
    if isinstance(data, DataBundle):
        return data.train, data.val if val is None else val, data.spec.num_classes
    return data, val, None


def prune(
    model: nn.Module,
    train_data: Any,
    val_data: Any = None,
    *,
    settings: PruneSettings | None = None,
    ignored_layers: Sequence[nn.Module] | None = None,
    log: Log | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    task: str = "classification",
    **overrides: Any,
) -> PruneResult | tuple[nn.Module, DetectionPruneResult]:
    """Prune a dense model with AdaSAP (or a baseline) and return the smaller model.

    ``task="detection"`` prunes a copy of a torchvision-style detector with
    :func:`~adasap.training.detection.prune_detector` and returns ``(model, result)``:
    ``train_data`` is a detection set, bundle or iterable of ``(images, targets)`` batches,
    ``schedule=PhaseSchedule(warmup, prune, finetune)`` (in steps) is required and the other
    keywords are ``prune_detector``'s (``batch_size`` for a set: 8), e.g.
    ``prune(detector, data, task="detection", schedule=PhaseSchedule(100, 200, 200), keep=0.5)``.

    Args:
        model: a trained dense model (not modified; a copy is pruned). Any ``nn.Module``
            that Torch-Pruning can trace works.
        train_data: a :class:`adasap.data.DataBundle` (its ``train`` split trains, its ``val``
            split monitors), or any data :func:`adasap.data.training_source` reads: a
            ``Dataset`` of (image, label), a ``DataLoader`` or other re-iterable of batches
            (used as it is, with its own sampler and augmentations), ``(images, labels)``.
        val_data: accuracy after every epoch is measured on it (any such kind); optional.
        settings: a :class:`PruneSettings`; keyword ``overrides`` replace single fields,
            e.g. ``prune(model, data, method="sgd", keep=0.3)``.
        ignored_layers: modules whose outputs are never pruned; by default the classifier
            (the last layer with one output per class).
        log: called with one dict per epoch (phase, losses, accuracies, size, speed).
        checkpoint_dir: save a checkpoint there after every epoch and on SIGINT/SIGTERM; a
            checkpoint found there is resumed (with the same settings and dense model).
        progress: a live bar on a terminal, one line per epoch otherwise; False: silent.

    Returns:
        A :class:`PruneResult` with the pruned model, its measured size, per-epoch history and
        the pruning history (to replay the pruning on a fresh copy of the base model).
    """
    if task == "detection":
        return prune_detector_copy(model, train_data, ignored_layers, progress, overrides)
    if task != "classification":
        raise UserError(f"task must be classification or detection, got {task!r}")
    s = with_overrides(settings or PruneSettings(), overrides).validate()
    log = log or (lambda record: None)
    train_data, val_data, num_classes = _split(train_data, val_data)
    reference = model
    model = copy.deepcopy(model)
    setup = _Setup.of(model, train_data, s)
    if ignored_layers is None:
        ignored = _ignored_layers(model, setup.example, num_classes)
    else:
        by_id = dict(zip(map(id, reference.modules()), model.modules(), strict=True))
        ignored = [by_id[id(m)] for m in ignored_layers]
    schedule = PhaseSchedule.from_epochs(
        s.warmup_epochs, s.prune_epochs, s.finetune_epochs, len(setup.source), s.prune_steps
    )
    target: float | PruningTarget = s.keep
    if s.keep_kind == "latency":
        target = _latency_target(NeuronLayout(model, setup.example, ignored), setup.example, s)
    pruner = setup.pruner(
        model, schedule, method=s.method, keep=target, criterion=s.criterion, ignored_layers=ignored
    )
    dense_size = pruner.size
    phases = [(phase, schedule.phase_end(phase)) for phase in PHASES]
    identity = {"settings": s.to_dict()}
    loop = setup.run(pruner, val_data, phases, s.method, identity, checkpoint_dir, log, progress)
    history = loop.history
    latency = _final_latency(reference, pruner, setup) if s.keep_kind == "latency" else None
    final = (
        pruner.target.final if isinstance(pruner.target, SizeTarget) else target.budget.target_ms
    )
    return PruneResult(
        model=model,
        dense_size=dense_size,
        size=pruner.size,
        target=final,
        history=history,
        pruning_history=pruner.pruning_history,
        seconds=loop.elapsed(),
        val_accuracy=history[-1]["val_accuracy"] if history else float("nan"),
        latency=latency,
    )


def _final_latency(reference: nn.Module, pruner: Pruner, setup: _Setup) -> dict[str, float]:
    """The pruned model's latency against the budget, dense and pruned timed side by side.

    The dense latency measured at the start may have drifted with the machine's load over
    a long run; timing both again now keeps that drift out of the error. The prediction is
    rescaled to the new dense time.
    """
    from adasap.deploy.latency import compare_latency

    budget = pruner.target.budget
    (row,) = compare_latency(
        reference,
        pruner.model,
        tuple(setup.example.shape[1:]),
        batch_sizes=(budget.table.batch_size,),
        device=setup.device.type,
    ).rows
    dense_ms = row["dense_ms"]
    return {
        "dense_ms": dense_ms,
        "budget_ms": budget.keep * dense_ms,
        "predicted_ms": budget.current_ms / budget.dense_ms * dense_ms,
        "measured_ms": row["pruned_ms"],
    }


def train(
    model: nn.Module,
    train_data: Any,
    val_data: Any = None,
    *,
    epochs: float = 10.0,
    settings: PruneSettings | None = None,
    log: Log | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    **overrides: Any,
) -> TrainResult:
    """Train a dense model with the base optimizer: the starting point that :func:`prune` takes.

    It uses the same loop, schedule and settings as pruning (lr, batch size, label smoothing,
    seed, device ...), so a dense model and its pruned versions are trained alike.
    ``train_data``, ``val_data``, ``checkpoint_dir`` and ``progress`` are as for
    :func:`prune`.
    """
    s = with_overrides(settings or PruneSettings(), overrides).validate()
    if epochs <= 0:
        raise UserError(f"epochs must be > 0, got {epochs}")
    log = log or (lambda record: None)
    torch.manual_seed(s.seed)
    train_data, val_data, num_classes = _split(train_data, val_data)
    setup = _Setup.of(model, train_data, s)
    schedule = PhaseSchedule(0, 0, round(epochs * len(setup.source)), removals=0)
    ignored = _ignored_layers(model, setup.example, num_classes)
    pruner = setup.pruner(model, schedule, method="sgd", keep=1.0, ignored_layers=ignored)
    identity = {"settings": s.to_dict(), "epochs": epochs}
    phases = [("dense", schedule.total_steps)]
    loop = setup.run(pruner, val_data, phases, "", identity, checkpoint_dir, log, progress)
    history = loop.history
    return TrainResult(model, history, loop.elapsed(), history[-1]["val_accuracy"])
