"""The three AdaSAP phases on a dense model: adaptive warm-up, neuron removal, robust fine-tuning.

``prune()`` is the whole method as one function; the baselines (``sgd``, ``sam``) and the
ablations run through the same code with other optimizers per phase, so they share the data
order, the schedule, the budget and the pruning criterion.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from adasap.data.datasets import batches
from adasap.deploy.latency import LatencyBudget, compare_latency, latency_budget
from adasap.errors import UserError
from adasap.method.importance import (
    TaylorImportance,
    criteria,
    make_importance,
    normalize_scores,
    radii_from_scores,
)
from adasap.method.neurons import NeuronLayout
from adasap.method.optim import AdaSAP
from adasap.method.pruning import (
    ModelSize,
    measure_size,
    named_optimizer_state,
    remove_neurons,
    select_neurons,
    size_predictor,
    transfer_optimizer_state,
)
from adasap.models.builders import find_classifier
from adasap.training.checkpoint import (
    CHECKPOINT_FILE,
    RunInterrupted,
    TrainingDiverged,
    load_checkpoint,
    save_checkpoint,
    stop_requests,
)
from adasap.training.loop import (
    CosineSchedule,
    EpochStats,
    OptimizerKind,
    OptimizerSettings,
    evaluate,
    make_optimizer,
    prepare_model,
    progress_bar,
    resolve_device,
    steps_per_epoch,
    train_steps,
)

# Optimizer in phases 1-2 (warm-up and removal), then in phase 3 (fine-tuning).
METHODS: dict[str, tuple[OptimizerKind, OptimizerKind]] = {
    "adasap": ("adasap", "sam"),
    "sam": ("sam", "sam"),
    "sgd": ("sgd", "sgd"),
    "adasap-sgd": ("adasap", "sgd"),
    "sgd-sam": ("sgd", "sam"),
}
PHASES = ("warmup", "prune", "finetune")


@dataclass(frozen=True)
class PruneSettings:
    """Everything that defines a pruning run; the defaults are the documented choices.

    Epoch counts may be fractional (a reduced setting trains on part of an epoch).
    """

    method: str = "adasap"
    criterion: str = "magnitude"
    keep: float = 0.5
    keep_kind: str = "params"
    warmup_epochs: float = 1.0
    prune_epochs: float = 2.0
    finetune_epochs: float = 2.0
    prune_steps: int = 4
    batch_size: int = 128
    label_smoothing: float = 0.1
    lr_warmup_epochs: float = 0.2
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    score_refresh: int = 10
    score_normalization: str = "mean"
    per_layer_radii: bool = False
    taylor_form: str = "group"
    min_channels: int = 1
    round_to: int = 1
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    progress: bool = True

    def validate(self) -> PruneSettings:
        """Raise :class:`UserError` naming the first bad value and what is allowed."""
        _check_types(self)
        _check_types(self.optimizer)
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.criterion not in criteria():
            raise UserError(
                f"unknown criterion {self.criterion!r}: choose one of {', '.join(criteria())}"
            )
        if not 0 < self.keep <= 1:
            raise UserError(f"keep fraction must be in (0, 1], got {self.keep}: e.g. --keep 0.5")
        if self.keep_kind not in ("params", "macs", "latency"):
            raise UserError(f"keep kind must be params, macs or latency, got {self.keep_kind!r}")
        for name in ("warmup_epochs", "prune_epochs", "finetune_epochs", "lr_warmup_epochs"):
            if getattr(self, name) < 0:
                raise UserError(
                    f"{name} must be >= 0, got {getattr(self, name)}: e.g. {name}=1 (epochs)"
                )
        for name in ("prune_steps", "batch_size", "score_refresh", "min_channels", "round_to"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}: e.g. {name}=1")
        if self.score_normalization not in ("mean", "max", "none"):
            raise UserError(
                f"score normalization must be mean, max or none, got {self.score_normalization!r}"
            )
        if self.taylor_form not in ("group", "bn"):
            raise UserError(f"taylor form must be 'group' or 'bn', got {self.taylor_form!r}")
        o = self.optimizer
        if o.lr <= 0 or o.rho < 0 or not 0 <= o.rho_min <= o.rho_max:
            raise UserError(
                f"need lr > 0, rho >= 0 and 0 <= rho_min <= rho_max; got lr={o.lr}, rho={o.rho}, "
                f"rho_min={o.rho_min}, rho_max={o.rho_max}"
            )
        if o.normalization not in ("global", "neuron"):
            raise UserError(
                f"perturbation normalization must be global or neuron, got {o.normalization!r}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
class _Loop:
    """Epoch-by-epoch training shared by dense training and the pruning phases.

    With a checkpoint path it saves its owner's state after every epoch and when a stop is
    requested (SIGINT/SIGTERM) between two steps, so a run continues where it stopped and,
    on the CPU, ends with the same weights as an uninterrupted run.
    """

    model: nn.Module
    data: Any
    s: PruneSettings
    device: torch.device
    channels_last: bool
    schedule: CosineSchedule
    scaler: torch.amp.GradScaler | None
    checkpoint: Path | None = None
    owner_state: Callable[[], dict[str, Any]] = dict
    should_stop: Callable[[], bool] = lambda: False
    step: int = 0
    epoch: int = 0
    partial: EpochStats | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    seconds_before: float = 0.0

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
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, {"loop": self.state(), **self.owner_state()})

    def run(
        self,
        progress,
        phase: str,
        end: int,
        optimizer_ref: Callable[[], torch.optim.Optimizer],
        log: Callable[[dict[str, Any]], Any],
        extra: Callable[[], dict[str, Any]],
        label: str,
        **hooks: Any,
    ) -> None:
        """Train until global step ``end``, logging one record per (possibly partial) epoch."""
        spe = steps_per_epoch(self.data.train, self.s.batch_size)
        while self.step < end:
            count = min(spe, end - self.step)
            try:
                stats = train_steps(
                    self.model,
                    optimizer_ref,
                    self.data.train,
                    steps=count,
                    batch_size=self.s.batch_size,
                    generator=torch.Generator().manual_seed(self.s.seed * 100_003 + self.epoch),
                    device=self.device,
                    schedule=self.schedule,
                    first_step=self.step,
                    label_smoothing=self.s.label_smoothing,
                    amp=self.s.amp,
                    channels_last=self.channels_last,
                    scaler=self.scaler,
                    resume=self.partial,
                    should_stop=self.should_stop,
                    progress=progress,
                    description=f"{label} ep{self.epoch + 1}",
                    **hooks,
                )
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
            val = evaluate(
                self.model, self.data.val, device=self.device, channels_last=self.channels_last
            )
            record = {
                "phase": phase,
                "epoch": self.epoch,
                "step": self.step,
                "lr": self.schedule.lr_at(self.step - 1),
                "train_loss": stats.loss,
                "train_accuracy": stats.accuracy,
                "images_per_second": stats.images_per_second,
                "val_accuracy": val,
                **extra(),
                "seconds": self.elapsed(),
            }
            self.history.append(record)
            self.save()
            log(record)


def _replay_pruning(model: nn.Module, history: list[list[Any]], example: torch.Tensor) -> None:
    """Apply a recorded pruning history to an unpruned copy of the same model."""
    if history:
        was_training = model.training
        model.eval()
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        graph.load_pruning_history(history)
        model.train(was_training)


class _Run:
    """The mutable state of one pruning run; ``prune()`` is its only user."""

    def __init__(
        self,
        model: nn.Module,
        data,
        settings: PruneSettings,
        ignored_layers: Sequence[nn.Module] | None,
        log: Callable[[dict[str, Any]], None],
        checkpoint: Path | None = None,
    ) -> None:
        self.s = settings
        self.checkpoint = checkpoint
        self.data = data
        self.log = log
        self.device = resolve_device(settings.device)
        self.reference = model
        self.spe = steps_per_epoch(data.train, settings.batch_size)  # enough training images?
        self.model = prepare_model(copy.deepcopy(model), self.device, self.channels_last)
        self.example = next(iter(_example_batches(data.train, self.device)))
        if ignored_layers is None:
            classifier = find_classifier(self.model, data.spec.num_classes)
            if classifier is None:
                raise UserError(
                    f"found no classifier with {data.spec.num_classes} outputs (the dataset's "
                    "classes) to protect from pruning: pass ignored_layers=[the output layer], "
                    "or a model with one output per class"
                )
            ignored_layers = [classifier]
        else:
            by_id = dict(zip(map(id, model.modules()), self.model.modules(), strict=True))
            ignored_layers = [by_id[id(m)] for m in ignored_layers]
        self.ignored = list(ignored_layers)
        self.layout = NeuronLayout(self.model, self.example, self.ignored)
        if not self.layout.groups:
            raise UserError(
                "the model has no prunable layers (no conv or linear outputs outside the "
                "ignored layers): pass a model with convolutions or fewer ignored layers"
            )
        self.dense = measure_size(self.model, self.example)
        # A latency budget is measured on this machine, on the device the model trains on.
        self.budget = (
            latency_budget(self.layout, self.example[:1], settings.keep, device=self.device.type)
            if settings.keep_kind == "latency"
            else None
        )
        self.target = (
            self.budget.target_ms
            if self.budget is not None
            else int(settings.keep * self.dense.of(settings.keep_kind))
        )
        self.size = self.dense
        check_target_reachable(self.layout, settings, self.dense, self.budget)
        self.pruning_history: list[list[Any]] = []
        self.phase_steps = [
            round(e * self.spe)
            for e in (settings.warmup_epochs, settings.prune_epochs, settings.finetune_epochs)
        ]
        total = sum(self.phase_steps)
        if total == 0:
            raise UserError("all phases have 0 epochs: give at least one phase some epochs")
        self.schedule = CosineSchedule(
            settings.optimizer.lr, total, round(settings.lr_warmup_epochs * self.spe)
        )
        start, length = self.phase_steps[0], self.phase_steps[1]
        count = settings.prune_steps if length >= settings.prune_steps else 1
        self.prune_at = {start + (j * length) // count: j + 1 for j in range(count)}
        self.prune_count = count
        self.finetune_start = start + length
        self.kinds = METHODS[settings.method]
        self.kind = self.kinds[0]
        self.optimizer = make_optimizer(self.model, self.kind, settings.optimizer)
        self.scaler = (
            torch.amp.GradScaler("cuda") if settings.amp and self.device.type == "cuda" else None
        )
        self.taylor = self._new_taylor()
        self.loop = _Loop(
            self.model,
            data,
            settings,
            self.device,
            self.channels_last,
            self.schedule,
            self.scaler,
            checkpoint=checkpoint,
            owner_state=self.state,
        )
        if checkpoint is not None and checkpoint.is_file():
            self.restore(load_checkpoint(checkpoint))

    def state(self) -> dict[str, Any]:
        """Everything besides the loop's counters that a resumed run needs."""
        radii = getattr(self.optimizer, "neuron_radii", None)
        return {
            "settings": _comparable(self.s),
            "model": self.model.state_dict(),
            "optimizer": named_optimizer_state(self.model, self.optimizer),
            "kind": self.kind,
            "pruning_history": self.pruning_history,
            "radii": radii,
            "taylor": None if self.taylor is None else self.taylor.state_dict(),
            "latency_ms": None
            if self.budget is None
            else [self.budget.dense_ms, self.budget.current_ms],
        }

    def restore(self, state: dict[str, Any]) -> None:
        if state["settings"] != _comparable(self.s):
            raise UserError(
                f"{self.checkpoint} was written with other settings: resume with the run's "
                "own config, or delete the checkpoint to start afresh"
            )
        if self.budget is not None:
            # the resumed run keeps the budget it started with, not a new noisy measurement
            self.budget.dense_ms, self.budget.current_ms = state["latency_ms"]
            self.target = self.budget.target_ms
        self.pruning_history = state["pruning_history"]
        _replay_pruning(self.model, self.pruning_history, self.example)
        self.model.load_state_dict(state["model"])
        prepare_model(self.model, self.device, self.channels_last)
        self.layout = NeuronLayout(self.model, self.example, self.ignored)
        self.size = measure_size(self.model, self.example)
        self._replace_optimizer(state["kind"], state["optimizer"])
        self.taylor = self._new_taylor()
        if self.taylor is not None and state["taylor"] is not None:
            self.taylor.load_state_dict(state["taylor"])
        if isinstance(self.optimizer, AdaSAP) and state["radii"] is not None:
            self.optimizer.set_radii(self.layout.ownership(), state["radii"])
        self.loop.restore(state["loop"])

    @property
    def channels_last(self) -> bool:
        return self.s.channels_last and self.device.type == "cpu"

    def _new_taylor(self) -> TaylorImportance | None:
        if self.s.criterion != "taylor":
            return None
        taylor = TaylorImportance(taylor_form=self.s.taylor_form)
        taylor.reset(self.layout)
        return taylor

    def _scores(self) -> torch.Tensor:
        if self.taylor is not None and self.taylor.batches == 0:
            self._collect_taylor_gradients(count=4)
        raw = (self.taylor or make_importance(self.s.criterion))(self.layout)
        return normalize_scores(raw, self.layout, self.s.score_normalization)

    def _collect_taylor_gradients(self, count: int) -> None:
        """Taylor scores need gradients; before any training step, take a few without updating."""
        criterion = nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(self.s.seed)
        for index, (x, y) in enumerate(
            batches(
                self.data.train,
                self.s.batch_size,
                shuffle=True,
                generator=generator,
                augment=False,
                device=self.device,
            )
        ):
            if index >= count:
                break
            self.model.zero_grad(set_to_none=True)
            criterion(self.model(x), y).backward()
            self.taylor.accumulate(self.layout)
        self.model.zero_grad(set_to_none=True)

    def _refresh_radii(self) -> None:
        if not isinstance(self.optimizer, AdaSAP):
            return
        scores = self._scores()
        group_index = self.layout.group_index() if self.s.per_layer_radii else None
        radii = radii_from_scores(
            scores, self.s.optimizer.rho_min, self.s.optimizer.rho_max, group_index
        )
        self.optimizer.set_radii(self.layout.ownership(), radii)

    def _replace_optimizer(
        self, kind: OptimizerKind, state: dict[str, Any], kept: dict | None = None
    ) -> None:
        """A new optimizer of ``kind`` for the current parameters, with the old momentum."""
        self.kind = kind
        self.optimizer = make_optimizer(self.model, kind, self.s.optimizer)
        transfer_optimizer_state(state, kept or {}, self.model, self.optimizer)

    def _prune(self, step_number: int) -> None:
        kind = self.s.keep_kind
        if self.budget is not None:
            dense = self.budget.dense_ms
            target = dense - (dense - self.target) * step_number / self.prune_count
            chosen = self.budget.select(
                self.layout, self._scores(), target, self.s.min_channels, self.s.round_to
            )
        else:
            dense = self.dense.of(kind)
            target = round(dense - (dense - self.target) * step_number / self.prune_count)
            chosen = select_neurons(
                self.layout,
                self._scores(),
                target,
                size_predictor(self.layout, self.size, kind),
                kind,
                self.s.min_channels,
                self.s.round_to,
            )
        state = named_optimizer_state(self.model, self.optimizer)
        kept = remove_neurons(self.layout, chosen)
        self.pruning_history.extend(self.layout.graph.pruning_history())
        prepare_model(self.model, self.device, self.channels_last)
        self.layout = NeuronLayout(self.model, self.example, self.ignored)
        self.size = measure_size(self.model, self.example)
        self._replace_optimizer(self.kind, state, kept)
        self.taylor = self._new_taylor()
        self._refresh_radii()

    def before_step(self, step: int) -> None:
        if step == self.finetune_start and self.kind != self.kinds[1]:
            self._replace_optimizer(
                self.kinds[1], named_optimizer_state(self.model, self.optimizer)
            )
        if step in self.prune_at:
            self._prune(self.prune_at[step])
        elif isinstance(self.optimizer, AdaSAP) and step % self.s.score_refresh == 0:
            self._refresh_radii()

    def size_label(self) -> str:
        if self.budget is not None:
            return f"latency {self.budget.current_ms / self.budget.dense_ms:.2f} (predicted)"
        fraction = self.size.of(self.s.keep_kind) / max(self.dense.of(self.s.keep_kind), 1)
        return f"size {fraction:.2f}"

    def execute(self) -> PruneResult:
        loop = self.loop
        if loop.step == 0 and loop.partial is None:
            self._refresh_radii()
        for record in loop.history:  # a resumed run reports its earlier epochs too
            self.log(record)
        phase_ends = [sum(self.phase_steps[: i + 1]) for i in range(3)]
        with stop_requests() as should_stop, progress_bar(disable=not self.s.progress) as bar:
            loop.should_stop = should_stop
            for phase, end in zip(PHASES, phase_ends, strict=True):
                loop.run(
                    bar,
                    phase,
                    end,
                    lambda: self.optimizer,
                    self.log,
                    lambda: {
                        "optimizer": self.kind,
                        "params": self.size.params,
                        "macs": self.size.macs,
                    },
                    label=f"{self.s.method} {phase}",
                    before_step=self.before_step,
                    after_first_backward=self.taylor_hook,
                    size_label=self.size_label,
                )
        self.model.eval()
        history = loop.history
        latency = None
        if self.budget is not None:
            latency = self._final_latency()
        return PruneResult(
            model=self.model,
            dense_size=self.dense,
            size=self.size,
            target=self.target,
            history=history,
            pruning_history=self.pruning_history,
            seconds=loop.elapsed(),
            val_accuracy=history[-1]["val_accuracy"] if history else float("nan"),
            latency=latency,
        )

    def _final_latency(self) -> dict[str, float]:
        """The pruned model's latency against the budget, dense and pruned timed side by side.

        The dense latency measured at the start may have drifted with the machine's load over
        a long run; timing both again now keeps that drift out of the error. The prediction is
        rescaled to the new dense time.
        """
        (row,) = compare_latency(
            self.reference,
            self.model,
            tuple(self.example.shape[1:]),
            batch_sizes=(self.budget.table.batch_size,),
            device=self.device.type,
        ).rows
        dense_ms = row["dense_ms"]
        return {
            "dense_ms": dense_ms,
            "budget_ms": self.s.keep * dense_ms,
            "predicted_ms": self.budget.current_ms / self.budget.dense_ms * dense_ms,
            "measured_ms": row["pruned_ms"],
        }

    def taylor_hook(self) -> None:
        if self.taylor is not None:
            self.taylor.accumulate(self.layout)


# field annotation (a string, with postponed annotations) -> the types a value may have
def check_target_reachable(
    layout: NeuronLayout,
    settings: PruneSettings,
    dense: ModelSize,
    budget: LatencyBudget | None = None,
) -> None:
    """Raise :class:`UserError` when ``settings.keep`` would empty a layer of ``layout``.

    The last removal step would find out after hours of training; this asks the same question
    of the dense layout (the floor depends on channel counts, not on weights or scores) before
    any. ``budget`` is the latency budget when ``keep_kind`` is ``latency``.
    """
    equal = torch.ones(layout.num_neurons)
    s = settings
    if budget is not None:
        copy.copy(budget).select(layout, equal, None, s.min_channels, s.round_to)
        return
    predict = size_predictor(layout, dense, s.keep_kind)
    target = int(s.keep * dense.of(s.keep_kind))
    select_neurons(layout, equal, target, predict, s.keep_kind, s.min_channels, s.round_to)


_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "float": ((int, float), "a number"),
    "int": ((int,), "an integer"),
    "str": ((str,), "a string"),
    "bool": ((bool,), "True or False"),
    "float | None": ((int, float, type(None)), "a number or None"),
}


def _check_types(settings: PruneSettings | OptimizerSettings) -> None:
    """Numbers where numbers belong (``True`` is not a number here), strings where strings."""
    for f in fields(settings):
        if f.type not in _TYPES:
            continue
        allowed, described = _TYPES[f.type]
        value = getattr(settings, f.name)
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            raise UserError(
                f"{f.name} must be {described}, got {value!r} ({type(value).__name__}): pass "
                f"e.g. {f.name}={f.default!r}"
            )


def _comparable(settings: PruneSettings) -> dict[str, Any]:
    """The settings that must match for a checkpoint to be resumed (display ones excluded)."""
    values = settings.to_dict()
    values.pop("progress")
    return values


def _example_batches(images_set, device: torch.device):
    for x, _ in batches(images_set, 2, shuffle=False, generator=None, augment=False, device=device):
        yield x


def with_overrides(settings: PruneSettings, overrides: dict[str, Any]) -> PruneSettings:
    """Replace fields of ``settings`` or of its ``optimizer`` (lr, rho, ...) by name."""
    optimizer_fields = {f.name for f in fields(OptimizerSettings)}
    own_fields = {f.name for f in fields(PruneSettings)}
    unknown = sorted(set(overrides) - optimizer_fields - own_fields)
    if unknown:
        allowed = sorted(optimizer_fields | own_fields)
        raise UserError(
            f"unknown setting(s) {', '.join(unknown)}: allowed are {', '.join(allowed)}"
        )
    optimizer = replace(
        settings.optimizer, **{k: v for k, v in overrides.items() if k in optimizer_fields}
    )
    own = {k: v for k, v in overrides.items() if k in own_fields and k != "optimizer"}
    return replace(settings, optimizer=optimizer, **own)


def prune(
    model: nn.Module,
    data,
    settings: PruneSettings | None = None,
    *,
    ignored_layers: Sequence[nn.Module] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    **overrides: Any,
) -> PruneResult:
    """Prune a dense model with AdaSAP (or a baseline) and return the smaller model.

    Args:
        model: a trained dense model taking images in [0, 1] (not modified; a copy is pruned).
            Any ``nn.Module`` that Torch-Pruning can trace works.
        data: a :class:`adasap.data.DataBundle` (its ``train`` split trains, ``val`` monitors).
        settings: a :class:`PruneSettings`; keyword ``overrides`` replace single fields,
            e.g. ``prune(model, data, method="sgd", keep=0.3)``.
        ignored_layers: modules whose outputs are never pruned; by default the classifier.
        log: called with one dict per epoch (phase, losses, accuracies, size, speed).
        checkpoint_dir: save a checkpoint there after every epoch and on SIGINT/SIGTERM; a
            checkpoint found there is resumed (with the same settings and dense model).

    Returns:
        A :class:`PruneResult` with the pruned model, its measured size, per-epoch history and
        the pruning history (to replay the pruning on a fresh copy of the base model).
    """
    settings = with_overrides(settings or PruneSettings(), overrides).validate()
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    run = _Run(model, data, settings, ignored_layers, log or (lambda record: None), checkpoint)
    return run.execute()


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]
    seconds: float
    val_accuracy: float


def train(
    model: nn.Module,
    data,
    *,
    epochs: float = 10.0,
    settings: PruneSettings | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a dense model with SGD: the starting point that :func:`prune` takes.

    It uses the same loop, schedule and settings as pruning (lr, batch size, label smoothing,
    seed, device ...), so a dense model and its pruned versions are trained alike.
    ``checkpoint_dir`` works as for :func:`prune`.
    """
    s = with_overrides(settings or PruneSettings(), overrides).validate()
    if epochs <= 0:
        raise UserError(f"epochs must be > 0, got {epochs}")
    log = log or (lambda record: None)
    device = resolve_device(s.device)
    channels_last = s.channels_last and device.type == "cpu"
    torch.manual_seed(s.seed)
    model = prepare_model(model, device, channels_last)
    optimizer = make_optimizer(model, "sgd", s.optimizer)
    spe = steps_per_epoch(data.train, s.batch_size)
    total = round(epochs * spe)
    schedule = CosineSchedule(s.optimizer.lr, total, round(s.lr_warmup_epochs * spe))
    scaler = torch.amp.GradScaler("cuda") if s.amp and device.type == "cuda" else None
    identity = {"settings": _comparable(s), "epochs": epochs}
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    loop = _Loop(
        model,
        data,
        s,
        device,
        channels_last,
        schedule,
        scaler,
        checkpoint=checkpoint,
        owner_state=lambda: {
            **identity,
            "model": model.state_dict(),
            "optimizer": named_optimizer_state(model, optimizer),
        },
    )
    if checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        if {k: state.get(k) for k in identity} != identity:
            raise UserError(
                f"{checkpoint} was written with other settings: delete it to train afresh"
            )
        model.load_state_dict(state["model"])
        transfer_optimizer_state(state["optimizer"], {}, model, optimizer)
        loop.restore(state["loop"])
        for record in loop.history:
            log(record)
    with stop_requests() as should_stop, progress_bar(disable=not s.progress) as bar:
        loop.should_stop = should_stop
        loop.run(bar, "dense", total, lambda: optimizer, log, dict, label="dense")
    model.eval()
    history = loop.history
    return TrainResult(model, history, loop.elapsed(), history[-1]["val_accuracy"])
