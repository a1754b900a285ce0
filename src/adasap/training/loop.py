"""Training building blocks shared by dense training and every pruning phase."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adasap.data import BatchSource
from adasap.distributed import all_reduce_sum, is_main
from adasap.errors import UserError
from adasap.tasks.base import StepOutput, Task
from adasap.training.checkpoint import RunInterrupted, TrainingDiverged, save_checkpoint
from adasap.training.progress import ProgressLog


@dataclass(frozen=True)
class OptimizerSettings:
    """The base optimizer (any ``torch.optim`` class by name); the sharpness-aware optimizer
    around it is the method's (``PrunerSettings``)."""

    base_optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to zero."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return 0.5 * self.base_lr * (1.0 + math.cos(math.pi * progress))


@dataclass
class EpochStats:
    """Running sums over the steps of one epoch (so a partial epoch can be resumed)."""

    steps: int = 0
    images: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0
    # images of the first pass, which loss and accuracy are read from (fewer than ``images``
    # when that pass is a sharpness-aware ascent on a sub-batch)
    scored: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.scored, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.scored, 1)

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device`` (:func:`adasap.devices.autocast_dtype`); None: off."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def cosine_lr(
    total_steps: int, warmup_steps: int = 0
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """``optimizer -> scheduler``: linear warm-up, then cosine decay to zero, per step."""
    schedule = CosineSchedule(1.0, total_steps, warmup_steps)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_at)


def grad_scaler(device: torch.device, amp: torch.dtype | None) -> torch.amp.GradScaler | None:
    """float16 gradients underflow without loss scaling; bfloat16's range needs none."""
    return torch.amp.GradScaler(device.type) if amp == torch.float16 else None


def steps_per_epoch(source: BatchSource) -> int:
    """Full batches per epoch (the last partial batch is dropped: BatchNorm needs > 1 image)."""
    count = len(source)
    batch_size = getattr(source, "batch_size", None)
    if count < 1 and batch_size is None:
        raise UserError("the training data yield no batch: pass a non-empty DataLoader")
    if count < 1:
        world = getattr(source, "shard", (0, 1))[1]  # data-parallel: world x batch_size
        batch = f"{batch_size} x {world} ranks" if world > 1 else batch_size
        raise UserError(
            f"the training set has fewer images than the batch size {batch}: "
            "lower --batch-size or use more data"
        )
    return count


@dataclass
class EpochLoop:
    """Epoch-by-epoch training through a :class:`~adasap.method.pruner.Pruner`.

    Dense training and every pruning phase of every task run here; the ``task``
    (:class:`~adasap.tasks.Task`) supplies the loss of a step and the validation score. With
    a checkpoint path it saves its owner's state after every epoch and when a stop is
    requested (SIGINT/SIGTERM) between two steps, so a run continues where it stopped and, on
    the CPU, ends with the same weights as an uninterrupted run. With ``compile`` the model
    trains and is evaluated through ``torch.compile``, compiled afresh after each removal.
    """

    pruner: Any
    source: Any
    val: Any
    device: torch.device
    channels_last: bool
    amp: torch.dtype | None
    task: Task
    checkpoint: Path | None = None
    compile: bool = False
    owner_state: Callable[[], dict[str, Any]] = dict
    should_stop: Callable[[], bool] = lambda: False
    step: int = 0
    epoch: int = 0
    partial: EpochStats | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    seconds_before: float = 0.0
    _compiled: nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.pruner.distillation is not None and not self.task.distillable:
            raise UserError(
                f"distillation (distill_weight > 0) is not defined for the {self.task.name} "
                "task: set distill_weight 0"
            )
        if self.compile:
            self.pruner.register_removal_hook(self._forget_compiled)

    def _forget_compiled(self, pruner: Any) -> None:
        """New shapes: drop the compiled code (dynamo's cache is global, and its recompile
        limit would otherwise send later removals back to eager mode)."""
        self._compiled = None
        torch.compiler.reset()

    @property
    def model(self) -> nn.Module:
        """The model to run: the pruner's, compiled when ``compile`` is on."""
        if not self.compile:
            return self.pruner.model
        if self._compiled is None:
            self._compiled = torch.compile(self.pruner.model)
        return self._compiled

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "partial": asdict(self.partial) if self.partial else None,
            "history": self.history,
            "seconds": self.elapsed(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.step, self.epoch = state["step"], state["epoch"]
        self.partial = EpochStats(**state["partial"]) if state["partial"] else None
        self.history = list(state["history"])
        self.seconds_before = state["seconds"]

    def save(self) -> None:
        if self.checkpoint is not None and is_main():  # data-parallel: rank 0 writes
            save_checkpoint(self.checkpoint, {"loop": self.state(), **self.owner_state()})

    def run(
        self,
        progress: ProgressLog,
        phase: str,
        end: int,
        log: Callable[[dict[str, Any]], Any],
        label: str,
    ) -> None:
        """Train until global step ``end``, logging one record per (possibly partial) epoch."""
        spe = steps_per_epoch(self.source)
        while self.step < end:
            count = min(spe, end - self.step)
            try:
                stats = self._train_steps(count, progress, f"{label} ep{self.epoch + 1}", phase)
            except FloatingPointError as exc:
                kept = (
                    f"; the last good checkpoint is {self.checkpoint}"
                    if self.checkpoint is not None and self.checkpoint.is_file()
                    else ""
                )
                raise TrainingDiverged(
                    f"training diverged in phase {phase} ({exc}): the perturbation radius "
                    f"(--rho/--rho-max) or the learning rate (--lr) is probably too large{kept}"
                ) from exc
            if stats.steps < count:
                self.partial = stats
                self.save()
                raise RunInterrupted(self.checkpoint)
            self.partial = None
            self.step += count
            self.epoch += 1
            ddp = self.pruner.ddp
            if ddp is not None:
                ddp.sync_buffers()  # rank 0's BatchNorm statistics, which the checkpoint holds
            headline = self.task.headline
            val = (
                self.task.score(
                    self.model,
                    self.val,
                    device=self.device,
                    channels_last=self.channels_last,
                    sharded=ddp is not None,
                )[headline]
                if self.val is not None
                else None
            )
            size = self.pruner.size
            record = {
                "phase": phase,
                "epoch": self.epoch,
                "step": self.step,
                "lr": self.pruner.optimizer.param_groups[0]["lr"],
                "train_loss": stats.loss,
                "train_accuracy": stats.accuracy if self.task.training_accuracy else None,
                "images_per_second": stats.images_per_second,
                f"val_{headline}": val,
                "optimizer": self.pruner.kind,
                "params": size.params,
                "macs": size.macs,
                "seconds": self.elapsed(),
            }
            self.history.append(record)
            self.save()
            progress.epoch_done(record)
            log(record)

    def _train_steps(
        self, steps: int, progress: ProgressLog, description: str, phase: str
    ) -> EpochStats:
        """The first ``steps`` batches of the current epoch (resuming a partial one)."""
        task = self.task
        self.pruner.model.train()
        stats = copy.copy(self.partial) if self.partial is not None else EpochStats()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        scored = 0
        start = time.perf_counter()
        bar = progress.start(description, steps)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        done_before, images_before = stats.steps, stats.images
        checked = False  # the targets are checked against the model's output once per call
        for index, batch in enumerate(self.source.epoch(self.epoch, self.device)):
            if index < done_before:
                continue  # drawn again to keep the epoch's random stream in step
            if index >= steps or self.should_stop():
                break
            batch = task.prepare(batch, memory_format)
            outputs: list[StepOutput] = []

            def compute_loss(
                fraction: float = 1.0, batch: Any = batch, outputs: list = outputs
            ) -> Tensor:
                nonlocal checked
                with autocast_for(self.device, self.amp):
                    output = task.forward(self.pruner.ddp or self.model, batch, fraction)
                step = task.loss(output, batch, fraction, check=not checked, count=not outputs)
                checked = True
                if not outputs:
                    outputs.append(step)
                if self.pruner.distillation is None:
                    return step.loss
                with autocast_for(self.device, self.amp):  # the teacher runs as the student
                    return self.pruner.distill_loss(*task.distill_inputs(output, batch), step.loss)

            try:
                loss = self.pruner.step(compute_loss)
            except Exception as exc:
                task.failed(self.pruner.model, batch, phase, exc)
                raise
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} at step {self.step + index}"
                )
            first = outputs[0]
            loss_sum += loss.double() * first.scored
            if first.correct is not None:
                correct += first.correct
            scored += first.scored
            stats.steps += 1
            stats.images += task.images(batch)
            if index % 10 == 0 or index == steps - 1:
                elapsed = stats.seconds + time.perf_counter() - start
                seen = stats.scored + scored
                accuracy = (
                    f"acc {(stats.correct + correct.item()) / seen:.3f} "
                    if task.training_accuracy
                    else ""
                )
                progress.update(
                    bar,
                    index + 1,
                    f"loss {(stats.loss_sum + loss_sum.item()) / seen:.3f} {accuracy}"
                    f"{stats.images / elapsed:.0f} img/s {self.pruner.describe()}",
                )
        progress.finish(bar, stats.steps)
        new = [loss_sum.item(), correct.item(), scored, stats.images - images_before]
        sums = torch.tensor(new, dtype=torch.float64)
        if self.pruner.ddp is not None:  # the sums over every rank's part of the batches
            sums = all_reduce_sum(sums)
        stats.loss_sum += sums[0].item()
        stats.correct += int(sums[1])
        stats.scored += int(sums[2])
        stats.images = images_before + int(sums[3])
        stats.seconds += time.perf_counter() - start
        return stats
