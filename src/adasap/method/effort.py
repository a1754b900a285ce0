"""A bound on the effort of tracing a model and searching its dependency groups.

Torch-Pruning maps a group's channel indices through every reshape it meets, one Python object
per index, in one call (``get_pruning_group``). Where a reshape moves channels into the last
dimension it takes for a flattening and multiplies the indices: on torchvision's ``swin_t``
and ``maxvit_t`` the search from one layer ran for over ten minutes and grew the process by
12-21 GB without a word, single list comprehensions mapping 2 million indices to 64 million. A
budget of time and of resident memory turns that into one clear error naming the layer whose
search ran over, within about a minute.

Where the checks run: between groups and at every node the search expands (cooperatively,
in any thread), and, on the main thread of a POSIX system, from a ``SIGALRM`` handler every
quarter second, which Python runs between any two bytecodes, inside those comprehensions too
(:func:`checked_search`). The graph's build, whose tracing runs the model's forward with
Torch-Pruning's hooks attached, is not interrupted: it is measured, and checked once it returns.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from adasap.errors import UserError

try:
    import resource
except ImportError:  # Windows: no memory reading, so only the time budget holds
    resource = None

DEFAULT_SECONDS = 60.0  # a ResNet-50 traces and groups in about 5 s on a busy 2-core machine
DEFAULT_MEMORY_GIB = 4.0  # of resident memory gained while tracing and searching
_MEMORY_EVERY = 0.05  # seconds between readings of the resident size (a file read each)
_ALARM_EVERY = 0.25  # seconds between the checks of the alarm
_GIB = 2**30


@dataclass(frozen=True)
class EffortBudget:
    """How long (seconds) and how much resident memory (GiB gained) one trace of a model and
    the search of its dependency groups may take; None: no limit."""

    seconds: float | None = DEFAULT_SECONDS
    memory_gib: float | None = DEFAULT_MEMORY_GIB


DEFAULT_BUDGET = EffortBudget()


def check_budget(seconds: float | None, memory_gib: float | None) -> None:
    """Raise :class:`UserError` unless each limit is a positive number or None."""
    for name, value in (("trace_seconds", seconds), ("trace_memory_gib", memory_gib)):
        if value is not None and not value > 0:  # NaN fails too
            raise UserError(f"{name} must be a positive number or None (no limit), got {value!r}")


def resident_bytes() -> int | None:
    """The process's resident memory: on Linux its current size, elsewhere its peak (which can
    only miss growth, never invent it); None where neither can be read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, else KiB


class Effort:
    """One bounded trace and group search, started when made.

    ``part`` names what is being processed (``name (Type)`` of the layer whose group is being
    searched; None while the model is traced), so that the error can say what to leave out.
    """

    def __init__(self, budget: EffortBudget, model_type: str) -> None:
        self.budget, self.model_type = budget, model_type
        self.part: tuple[str, str] | None = None
        self.start = time.monotonic()
        self._memory_at = 0.0  # when the resident size is read next
        self._baseline = resident_bytes() if budget.memory_gib is not None else None

    def check(self) -> None:
        """Raise :class:`UserError` once the time or memory budget is spent."""
        now = time.monotonic()
        seconds, memory_gib = self.budget.seconds, self.budget.memory_gib
        if seconds is not None and now - self.start > seconds:
            spent = f"ran {now - self.start:.3g} s, past its budget of {seconds:g} s"
            raise self._error(spent, "trace_seconds", seconds)
        if self._baseline is None or now < self._memory_at:
            return
        self._memory_at = now + _MEMORY_EVERY
        grown = (resident_bytes() or 0) - self._baseline
        if grown > memory_gib * _GIB:
            spent = f"grew the process by {grown / _GIB:.3g} GiB, past its budget of "
            spent += f"{memory_gib:g} GiB"
            raise self._error(spent, "trace_memory_gib", memory_gib)

    def _error(self, spent: str, setting: str, limit: float) -> UserError:
        raise_it = (
            f"raise the budget ({setting}={2 * limit:g}, a Pruner or prune() keyword; "
            "None: no limit)"
        )
        if self.part is None:
            return UserError(
                f"tracing the model ({self.model_type}) with Torch-Pruning {spent}: {raise_it}, "
                "or prune a smaller model"
            )
        name, kind = self.part
        return UserError(
            f"Torch-Pruning's dependency search from {name} ({kind}) {spent}: leave that layer "
            f"unpruned with ignored_layers=[model.{name}], or {raise_it}"
        )


class _CheckedDependencies(list):
    """A node's dependency list that checks the effort whenever Torch-Pruning walks it."""

    def __init__(self, dependencies: list[Any], effort: Effort) -> None:
        super().__init__(dependencies)
        self.effort = effort

    def __iter__(self) -> Iterator[Any]:
        self.effort.check()
        return super().__iter__()


@contextmanager
def checked_search(graph: Any, effort: Effort) -> Iterator[None]:
    """Check ``effort`` while Torch-Pruning searches ``graph``'s groups: at every node its
    search expands, inside its one ``get_pruning_group`` call, by standing a checking list in
    for each node's dependencies (the search walks them, node by node), and from the alarm
    (:func:`_alarm`). The graph's own lists are back afterwards: removals run unchecked. With
    no limit at all, nothing is checked or set."""
    if effort.budget == EffortBudget(None, None):
        yield
        return
    nodes = list(graph.module2node.values())
    own = [node.dependencies for node in nodes]
    for node in nodes:
        node.dependencies = _CheckedDependencies(node.dependencies, effort)
    try:
        with _alarm(effort):
            yield
    finally:
        for node, dependencies in zip(nodes, own, strict=True):
            node.dependencies = dependencies


@contextmanager
def _alarm(effort: Effort) -> Iterator[None]:
    """Check ``effort`` every :data:`_ALARM_EVERY` seconds from a ``SIGALRM`` handler; only on
    the main thread (where Python runs handlers) of a system with ``setitimer``, and where the
    handler in place was set from Python (so that it can be put back). The previous handler and
    timer are put back, the timer less the time spent here (at once if it ran out meanwhile)."""
    main = threading.current_thread() is threading.main_thread()
    settable = hasattr(signal, "setitimer") and signal.getsignal(signal.SIGALRM) is not None
    if not (main and settable):
        yield
        return
    active = True

    def on_alarm(_signum: int, _frame: Any) -> None:
        if active:  # an alarm pending as the search ends does nothing
            effort.check()

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    delay, interval = signal.setitimer(signal.ITIMER_REAL, _ALARM_EVERY, _ALARM_EVERY)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        active = False
        signal.signal(signal.SIGALRM, previous)  # runs a pending alarm first: now a no-op
        if delay > 0:
            left = max(delay - (time.monotonic() - started), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, left, interval)
