"""AdaSAP's three phases for an object detector: warm-up, pruning, fine-tuning.

A batch is ``(images, targets)`` in torchvision's convention: ``images`` a list of float
``C x H x W`` tensors in [0, 1], ``targets`` a list of dicts with ``boxes`` (float ``[N, 4]``,
``x1, y1, x2, y2`` in pixels) and ``labels`` (int64 ``[N]``, classes 1..K; 0 is the
background). The loss of a step is the detector's summed loss dict in training mode. The
same :class:`~adasap.method.pruner.Pruner` as for classifiers runs every step::

    model = build_detector("tiny_ssd", num_classes=11, image_size=128)
    pruned, result = prune_detector(model, loader, PhaseSchedule(200, 400, 400), keep=0.5)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from adasap.data.detection import DetectionBundle, training_batches
from adasap.devices import autocast_dtype, resolve_device
from adasap.errors import UserError, exception_summary
from adasap.method.importance import Importance
from adasap.method.output_layers import detector_output_layers, layer_names, modules_outside
from adasap.method.pruner import Pruner, PrunerSettings
from adasap.method.pruning import ModelSize
from adasap.method.schedule import PHASES, PhaseSchedule
from adasap.method.target import PartSizeTarget, SizeTarget
from adasap.training.checkpoint import TrainingDiverged
from adasap.training.loop import autocast_for, cosine_lr, grad_scaler
from adasap.training.progress import ProgressLog

Batch = tuple[Sequence[Tensor], Sequence[Mapping[str, Tensor]]]
KeepReference = Literal["model", "backbone"]


@dataclass
class DetectionPruneResult:
    """What pruning a detector did. ``keep`` of ``keep_kind`` refers to ``keep_reference``:
    the whole model, or its ``backbone`` (with the FPN or SSD extra layers: torchvision's
    ``model.backbone``) alone, whose sizes are ``reference_dense`` and ``reference_pruned``."""

    dense: ModelSize
    pruned: ModelSize
    keep: float
    keep_kind: str
    keep_reference: KeepReference
    reference_dense: ModelSize
    reference_pruned: ModelSize
    ignored_layers: list[str]
    phase_losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    # Torch-Pruning's record of the removals: replayed on a fresh detector to load the model
    pruning_history: list[list[Any]] = field(default_factory=list)

    @property
    def kept(self) -> float:
        """The fraction kept of what ``keep`` refers to, as measured."""
        return self.reference_pruned.of(self.keep_kind) / max(
            self.reference_dense.of(self.keep_kind), 1
        )


def check_detection_batch(batch: Any) -> Batch:
    """``batch`` itself if it follows the contract in the module docstring; else UserError."""
    fix = (
        "yield (images, targets): a list of C x H x W tensors and a list of dicts with boxes "
        "[N, 4] (x1, y1, x2, y2) and int64 labels [N] >= 1"
    )
    if not (isinstance(batch, list | tuple) and len(batch) == 2):
        raise UserError(
            f"a detection batch is a {type(batch).__name__}, not (images, targets): {fix}"
        )
    images, targets = batch
    if not images or len(images) != len(targets):
        raise UserError(
            f"a detection batch has {len(images)} images, {len(targets)} targets: {fix}"
        )
    for image, target in zip(images, targets, strict=True):
        if not isinstance(image, Tensor) or image.dim() != 3 or not image.is_floating_point():
            raise UserError(f"a detection image is not a float C x H x W tensor: {fix}")
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise UserError(f"a target's boxes are not an [N, 4] tensor: {fix}")
        if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1]:
            raise UserError(f"a target's labels are not one per box: {fix}")
        if len(labels) and int(labels.min()) < 1:
            raise UserError(
                f"a target has label {int(labels.min())}, but 0 is the background: {fix}"
            )
        if bool((boxes[:, 2:] <= boxes[:, :2]).any()):
            raise UserError(f"a target has a box of zero or negative width or height: {fix}")
    return images, targets


def _batches(data: Iterable[Any], device: torch.device) -> Iterator[Batch]:
    """The batches of ``data`` on ``device``, passing over ``data`` again when it ends."""
    while True:
        empty = True
        for batch in data:
            empty = False
            images, targets = check_detection_batch(batch)
            yield (
                [image.to(device) for image in images],
                [{k: v.to(device) for k, v in t.items()} for t in targets],
            )
        if empty:
            raise UserError(
                "the detection data yield no batch (or a one-pass iterator ran out): pass a "
                "non-empty DataLoader or list of batches"
            )


def _target(
    model: nn.Module,
    example: list[Tensor],
    keep: float,
    kind: str,
    reference: KeepReference,
) -> SizeTarget | PartSizeTarget:
    """The pruning target: a fraction of the whole model's size, or of its backbone's."""
    if reference == "model":
        return SizeTarget(keep, kind)
    if reference != "backbone":
        raise UserError(f"keep_reference must be model or backbone, got {reference!r}")
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise UserError(
            f"{type(model).__name__} has no .backbone module: use keep_reference='model'"
        )
    return PartSizeTarget(keep, kind, model, backbone, example)


# Magnitude scores and the Pruner's defaults less phase-3 ASAM: only the classification sweeps
# chose Taylor scores and ASAM (docs/tuning.md); no sweep has tuned detectors.
DETECTOR_CRITERION = "magnitude"
DETECTOR_SETTINGS = PrunerSettings(finetune_sharpness=None)


def prune_detector(
    model: nn.Module,
    data: Iterable[Any],
    schedule: PhaseSchedule,
    *,
    method: str = "adasap",
    keep: float = 0.5,
    keep_kind: Literal["params", "macs"] = "params",
    keep_reference: KeepReference = "model",
    criterion: str | Importance = DETECTOR_CRITERION,
    optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    lr_warmup_steps: int = 0,
    ignored_layers: Sequence[nn.Module] = (),
    device: str = "auto",
    amp: str = "off",
    progress: ProgressLog | None = None,
    **pruner_settings: Any,
) -> tuple[nn.Module, DetectionPruneResult]:
    """Train and prune ``model`` (in place) over ``schedule.total_steps`` batches of ``data``.

    ``data`` is re-iterated when it ends (a DataLoader, or a list of batches). The learning
    rate follows a cosine decay over all steps (after ``lr_warmup_steps`` of linear warm-up).
    The heads' output layers are never pruned (:func:`detector_output_layers`), nor are
    ``ignored_layers``; with ``keep_reference="backbone"`` nothing outside ``model.backbone``
    loses neurons and ``keep`` is the fraction of the backbone's size kept. ``amp`` as in
    :func:`adasap.devices.autocast_dtype` (``off`` by default: the effect of reduced
    precision on box regression has not been measured). ``pruner_settings`` are
    :class:`~adasap.method.pruner.PrunerSettings` fields, or ``settings=`` a whole one
    (default: :data:`DETECTOR_SETTINGS`). ``criterion`` and phase 3 keep their values from
    before the classification sweeps chose Taylor scores and phase-3 ASAM: no sweep has tuned
    them for detectors. Returns the model, in eval mode, and what was done
    (:class:`DetectionPruneResult`).
    """
    started = time.perf_counter()
    dev = resolve_device(device)
    dtype = autocast_dtype(amp, dev)
    model.to(dev)
    batches = _batches(data, dev)
    first = next(batches)
    example = list(first[0][:1])
    target = _target(model, example, keep, keep_kind, keep_reference)
    ignored = [*detector_output_layers(model), *ignored_layers]
    if isinstance(target, PartSizeTarget):
        ignored += modules_outside(model, target.part)
    pruner = Pruner(
        model,
        example,
        schedule,
        method=method,
        keep=target,
        criterion=criterion,
        optimizer=optimizer,
        optimizer_kwargs=optimizer_kwargs or {"lr": 0.01, "momentum": 0.9},
        lr_scheduler=cosine_lr(schedule.total_steps, lr_warmup_steps),
        ignored_layers=ignored,
        scaler=grad_scaler(dev, dtype),
        **{"settings": DETECTOR_SETTINGS, **pruner_settings},
    )
    dense, reference_dense = pruner.size, target.dense
    losses = _train(pruner, first, batches, dev, dtype, progress or ProgressLog(enabled=False))
    model.eval()
    result = DetectionPruneResult(
        dense=dense,
        pruned=pruner.size,
        keep=keep,
        keep_kind=keep_kind,
        keep_reference=keep_reference,
        reference_dense=reference_dense,
        reference_pruned=target.current,
        ignored_layers=layer_names(model, pruner.ignored),
        phase_losses=losses,
        seconds=time.perf_counter() - started,
        pruning_history=list(pruner.pruning_history),
    )
    return model, result


def train_detector(
    model: nn.Module,
    data: Iterable[Any],
    steps: int,
    *,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    lr_warmup_steps: int = 0,
    device: str = "auto",
    progress: ProgressLog | None = None,
) -> tuple[nn.Module, float]:
    """Train ``model`` (in place) with SGD for ``steps`` batches of ``data`` (re-iterated when
    it ends) on the summed loss dict, the learning rate decaying as a cosine; the dense
    starting point of pruning. Returns the model, in eval mode, and the last pass's mean loss.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"training steps must be a positive integer, got {steps!r}")
    dev = resolve_device(device)
    model.to(dev).train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    scheduler = cosine_lr(steps, lr_warmup_steps)(optimizer)
    progress = progress or ProgressLog(enabled=False)
    batches, total = _batches(data, dev), 0.0
    with progress:
        task = progress.start("dense", steps)
        for index in range(steps):
            images, targets = next(batches)
            loss = sum(model(images, targets).values())
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"dense training diverged (loss {loss.item()} at step {index}): lower the "
                    "learning rate (--dense-lr)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
            progress.update(task, index + 1, f"loss {total / (index + 1):.3f}")
        progress.finish(task, steps)
    return model.eval(), total / steps


def prune_detector_copy(
    model: nn.Module,
    data: Any,
    ignored_layers: Sequence[nn.Module] | None,
    progress: bool,
    options: dict[str, Any],
) -> tuple[nn.Module, DetectionPruneResult]:
    """``adasap.prune(..., task="detection")``: a copy of the detector through
    :func:`prune_detector`; a detection set (or bundle: its ``train`` split) is batched here."""
    options = dict(options)
    schedule = options.pop("schedule", None)
    if not isinstance(schedule, PhaseSchedule):
        raise UserError(
            "task='detection' needs schedule=PhaseSchedule(warmup, prune, finetune) in steps, "
            "e.g. PhaseSchedule(100, 200, 200)"
        )
    batch_size = options.pop("batch_size", 8)
    if isinstance(data, DetectionBundle):
        data = data.train
    if isinstance(data, torch.utils.data.Dataset):
        data = training_batches(data, batch_size, seed=options.get("seed", 0))
    copied = copy.deepcopy(model)
    # the Pruner resolves layers by identity: follow the user's into the copy
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(copied.named_modules())
    ignored = [modules[names[id(m)]] for m in ignored_layers or () if id(m) in names]
    return prune_detector(
        copied,
        data,
        schedule,
        ignored_layers=ignored,
        progress=ProgressLog(enabled=progress),
        **options,
    )


def _train(
    pruner: Pruner,
    first: Batch,
    batches: Iterator[Batch],
    device: torch.device,
    dtype: torch.dtype | None,
    progress: ProgressLog,
) -> dict[str, float]:
    """Every step of the schedule; returns each phase's mean loss (of the first passes)."""
    model, schedule = pruner.model, pruner.schedule
    losses: dict[str, float] = {}
    batch: Batch | None = first
    with progress:
        for phase in PHASES:
            end = schedule.phase_end(phase)
            steps = end - pruner.steps_done
            if steps <= 0:
                continue
            task = progress.start(phase, steps)
            total = 0.0
            for index in range(steps):
                images, targets = batch if batch is not None else next(batches)
                batch = None
                model.train()

                def closure(images: list[Tensor] = images, targets: list = targets) -> dict:
                    with autocast_for(device, dtype):
                        loss_dict = model(images, targets)
                    return {name: value.float() for name, value in loss_dict.items()}

                try:
                    loss = pruner.step(closure)
                except (RuntimeError, ValueError, AssertionError) as exc:
                    raise UserError(
                        f"the detector failed on a training batch in phase {phase} "
                        f"({exception_summary(exc)}): give batches as in docs/detection.md, "
                        "of at least 2 images (BatchNorm in training needs more than one value)"
                    ) from exc
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"training diverged in phase {phase} (loss {loss.item()} at step "
                        f"{pruner.steps_done}): lower the learning rate or the radius (rho_max)"
                    )
                total += loss.item()
                progress.update(
                    task, index + 1, f"loss {total / (index + 1):.3f} {pruner.describe()}"
                )
            progress.finish(task, steps)
            losses[phase] = total / steps
    return losses
