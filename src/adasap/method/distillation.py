"""Distillation from the dense model: a KL term at a temperature, weighted against the label loss.

Fine-tuning a pruned network towards the dense network's outputs (Hinton et al. 2015, "Distilling
the Knowledge in a Neural Network") is the standard recipe of pruning papers and toolkits. The
loss of a step where it is on is the convex mix most of them use (Hinton's, torchdistill's
``KDLoss``, Keras' ``Distiller``)::

    (1 - w) * label_loss + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

so ``w`` in [0, 1] reads as the share of the loss that comes from the teacher (0: the label loss
alone, exactly as without distillation; 1: the teacher alone), and ``T^2`` keeps the soft term's
gradient on the scale of the label loss's whatever the temperature.

:class:`Distillation` holds a frozen copy of the teacher and runs it once per training batch, in
inference mode, however many passes the step makes (SAM's two). The
:class:`~adasap.method.pruner.Pruner` builds one from ``distill_weight`` and friends
(``PrunerSettings``), and a loop mixes the term in with ``pruner.distill_loss``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from collections.abc import Collection, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adasap.errors import UserError
from adasap.method.schedule import PHASES


def check_distillation(weight: float, temperature: float) -> None:
    """Raise :class:`UserError` for a weight outside [0, 1] or a temperature that is not > 0."""
    if not 0 <= weight <= 1:
        raise UserError(
            f"distill_weight must be in [0, 1], got {weight}: e.g. distill_weight=0.5 (0: off)"
        )
    if not 0 < temperature < math.inf:
        raise UserError(
            f"distill_temperature must be a finite number > 0, got {temperature}: e.g. 4"
        )


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, the mean over the batch.

    Both are ``batch x classes`` logits; computed in float32 whatever autocast made them.
    """
    if student_logits.shape != teacher_logits.shape:
        raise UserError(
            f"the student's logits {tuple(student_logits.shape)} and the teacher's "
            f"{tuple(teacher_logits.shape)} differ in shape: distil from a model with the "
            "same classes, fed the same images"
        )
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(student, teacher, reduction="batchmean", log_target=True)


def weights_fingerprint(model: nn.Module) -> str:
    """The sha256 of a model's state (names and values, layout and device aside): a resumed run
    checks with it that its teacher is the one the run began with."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        values = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_same_teacher(distillation: Distillation | None, saved: str | None) -> None:
    """Raise :class:`UserError` unless a saved state's teacher fingerprint (None: saved
    without distillation) is that of ``distillation``'s teacher: a resumed run must distil
    from the teacher it began with to continue exactly."""
    if saved != (distillation.fingerprint if distillation is not None else None):
        raise UserError(
            "the saved run was distilled from another teacher, or none: resume on the run's "
            "own dense model, with its distill_weight"
        )


class Distillation:
    """A frozen teacher mixed into the loss of the batches of some phases.

    Args:
        teacher: the model distilled from. It is copied, and the copy is never trained: eval
            mode (BatchNorm's running statistics stay), no gradients, in no optimizer.
        weight: ``w`` of the module docstring's loss, in [0, 1].
        temperature: ``T`` > 0; 4 is the usual choice for 10-100 classes.
        phases: the phases (``PhaseSchedule.phase_at`` names) whose batches are distilled.

    A training step runs inside :meth:`batch`, and its closure calls :meth:`loss` on every
    pass; the teacher runs on the first call and its logits serve the others.
    """

    def __init__(
        self,
        teacher: nn.Module,
        weight: float,
        temperature: float,
        phases: Collection[str] = ("prune", "finetune"),
    ) -> None:
        check_distillation(weight, temperature)
        unknown = sorted(set(phases) - set(PHASES))
        if unknown:
            raise UserError(
                f"unknown phase(s) {', '.join(unknown)} to distil in: choose from "
                f"{', '.join(PHASES)}"
            )
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.weight, self.temperature, self.phases = weight, temperature, frozenset(phases)
        self.fingerprint = weights_fingerprint(self.teacher)
        self._on = self._used = False
        self._logits: Tensor | None = None

    @classmethod
    def of(cls, settings: Any, teacher: nn.Module) -> Distillation | None:
        """What a ``PrunerSettings`` asks for (``distill_*``) from ``teacher``; None at weight 0
        (the teacher then never runs, so the step is exactly the one without distillation)."""
        if settings.distill_weight == 0:
            return None
        phases = PHASES[PHASES.index(settings.distill_from) :]
        return cls(teacher, settings.distill_weight, settings.distill_temperature, phases)

    @contextlib.contextmanager
    def batch(self, phase: str) -> Iterator[None]:
        """One training batch in ``phase``. Outside of it :meth:`loss` returns the label loss,
        so a loss computed elsewhere (validation) never sees a stale batch's teacher."""
        self._on, self._used, self._logits = phase in self.phases, False, None
        try:
            yield
            if self._on and not self._used:
                raise UserError(
                    "distillation is on (distill_weight > 0) but the step's closure did not "
                    "call pruner.distill_loss(logits, images, loss): call it there, or set "
                    "distill_weight 0"
                )
        finally:
            self._on, self._logits = False, None

    def loss(self, student_logits: Tensor, teacher_input: Any, label_loss: Tensor) -> Tensor:
        """The batch's loss with the teacher's term mixed in; ``label_loss`` itself off phase.

        ``teacher_input`` is the whole batch's input even when ``student_logits`` are of its
        first rows (a sharpness-aware ascent on a sub-batch): the teacher's logits are cut to
        the student's rows.
        """
        if not self._on:
            return label_loss
        self._used = True
        if self._logits is None:
            with torch.inference_mode():  # no autograd record, no version counters
                self._logits = self.teacher(teacher_input)
        rows = len(student_logits)
        if rows > len(self._logits):
            raise UserError(
                f"the student scored {rows} images but the teacher saw {len(self._logits)}: "
                "pass the whole batch's images to distill_loss on every pass"
            )
        soft = distillation_loss(student_logits, self._logits[:rows], self.temperature)
        return (1 - self.weight) * label_loss + self.weight * soft
