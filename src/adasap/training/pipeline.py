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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adasap.alignment import resolve_round_to
from adasap.data import BatchSource
from adasap.devices import autocast_dtype, prepare_model, resolve_device, wants_channels_last
from adasap.distributed import any_rank, is_distributed, is_main, shard, world_size
from adasap.errors import UserError
from adasap.method.neurons import NeuronLayout
from adasap.method.output_layers import layer_names
from adasap.method.pruner import Pruner
from adasap.method.pruning import ModelSize
from adasap.method.schedule import PHASES, PhaseSchedule
from adasap.method.target import LatencyTarget, PruningTarget, SizeTarget, fitting_round_to
from adasap.tasks import Task, make_task, task_options
from adasap.training.checkpoint import CHECKPOINT_FILE, resume, stop_requests
from adasap.training.loop import EpochLoop, cosine_lr, grad_scaler, steps_per_epoch
from adasap.training.progress import ProgressLog
from adasap.training.settings import PruneSettings, base_optimizer, with_overrides

Log = Callable[[dict[str, Any]], None]


@dataclass
class PruneResult:
    """A pruned model and how it was obtained. ``val_accuracy`` is the last epoch's validation
    score in the task's headline metric (top-1 accuracy; a detector's mAP@0.5); ``kept`` the
    measured fraction of what ``keep`` refers to (the model, or a detector's backbone);
    ``round_to`` the channel multiple the removals kept (``auto`` resolved)."""

    model: nn.Module
    dense_size: ModelSize
    size: ModelSize
    target: float
    history: list[dict[str, Any]]
    pruning_history: list[list[Any]]
    seconds: float
    val_accuracy: float
    kept: float = 1.0
    round_to: int = 1
    ignored_layers: list[str] = field(default_factory=list)

    latency: dict[str, float] | None = None

    def keep_fraction(self, kind: str) -> float:
        return self.size.of(kind) / max(self.dense_size.of(kind), 1)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]
    seconds: float
    val_accuracy: float


def _round_to(s: PruneSettings) -> int:
    """The run's channel multiple, ``auto`` resolved on its training device (as the Pruner's)."""
    return resolve_round_to(s.pruner.round_to, s.pruner.runtime, resolve_device(s.device))


def _timing(s: PruneSettings) -> Any:
    """How a latency budget is timed: on the training device, in the runtime the model will
    be deployed to (``TimingSettings``; timing code is imported for this target only)."""
    from adasap.deploy.latency import TimingSettings

    return TimingSettings(device=resolve_device(s.device).type, runtime=s.pruner.runtime)


def latency_budget_for(layout: NeuronLayout, example: torch.Tensor, s: PruneSettings) -> Any:
    """The run's latency budget (``keep_kind: latency``, a ``LatencyBudget``) of the dense
    ``layout``: timed as :func:`_timing` says, its table's grid on the channel multiple the
    removals keep."""
    from adasap.deploy.latency import latency_budget

    return latency_budget(layout, example[:1], s.keep, timing=_timing(s), round_to=_round_to(s))


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
    auto = s.pruner.round_to == "auto"
    fitting_round_to(target, layout, s.pruner.min_channels, _round_to(s), auto=auto)


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
    task: Task
    source: BatchSource
    device: torch.device
    channels_last: bool
    amp: torch.dtype | None
    example: Any

    @classmethod
    def of(cls, model: nn.Module, train_data: Any, s: PruneSettings, task: Task) -> _Setup:
        device = resolve_device(s.device)
        channels_last = wants_channels_last(s.channels_last, device)
        # data-parallel: batch_size per rank, each rank its part of every global batch
        source = task.training_source(
            train_data, batch_size=s.batch_size, seed=s.seed, shard=shard()
        )
        steps_per_epoch(source)  # enough training images for one batch?
        source.check()
        sync_batchnorm(model, s)  # before the Pruner traces the model
        prepare_model(model, device, channels_last)
        amp = autocast_dtype(s.amp, device)
        example = task.to_device(source.example(), device)
        return cls(s, task, source, device, channels_last, amp, example)

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
            settings=self.s.pruner,
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
            self.task,
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
            resume(checkpoint, identity, pruner, loop)
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
    task: str | Task = "classification",
    **overrides: Any,
) -> PruneResult:
    """Prune a dense model with AdaSAP (or a baseline) and return the smaller model.

    Args:
        model: a trained dense model (not modified; a copy is pruned). Any ``nn.Module``
            that Torch-Pruning can trace works; with ``task="detection"`` a torchvision-style
            detector (docs/detection.md).
        train_data: a :class:`adasap.data.DataBundle` (its ``train`` split trains, its ``val``
            split monitors), or any data :func:`adasap.data.training_source` reads: a
            ``Dataset`` of (image, label), a ``DataLoader`` or other re-iterable of batches
            (used as it is, with its own sampler and augmentations), ``(images, labels)``.
            Detection: a :class:`~adasap.data.detection.DetectionBundle`, a detection set (or
            any Dataset of ``(image, target)`` items) or a list / DataLoader of
            ``(images, targets)`` batches.
        val_data: the task's validation score after every epoch is measured on it (any such
            kind; detection: mAP@0.5); optional.
        settings: a :class:`PruneSettings`; keyword ``overrides`` replace single fields,
            e.g. ``prune(model, data, method="sgd", keep=0.3)``. Without ``settings`` a task's
            own defaults come first (detection: magnitude scores, no phase-3 ASAM, float32).
        ignored_layers: modules whose outputs are never pruned; by default the task's output
            layers (the classifier; a detector's head outputs).
        log: called with one dict per epoch (phase, losses, accuracies, size, speed).
        checkpoint_dir: save a checkpoint there after every epoch and on SIGINT/SIGTERM; a
            checkpoint found there is resumed (with the same settings and dense model).
        progress: a live bar on a terminal, one line per epoch otherwise; False: silent.
        task: ``"classification"``, ``"detection"`` or a :class:`~adasap.tasks.Task` (e.g.
            ``DetectionTask(keep_reference="backbone")``).

    Returns:
        A :class:`PruneResult` with the pruned model, its measured size, per-epoch history and
        the pruning history (to replay the pruning on a fresh copy of the base model).
    """
    task, s = _task_settings(task, settings, overrides)
    log = log or (lambda record: None)
    train_data, val_data, num_classes = task.split(train_data, val_data)
    reference = model
    model = copy.deepcopy(model)
    setup = _Setup.of(model, train_data, s, task)
    given = None
    if ignored_layers is not None:  # the user's layers, followed into the copy
        by_id = dict(zip(map(id, reference.modules()), model.modules(), strict=True))
        if any(id(m) not in by_id for m in ignored_layers):
            raise UserError(
                "ignored_layers holds a module that is not part of the model: give the model's "
                "own layers (model.fc, not those of a copy of it)"
            )
        given = [by_id[id(m)] for m in ignored_layers]
    ignored = task.ignored_layers(model, setup.example, num_classes, given)
    schedule = PhaseSchedule.from_epochs(
        s.warmup_epochs, s.prune_epochs, s.finetune_epochs, len(setup.source), s.prune_steps
    )
    target = task.target(model, setup.example, s.keep, s.keep_kind)
    ignored += task.outside_target(model, target)
    if s.keep_kind == "latency":
        layout = NeuronLayout(model, setup.example, ignored)
        target = LatencyTarget(latency_budget_for(layout, setup.example, s))
    pruner = setup.pruner(
        model, schedule, method=s.method, keep=target, criterion=s.criterion, ignored_layers=ignored
    )
    dense_size = pruner.size
    phases = [(phase, schedule.phase_end(phase)) for phase in PHASES]
    identity = {"settings": s.identity(), "task": task.name}
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
        val_accuracy=_val_score(history, task),
        kept=pruner.target.fraction(),
        round_to=pruner.round_to,
        ignored_layers=layer_names(model, pruner.ignored),
        latency=latency,
    )


def _task_settings(
    task: str | Task, settings: PruneSettings | None, overrides: dict[str, Any]
) -> tuple[Task, PruneSettings]:
    """The task and the validated settings: without ``settings``, the task's defaults under
    the ``overrides``; the task's own options (``keep_reference`` ...) come from them too."""
    overrides = dict(overrides)
    run_settings = {f.name for f in fields(PruneSettings)}  # label_smoothing: the run's
    options = {
        k: overrides.pop(k) for k in task_options(task) if k in overrides and k not in run_settings
    }
    if settings is None:
        overrides = {**make_task(task, **options).defaults, **overrides}
    s = with_overrides(settings or PruneSettings(), overrides).validate()
    return make_task(task, label_smoothing=s.label_smoothing, **options), s


def _val_score(history: list[dict[str, Any]], task: Task) -> float:
    return history[-1][f"val_{task.headline}"] if history else float("nan")


def _final_latency(reference: nn.Module, pruner: Pruner, setup: _Setup) -> dict[str, float]:
    """The pruned model's latency against the budget, dense and pruned timed side by side.

    The dense latency measured at the start may have drifted with the machine's load over
    a long run; timing both again now keeps that drift out of the error. The prediction is
    rescaled to the new dense time.
    """
    from adasap.deploy.budget import time_dense_and_pruned

    budget = pruner.target.budget
    shape = tuple(setup.example.shape[1:])
    dense_ms, pruned_ms = time_dense_and_pruned(
        reference, pruner.model, shape, budget, _timing(setup.s)
    )
    return {
        "dense_ms": dense_ms,
        "budget_ms": budget.keep * dense_ms,
        "predicted_ms": budget.current_ms / budget.dense_ms * dense_ms,
        "measured_ms": pruned_ms,
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
    task: str | Task = "classification",
    **overrides: Any,
) -> TrainResult:
    """Train a dense model with the base optimizer: the starting point that :func:`prune` takes.

    It uses the same loop, schedule and settings as pruning (lr, batch size, label smoothing,
    seed, device ...), so a dense model and its pruned versions are trained alike.
    ``train_data``, ``val_data``, ``checkpoint_dir``, ``progress`` and ``task`` are as for
    :func:`prune`.
    """
    task, s = _task_settings(task, settings, overrides)
    if epochs <= 0:
        raise UserError(f"epochs must be > 0, got {epochs}")
    log = log or (lambda record: None)
    torch.manual_seed(s.seed)
    train_data, val_data, num_classes = task.split(train_data, val_data)
    setup = _Setup.of(model, train_data, s, task)
    schedule = PhaseSchedule(0, 0, round(epochs * len(setup.source)), removals=0)
    ignored = task.ignored_layers(model, setup.example, num_classes, None)
    # the dense model is the teacher of the pruning that follows: nothing to distil from here
    pruner = setup.pruner(
        model, schedule, method="sgd", keep=1.0, ignored_layers=ignored, distill_weight=0.0
    )
    identity = {"settings": s.identity(), "epochs": epochs, "task": task.name}
    phases = [("dense", schedule.total_steps)]
    loop = setup.run(pruner, val_data, phases, "", identity, checkpoint_dir, log, progress)
    history = loop.history
    return TrainResult(model, history, loop.elapsed(), _val_score(history, task))
