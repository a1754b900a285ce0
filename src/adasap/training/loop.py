"""Training building blocks shared by dense training and every pruning phase."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from adasap.checks import check_input, check_labels
from adasap.data.datasets import batches, num_batches
from adasap.errors import UserError
from adasap.method.optim import SAM, AdaSAP, sharpness_aware_step

OptimizerKind = Literal["sgd", "sam", "adasap"]


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available: use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move the model to ``device``; channels_last trains ~1.5x faster on CPU for convnets."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: BatchNorm parameters and biases (1-D tensors) get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # chosen by `adasap sweep --preset small` (docs/tuning.md): validation data, extra corruptions
    rho: float = 0.05
    rho_min: float = 0.05
    rho_max: float = 0.1
    normalization: Literal["global", "neuron"] = "global"
    asam: bool = False
    max_grad_norm: float | None = None


def make_optimizer(
    model: nn.Module, kind: OptimizerKind, settings: OptimizerSettings
) -> torch.optim.Optimizer:
    """SGD with momentum, wrapped in SAM (uniform radius) or AdaSAP (per-neuron radius)."""
    groups = parameter_groups(model, settings.weight_decay)
    sgd_kwargs = dict(lr=settings.lr, momentum=settings.momentum)
    if kind == "sgd":
        return torch.optim.SGD(groups, **sgd_kwargs)
    if kind == "sam":
        return SAM(
            groups,
            torch.optim.SGD,
            rho=settings.rho,
            adaptive=settings.asam,
            max_grad_norm=settings.max_grad_norm,
            **sgd_kwargs,
        )
    if kind == "adasap":
        return AdaSAP(
            groups,
            torch.optim.SGD,
            rho_min=settings.rho_min,
            rho_max=settings.rho_max,
            normalization=settings.normalization,
            adaptive=settings.asam,
            max_grad_norm=settings.max_grad_norm,
            **sgd_kwargs,
        )
    raise UserError(f"unknown optimizer kind {kind!r}: choose sgd, sam or adasap")


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class EpochStats:
    """Running sums over the steps of one epoch (so a partial epoch can be resumed)."""

    steps: int = 0
    images: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.images, 1)

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def autocast_for(device: torch.device, amp: bool):
    """float16 autocast on CUDA when AMP is on; nothing on the CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def train_steps(
    model: nn.Module,
    optimizer_ref: Callable[[], torch.optim.Optimizer],
    images_set,
    *,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    schedule: CosineSchedule,
    first_step: int,
    label_smoothing: float = 0.0,
    augment: bool = True,
    amp: bool = True,
    channels_last: bool = True,
    scaler: torch.amp.GradScaler | None = None,
    resume: EpochStats | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    before_step: Callable[[int], None] | None = None,
    after_first_backward: Callable[[], None] | None = None,
    progress: Progress | None = None,
    description: str = "train",
    size_label: Callable[[], str] = lambda: "",
) -> EpochStats:
    """Run the first ``steps`` batches of one epoch (the epoch's order comes from ``generator``).

    ``first_step`` is the global step of the epoch's first batch. With ``resume`` (the stats
    of an interrupted epoch) the batches already done are drawn again, keeping the generator
    in step, but not trained on. Returns early, with ``stats.steps < steps``, when
    ``should_stop()`` turns true. ``optimizer_ref`` is called at every step because pruning
    (done in ``before_step``) replaces the optimizer; ``after_first_backward`` sees the
    gradients at the unperturbed weights, where Taylor scores are accumulated.
    """
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    model.train()
    stats = copy.copy(resume) if resume is not None else EpochStats()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    start = time.perf_counter()
    task = progress.add_task(description, total=steps, stats="") if progress else None
    iterator = batches(
        images_set,
        batch_size,
        shuffle=True,
        generator=generator,
        augment=augment,
        device=device,
        drop_last=True,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )
    done_before = stats.steps
    labels_unchecked = [getattr(images_set, "labels", None)]  # checked at the first forward
    for index, (x, y) in enumerate(iterator):
        if index < done_before:
            continue
        if index >= steps or should_stop():
            break
        step = first_step + index
        if before_step is not None:
            before_step(step)
        optimizer = optimizer_ref()
        set_lr(optimizer, schedule.lr_at(step))
        outputs: list[Tensor] = []

        def compute_loss(x: Tensor = x, y: Tensor = y, outputs: list[Tensor] = outputs) -> Tensor:
            with autocast_for(device, amp):
                logits = model(x)
                if not outputs:
                    outputs.append(logits.detach())
                if labels_unchecked:
                    check_labels(labels_unchecked.pop(), logits.shape[-1], "the training labels")
                return criterion(logits.float(), y)

        try:
            loss = sharpness_aware_step(
                model,
                optimizer,
                compute_loss,
                scaler=scaler,
                after_first_backward=after_first_backward,
            )
        except (RuntimeError, ValueError):
            check_input(model, x, "the training images")  # a clear error when they do not fit
            raise
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        loss_sum += loss.double() * len(y)
        correct += (outputs[0].argmax(1) == y).sum()
        stats.steps += 1
        stats.images += len(y)
        if progress is not None and (index % 10 == 0 or index == steps - 1):
            elapsed = stats.seconds + time.perf_counter() - start
            progress.update(
                task,
                completed=index + 1,
                stats=(
                    f"loss {(stats.loss_sum + loss_sum.item()) / stats.images:.3f} "
                    f"acc {(stats.correct + correct.item()) / stats.images:.3f} "
                    f"{stats.images / elapsed:.0f} img/s {size_label()}"
                ),
            )
    if progress is not None:
        progress.update(task, completed=stats.steps)
    stats.loss_sum += loss_sum.item()
    stats.correct += int(correct.item())
    stats.seconds += time.perf_counter() - start
    return stats


def steps_per_epoch(images_set, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped: BatchNorm needs > 1 image)."""
    if len(images_set) < batch_size:
        raise UserError(
            f"the training set has {len(images_set)} images, fewer than the batch size "
            f"{batch_size}: lower --batch-size or use more data"
        )
    return num_batches(images_set, batch_size, drop_last=True)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images_set,
    *,
    batch_size: int = 512,
    device: torch.device | None = None,
    channels_last: bool = True,
) -> float:
    """Top-1 accuracy of ``model`` on ``images_set``."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    seen = 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    labels_unchecked = [getattr(images_set, "labels", None)]
    for x, y in batches(
        images_set, batch_size, shuffle=False, device=device, memory_format=memory_format
    ):
        try:
            logits = model(x)
        except (RuntimeError, ValueError):
            check_input(model, x)  # a clear error when the images do not fit the model
            raise
        if labels_unchecked:
            check_labels(labels_unchecked.pop(), logits.shape[-1])
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    model.train(was_training)
    return correct / max(seen, 1)


def progress_bar(disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        disable=disable,
        transient=False,
    )
