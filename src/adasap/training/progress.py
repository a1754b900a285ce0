"""Training progress: a live bar on a terminal, one readable line per epoch in a log file.

Rich cuts a bar's columns to ``0:0…`` when stdout is not a terminal (CI, ``nohup``), so there
the loop prints a plain line per epoch instead.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def cell_progress(console: Console | None, disable: bool) -> Progress:
    """A transient bar over an evaluation's cells (corruption x severity): done of all, time."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=disable,
        transient=True,
    )


class ProgressLog:
    """Reports training: ``enabled=False`` prints nothing at all."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.console = console or Console(file=sys.stdout)
        self.live = enabled and self.console.is_terminal
        self.lines = enabled and not self.live
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
            disable=not self.live,
            transient=False,
        )
        self._label = ""

    def __enter__(self) -> ProgressLog:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def start(self, description: str, total: int) -> Any:
        self._label = description
        return self.bar.add_task(description, total=total, stats="")

    def update(self, task: Any, completed: int, stats: str) -> None:
        self.bar.update(task, completed=completed, stats=stats)

    def finish(self, task: Any, completed: int) -> None:
        self.bar.update(task, completed=completed)

    def epoch_done(self, record: dict[str, Any]) -> None:
        if not self.lines:
            return
        # the task's headline validation score: val_accuracy, val_map_50 ...
        val = next((v for k, v in record.items() if k.startswith("val_")), None)
        accuracy = record.get("train_accuracy")
        parts = [
            self._label,
            f"step {record['step']}",
            f"loss {record['train_loss']:.3f}",
            f"acc {accuracy:.3f}" if accuracy is not None else "",
            f"val {val:.3f}" if val is not None else "",
            f"{record['images_per_second']:.0f} img/s",
            f"{record['seconds']:.0f} s",
        ]
        print("  ".join(p for p in parts if p), file=self.console.file, flush=True)
