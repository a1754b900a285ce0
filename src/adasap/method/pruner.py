"""AdaSAP as one object that runs inside any training loop.

The :class:`Pruner` owns everything the method adds to training: the sharpness-aware
optimizer around the user's base optimizer, the per-neuron radii and their refresh, gradient
scores (Taylor), the removal schedule, the physical removal, and the rebuild of the optimizer
(and LR scheduler) after each removal with the surviving channels' momentum. A loop calls
``pruner.step(closure)`` once per batch, where the closure returns the batch's loss::

    pruner = adasap.Pruner(model, example_images, adasap.PhaseSchedule(100, 200, 300),
                           optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.05,
                           "momentum": 0.9}, keep=0.5)
    for images, labels in loader:
        pruner.step(lambda: F.cross_entropy(model(images), labels))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from adasap.alignment import resolve_round_to
from adasap.errors import UserError, quote
from adasap.method.base_optimizer import (
    BaseOptimizer,
    OptimizerKind,
    base_of,
    finetune_differs,
)
from adasap.method.cheap_sam import (
    StepPlan,
    check_fraction_closure,
    has_direction,
)
from adasap.method.data_parallel import DataParallel
from adasap.method.distillation import Distillation, check_same_teacher
from adasap.method.examples import Example, check_example
from adasap.method.failures import no_prunable_layers
from adasap.method.importance import (
    DEFAULT_CRITERION,
    Importance,
    check_scores,
    make_importance,
    needs_gradients,
    normalize_scores,
    radii_from_scores,
)
from adasap.method.neurons import NeuronLayout
from adasap.method.onednn_guard import guard_strided_pointwise_convs
from adasap.method.optim import SAM, AdaSAP
from adasap.method.output_layers import default_ignored_layers
from adasap.method.pruner_settings import METHODS, PrunerSettings
from adasap.method.pruning import (
    is_channels_last,
    measure_size,
    named_optimizer_state,
    remove_neurons,
    replay_pruning,
    transfer_optimizer_state,
)
from adasap.method.schedule import PhaseSchedule
from adasap.method.step import sharpness_aware_step
from adasap.method.target import PruningTarget, SizeTarget, fitting_round_to

Loss = Tensor | Mapping[str, Tensor]
# parameter-group keys that belong to the optimizer kind, not carried over when it changes
_OWN_KEYS = ("params", "rho", "adaptive", "eta")


def loss_total(loss: Loss) -> Tensor:
    """A scalar loss, or the sum of a dict of losses (as torchvision detectors return)."""
    if isinstance(loss, Mapping):
        loss = sum(loss.values())
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise UserError(
            f"the closure returned {type(loss).__name__}, not a scalar loss: return "
            "loss_fn(model(images), labels) (a dict of losses is summed)"
        )
    return loss.reshape(())


class Pruner:
    """AdaSAP (or a baseline, by ``method``) inside any loop; see the module docstring.

    Args:
        model: the dense model, pruned in place (any module Torch-Pruning can trace).
        example_inputs: a batch the model accepts, on its device (for tracing and sizes): a
            tensor, or for a torchvision detector a list of images (docs/detection.md).
        schedule: the phases in steps (:meth:`PhaseSchedule.from_epochs` converts epochs).
        method: ``adasap``, ``sam``, ``sgd`` (the base optimizer only) or an ablation.
        keep: the fraction of ``settings.keep_kind`` to keep, or a :class:`PruningTarget`.
        criterion: a registered criterion name or a callable ``layout -> scores``.
        optimizer: the base optimizer class, or a built optimizer whose class, defaults and
            parameter groups are reused.
        optimizer_kwargs: keyword arguments of the base optimizer class (lr, momentum ...).
        lr_scheduler: ``base optimizer -> scheduler``, stepped once per :meth:`step` and
            rebuilt with its state after each removal or phase change.
        ignored_layers: modules whose outputs are never pruned (default: the output layers).
        scaler: a ``torch.amp.GradScaler`` for float16 autocast on CUDA.
        teacher: what ``distill_weight > 0`` distils from (default: ``model`` as given, the
            dense model); copied and frozen (:meth:`distill_loss`). Unused at weight 0.
        settings: :class:`PrunerSettings`; keyword ``overrides`` replace single fields.

    ``round_to`` is the channel multiple every removal keeps (``settings.round_to``, auto
    resolved for ``settings.runtime`` on the model's device).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Example,
        schedule: PhaseSchedule,
        *,
        method: str = "adasap",
        keep: float | PruningTarget = 0.5,
        criterion: str | Importance = DEFAULT_CRITERION,
        optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer = torch.optim.SGD,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        ignored_layers: Sequence[nn.Module] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        teacher: nn.Module | None = None,
        settings: PrunerSettings | None = None,
        **overrides: Any,
    ) -> None:
        unknown = sorted(set(overrides) - {f.name for f in fields(PrunerSettings)})
        if unknown:
            raise UserError(f"unknown pruner setting(s) {', '.join(unknown)}")
        self.settings = s = replace(settings or PrunerSettings(), **overrides)
        if method not in METHODS:
            raise UserError(f"unknown method {quote(method)}: choose one of {', '.join(METHODS)}")
        check_example(example_inputs)
        self.model, self.example, self.schedule = model, example_inputs, schedule
        self.method, self.kinds, self.kind = method, METHODS[method], METHODS[method][0]
        self.scaler, self.make_scheduler = scaler, lr_scheduler
        self.ignored = list(ignored_layers or default_ignored_layers(model, example_inputs))
        self.layout = self._trace()
        # copied now, before any removal: the dense model as the run began (resume checks it)
        self.distillation = Distillation.of(s, model if teacher is None else teacher)
        self.round_to = resolve_round_to(s.round_to, s.runtime, next(model.parameters()).device)
        self.importance = make_importance(criterion, taylor_form=s.taylor_form)
        self._reset_importance()
        self.target = SizeTarget(keep, s.keep_kind) if isinstance(keep, int | float) else keep
        self.size = measure_size(model, example_inputs)  # measured again after each removal
        if isinstance(self.target, SizeTarget):
            self.target.bind(self.size)
        if schedule.removal_count:
            self.round_to = fitting_round_to(
                self.target, self.layout, s.min_channels, self.round_to, auto=s.round_to == "auto"
            )
        self._base = BaseOptimizer.of(model, optimizer, optimizer_kwargs)
        self.finetuning = False  # whether the optimizer is phase 3's (finetune_* settings)
        self.optimizer = self._build_optimizer(self.kind)
        self.lr_scheduler = lr_scheduler(base_of(self.optimizer)) if lr_scheduler else None
        self.steps_done = 0
        self.plan = StepPlan(s, schedule.total_steps)
        self.pruning_history: list[list[Any]] = []
        self._radii_due = True
        self._removal_hooks: list[Callable[[Pruner], None]] = []
        self.ddp: DataParallel | None = None  # set by distribute()

    def _trace(self) -> NeuronLayout:
        guard_strided_pointwise_convs(self.model)  # pruning may have made such layers
        layout = NeuronLayout(self.model, self.example, self.ignored, self.settings.trace_budget)
        if not layout.groups:
            raise no_prunable_layers(self.model, self.ignored)
        return layout

    def _reset_importance(self) -> None:
        if needs_gradients(self.importance):
            self.importance.reset(self.layout)

    def _build_optimizer(self, kind: OptimizerKind) -> torch.optim.Optimizer:
        return self._base.build(kind, self.model, self.settings, finetuning=self.finetuning)

    def _replace_optimizer(
        self,
        kind: OptimizerKind,
        old_state: Mapping[str, dict[str, Any]] | None = None,
        kept: Mapping[str, dict[int, Tensor]] | None = None,
    ) -> None:
        """A new optimizer of ``kind`` for the current parameters, keeping momentum and lr.

        ``old_state`` is the old optimizer's state by parameter name, taken before a removal
        replaced the parameters; ``kept`` the surviving channels (see ``remove_neurons``).
        """
        old = self.optimizer
        if old_state is None:
            old_state = named_optimizer_state(self.model, old)
        self.kind, self.optimizer = kind, self._build_optimizer(kind)
        transfer_optimizer_state(old_state, kept or {}, self.model, self.optimizer)
        if self.lr_scheduler is not None:
            scheduler_state = self.lr_scheduler.state_dict()
            self.lr_scheduler = self.make_scheduler(base_of(self.optimizer))
            self.lr_scheduler.load_state_dict(scheduler_state)
        for new_group, old_group in zip(self.optimizer.param_groups, old.param_groups, strict=True):
            new_group.update({k: v for k, v in old_group.items() if k not in _OWN_KEYS})

    def register_removal_hook(self, hook: Callable[[Pruner], None]) -> None:
        """Call ``hook(pruner)`` after each removal (to rebuild a DDP wrapper, recompile ...)."""
        self._removal_hooks.append(hook)

    def distribute(
        self, wrap: Callable[[nn.Module], nn.Module] | None = None, **ddp_kwargs: Any
    ) -> DataParallel:
        """Train data-parallel (torch.distributed initialised, one process per device).

        Returns the model under ``DistributedDataParallel(model, **ddp_kwargs)`` (or
        ``wrap(model)``), rebuilt after each removal: call it, not the model, in the closure.
        The ascent pass stays on each rank unless ``sync_ascent``; Taylor scores are averaged
        over the ranks; after each removal the ranks must hold the same model (UserError).
        """
        self.ddp = DataParallel(self, wrap, **ddp_kwargs)
        return self.ddp

    def scores(self) -> Tensor:
        """The current normalised scores of every neuron (higher is more important)."""
        raw = check_scores(self.importance(self.layout), self.layout)
        return normalize_scores(raw, self.layout, self.settings.score_normalization)

    def _refresh_radii(self) -> None:
        s = self.settings
        group_index = self.layout.group_index() if s.per_layer_radii else None
        radii = radii_from_scores(self.scores(), s.rho_min, s.rho_max, group_index)
        self.optimizer.set_radii(self.layout.ownership(), radii)
        self._radii_due = False

    def _after_first_backward(self) -> None:
        """Gradients at the unperturbed weights are present: score and set the radii."""
        if needs_gradients(self.importance) and self.steps_done < self.schedule.finetune_start:
            self.importance.accumulate(self.layout)
        if isinstance(self.optimizer, AdaSAP) and self._radii_due:
            self._refresh_radii()

    def _gradient_pass(self, closure: Callable[[], Loss]) -> None:
        """Scores from gradients when none were accumulated yet (removal at the first step)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_total(closure()).backward()
        self.importance.accumulate(self.layout)
        self.optimizer.zero_grad(set_to_none=True)

    def remove(self, progress: float, closure: Callable[[], Loss] | None = None) -> Tensor:
        """Remove the neurons that bring the size ``progress`` of the way to the target."""
        if needs_gradients(self.importance) and not self.importance.ready:
            if closure is None:
                raise UserError("gradient scores need a closure before the first removal")
            self._gradient_pass(closure)
        rules = (self.settings.min_channels, self.round_to)
        chosen = self.target.select(self.layout, self.scores(), progress, *rules)
        channels_last = is_channels_last(self.model)
        old_state = named_optimizer_state(self.model, self.optimizer)
        kept = remove_neurons(self.layout, chosen)
        self.pruning_history.extend(self.layout.graph.pruning_history())
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.layout = self._trace()
        self.size = measure_size(self.model, self.example)
        self.target.removed(self.layout, self.size)
        self._replace_optimizer(self.kind, old_state, kept)
        self._reset_importance()
        self._radii_due = True
        for hook in self._removal_hooks:
            hook(self)
        return chosen

    def _before_step(self, step: int, closure: Callable[[], Loss]) -> None:
        if step == self.schedule.finetune_start and not self.finetuning:
            self.finetuning, kind = True, self.kinds[1]
            if kind != self.kind or (kind != "sgd" and finetune_differs(self.settings)):
                self._replace_optimizer(kind)
        removal = self.schedule.removal_steps().get(step)
        if removal is not None:
            self.remove(removal / self.schedule.removal_count, closure)
        elif step % self.settings.score_refresh == 0:
            self._radii_due = True

    def distill_loss(self, student_logits: Tensor, teacher_input: Any, loss: Tensor) -> Tensor:
        """``loss`` with distillation from the dense model mixed in (``distill_weight``).

        Call it in the closure with the model's logits, the whole batch's input (the teacher
        runs on it once per step, whatever the passes) and the label loss::

            def closure():
                logits = model(images)
                return pruner.distill_loss(logits, images, F.cross_entropy(logits, labels))

        Returns ``loss`` itself at weight 0, before ``distill_from`` and outside :meth:`step`.
        """
        if self.distillation is None:
            return loss
        return self.distillation.loss(student_logits, teacher_input, loss)

    def step(self, closure: Callable[..., Loss]) -> Tensor:
        """One training step on the current batch; returns the first pass's loss, detached.

        ``closure`` computes the loss of the current batch (forward only: the pruner runs
        the backward passes, two for a sharpness-aware step, with BatchNorm statistics
        frozen in the second). Removals and phase changes happen before the step they are
        scheduled at; afterwards ``self.optimizer`` is a new object. With
        ``ascent_fraction < 1`` the closure must also accept ``fraction=f`` and then return
        the loss of the first ``ceil(f * batch)`` rows (see :func:`cheap_sam.sub_batch`).
        """
        if self.distillation is None:
            return self._step(closure)
        with self.distillation.batch(self.schedule.phase_at(self.steps_done)):
            return self._step(closure)

    def _step(self, closure: Callable[..., Loss]) -> Tensor:
        s = self.settings
        if s.ascent_fraction < 1:
            check_fraction_closure(closure, s.ascent_fraction)
        self._before_step(self.steps_done, closure)
        kind = "plain"
        if isinstance(self.optimizer, SAM):
            kind = self.plan.kind(self.steps_done, has_direction(self.optimizer.state))
        sub_batch = kind == "ascent" and s.ascent_fraction < 1
        loss = sharpness_aware_step(
            self.model,
            self.optimizer,
            lambda: loss_total(closure()),
            scaler=self.scaler,
            max_grad_norm=s.max_grad_norm,
            after_first_backward=self._after_first_backward,
            ascent=kind == "ascent",
            ascent_loss=(lambda: loss_total(closure(fraction=s.ascent_fraction)))
            if sub_batch
            else None,
            looksam_alpha=s.looksam_alpha if s.sam_every > 1 and kind != "plain" else None,
            first_pass=self.ddp.first_pass() if self.ddp and kind == "ascent" else None,
        )
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.steps_done += 1
        return loss

    def describe(self) -> str:
        return self.target.describe()

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume exactly, except the model's weights (save those yourself)."""
        importance = self.importance.state_dict() if needs_gradients(self.importance) else None
        return {
            "steps_done": self.steps_done,
            "kind": self.kind,
            "finetuning": self.finetuning,
            "pruning_history": list(self.pruning_history),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "importance": importance,
            "target": self.target.state_dict(),
            "radii_due": self._radii_due,
            "plan": self.plan.state_dict(),
            "round_to": self.round_to,
            "teacher": self.distillation.fingerprint if self.distillation else None,
            "neurons": self._numbering(),
        }

    def _numbering(self) -> list[list[Any]]:
        """The groups in neuron order, each its root's name and size: per-neuron state
        (scores, radii) means the same neurons only under the same numbering."""
        return [[g.name, g.size] for g in self.layout.groups]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a pruner on a fresh copy of the dense model: the removals are re-applied.

        Load this before the model's own ``state_dict``, whose shapes are the pruned ones.
        """
        check_same_teacher(self.distillation, state.get("teacher"))  # absent: older states
        history = state["pruning_history"]
        if self.pruning_history and self.pruning_history != history[: len(self.pruning_history)]:
            raise UserError(
                "this pruner has removed other neurons than the saved one: load the state "
                "into a pruner built on a fresh copy of the dense model"
            )
        if len(history) > len(self.pruning_history):
            replay_pruning(self.model, history, self.example, self.ignored)
            self.layout = self._trace()
            self.size = measure_size(self.model, self.example)
            if self.ddp is not None:
                self.ddp.rebuild()
        numbering = self._numbering()
        if state.get("neurons", numbering) != numbering:  # absent: states saved before it
            raise UserError(
                "the saved state numbers the model's neurons differently (saved by another "
                "adasap version, or for another model): delete the checkpoint to start over"
            )
        self.pruning_history = list(history)
        self.target.load_state_dict(state["target"])
        self.target.removed(self.layout, self.size)
        self.kind = state["kind"]
        self.finetuning = state.get("finetuning", False)  # absent: saved before finetune_*
        self.optimizer = self._build_optimizer(self.kind)
        if self.make_scheduler is not None:
            self.lr_scheduler = self.make_scheduler(base_of(self.optimizer))
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._reset_importance()
        if state["importance"] is not None:
            self.importance.load_state_dict(state["importance"])
        self.steps_done, self._radii_due = state["steps_done"], state["radii_due"]
        self.plan.load_state_dict(state["plan"])
        self.round_to = state.get("round_to", self.round_to)  # auto as where the run began
