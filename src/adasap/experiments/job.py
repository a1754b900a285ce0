"""What the shared drivers (``adasap run``, ``train``, ``eval``, ``latency``, the grids) need of
a task at the experiments layer: its data, dense model recipe, evaluation row and timing.

One :class:`Job` per task, registered in :data:`JOBS` under the task's name
(:mod:`.classification_job`, :mod:`.detection_job`); the drivers in :mod:`.run`,
:mod:`.dense` and :mod:`.commands` are the same for every task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from rich.console import Console
from torch import nn

from adasap.errors import UserError
from adasap.registry import Registry
from adasap.tasks import Task

if TYPE_CHECKING:
    from adasap.deploy.comparison import LatencyComparison
    from adasap.experiments.config import ExperimentConfig
    from adasap.experiments.grid import Parallel
    from adasap.experiments.presets import BenchPreset
    from adasap.experiments.results import ResultRow


class Job(ABC):
    """A task's part of every experiment command."""

    # the task's scores in the results tables: (ResultRow field, column title); the tables' title
    scores: ClassVar[Sequence[tuple[str, str]]]
    title: ClassVar[str]
    # adasap bench --task <task> --preset <name>: the task's benchmark grids
    bench_presets: ClassVar[Mapping[str, BenchPreset]]
    # the task's own experiment defaults, over ExperimentConfig's (flat keys)
    defaults: ClassVar[Mapping[str, Any]] = {}

    @abstractmethod
    def claims(self, config: ExperimentConfig) -> str | None:
        """Why ``config``, set for another task, holds this task's model or data (e.g.
        "tiny_ssd is a detector"); None when it does not."""

    @abstractmethod
    def validate(self, config: ExperimentConfig) -> None:
        """Raise a one-line UserError for a setting this task cannot run."""

    @abstractmethod
    def load_data(self, config: ExperimentConfig) -> Any:
        """The config's data: a bundle with ``train``, ``val`` and ``test`` splits."""

    @abstractmethod
    def check(self, config: ExperimentConfig, data: Any) -> None:
        """What must hold before a new run directory is made (e.g. the keep target reachable)."""

    @abstractmethod
    def note(self, config: ExperimentConfig, data: Any) -> str | None:
        """The reduced setting in words, or None for the full data."""

    @abstractmethod
    def architecture(self, config: ExperimentConfig, data: Any) -> dict[str, Any]:
        """The arguments that build the config's model for the data (saved in ``model.json``)."""

    @abstractmethod
    def build(self, architecture: dict[str, Any]) -> nn.Module:
        """A fresh, untrained model of ``architecture``."""

    @abstractmethod
    def recipe(self, config: ExperimentConfig, data: Any) -> dict[str, Any]:
        """What makes the dense model what it is: the key of its cache entry."""

    @abstractmethod
    def training_task(self, config: ExperimentConfig, data: Any) -> Task:
        """The :class:`~adasap.tasks.Task` that trains and prunes the model."""

    @abstractmethod
    def example(self, config: ExperimentConfig, data: Any) -> Any:
        """The input every row's size is measured on (the same for every model of a run)."""

    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        data: Any,
        config: ExperimentConfig,
        out_dir: Path,
        label: str,
        official: tuple[str, str] | None = None,
        shifted: Any = None,
    ) -> ResultRow:
        """The row of ``label``: clean and corrupted scores (on ``official`` pre-rendered
        sets, ``(root, name)``, where given; ``shifted``: a distribution-shift test set);
        its reports go to ``out_dir/label``."""

    @abstractmethod
    def shifted_data(self, config: ExperimentConfig, data: Any, folder: str | Path) -> Any:
        """``adasap eval --imagenet-v2 FOLDER``'s images, as :meth:`evaluate` takes them."""

    @abstractmethod
    def check_fits(
        self, architecture: dict[str, Any], config: ExperimentConfig, data: Any, at: Path
    ) -> None:
        """Raise a one-line UserError when the model saved ``at`` was built for other data."""

    @abstractmethod
    def eval_config(self, config: ExperimentConfig, model_dir: Path) -> ExperimentConfig:
        """The config ``adasap eval`` evaluates the model saved in ``model_dir`` with."""

    @abstractmethod
    def timing_inputs(
        self, config: ExperimentConfig, data: Any
    ) -> tuple[tuple[int, ...], torch.Tensor | None]:
        """The input shape (C, H, W) the run table times its models on, and the images (None:
        random ones)."""

    def calibration_images(self, config: ExperimentConfig, data: Any) -> torch.Tensor:
        """Training images (``N x C x H x W`` in [0, 1], a few hundred, drawn as the run draws
        them, seeded) that calibrate a quantized model's activation ranges."""
        raise UserError(f"{config.task} models are not quantized: drop --int8")

    @abstractmethod
    def latency(
        self,
        run_dir: Path,
        models: dict[str, Path],
        *,
        batch_sizes: Sequence[int],
        runtimes: Sequence[str],
        device: str,
        repeats: int,
        console: Console,
    ) -> LatencyComparison:
        """``adasap latency``: the saved ``models`` beside their dense model, in each of
        ``runtimes``."""

    @abstractmethod
    def bench(
        self, preset: str, out: Path, console: Console, parallel: Parallel, report_only: bool
    ) -> Path:
        """``adasap bench``: the unfinished cells of ``preset`` into ``out`` (none with
        ``report_only``), then the report; its path."""


JOBS: Registry[Job] = Registry("task")


def job_of(config: ExperimentConfig) -> Job:
    """The job of the config's task."""
    return JOBS.get(config.task)
