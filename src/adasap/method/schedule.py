"""When each AdaSAP phase runs, counted in optimizer steps (independent of how data arrives)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from adasap.errors import UserError

Phase = Literal["warmup", "prune", "finetune"]
PHASES: tuple[Phase, ...] = ("warmup", "prune", "finetune")


@dataclass(frozen=True)
class PhaseSchedule:
    """Phase lengths in steps and the number of removal steps spread over the pruning phase.

    Phase 1 (``warmup``) trains with the adaptive perturbation, phase 2 (``prune``) goes on
    training and removes neurons ``removals`` times at evenly spaced steps (the first at its
    start), phase 3 (``finetune``) fine-tunes the pruned network. When phase 2 is shorter
    than ``removals`` steps, everything is removed once, at its start. ``removals=0`` never
    removes anything (dense training).
    """

    warmup: int
    prune: int
    finetune: int
    removals: int = 4

    def __post_init__(self) -> None:
        for name in ("warmup", "prune", "finetune", "removals"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"schedule {name} must be an integer >= 0 steps, got {value!r}")
        if self.total_steps == 0:
            raise UserError("all phases have 0 steps: give at least one phase some steps")

    @classmethod
    def from_epochs(
        cls,
        warmup: float,
        prune: float,
        finetune: float,
        steps_per_epoch: int,
        removals: int = 4,
    ) -> PhaseSchedule:
        """Phase lengths given in (possibly fractional) epochs of ``steps_per_epoch`` steps."""
        if steps_per_epoch < 1:
            raise UserError(f"steps per epoch must be >= 1, got {steps_per_epoch}")
        return cls(
            *(round(epochs * steps_per_epoch) for epochs in (warmup, prune, finetune)),
            removals=removals,
        )

    @property
    def total_steps(self) -> int:
        return self.warmup + self.prune + self.finetune

    @property
    def finetune_start(self) -> int:
        return self.warmup + self.prune

    @property
    def removal_count(self) -> int:
        if self.removals == 0:
            return 0
        return self.removals if self.prune >= self.removals else 1

    def removal_steps(self) -> dict[int, int]:
        """``{step: j}``: before global step ``step`` the j-th of the removals happens."""
        count = self.removal_count
        return {self.warmup + (j * self.prune) // count: j + 1 for j in range(count)}

    def phase_at(self, step: int) -> Phase:
        if step < self.warmup:
            return "warmup"
        return "prune" if step < self.finetune_start else "finetune"

    def phase_end(self, phase: Phase) -> int:
        """The global step at which ``phase`` ends (exclusive)."""
        return {"warmup": self.warmup, "prune": self.finetune_start}.get(phase, self.total_steps)
