"""The ``Task`` interface: what a kind of problem supplies to the one shared loop and driver.

Like a ``LightningModule`` supplies loss, metrics and data to Lightning's ``Trainer``, a task
supplies the batch contract, the loss of a training step, the layers that are never pruned
and the scorer; the epoch loop (:mod:`adasap.training.loop`), the pipeline
(:mod:`adasap.training.pipeline`), the corruption evaluation and the drivers are shared by
every task. A new task is a subclass registered in :data:`TASKS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from adasap.data.batching import Shard
from adasap.data.sources import BatchSource
from adasap.method.target import PruningTarget
from adasap.registry import Registry


@dataclass
class StepOutput:
    """One training forward pass: its loss, the images it scored and how many were right
    (``None`` where the task has no training accuracy)."""

    loss: Tensor
    scored: int
    correct: Tensor | None = None


class Task(ABC):
    """One kind of problem (classification, detection ...), stateless but for its options."""

    name: ClassVar[str]
    # the headline metric of a clean evaluation: what a row's clean column and the per-epoch
    # ``val_<headline>`` record hold
    headline: ClassVar[str]
    # a training step's accuracy (``train_accuracy`` in the epoch records) exists
    training_accuracy: ClassVar[bool]
    # a model's time depends on its architecture alone, not on its weights or input (so fresh
    # weights and random images time it fairly)
    timed_by_architecture: ClassVar[bool] = True
    # latency is timed in onnxruntime too (its ONNX graph takes a batch of any size)
    onnx_timing: ClassVar[bool] = True
    # the PruneSettings fields this task defaults otherwise (untuned settings stay as they were)
    defaults: ClassVar[dict[str, Any]] = {}
    # a training step's output holds logits that a teacher's can be distilled into
    # (``distill_weight``; :meth:`distill_inputs`)
    distillable: ClassVar[bool] = False

    @abstractmethod
    def training_source(
        self, data: Any, *, batch_size: int, seed: int, shard: Shard
    ) -> BatchSource:
        """Shuffled training batches of ``data`` (re-iterable, epoch ``e`` seeded by (seed, e))."""

    @abstractmethod
    def split(self, data: Any, val: Any) -> tuple[Any, Any, int | None]:
        """Training data, validation data and the number of classes (None: unknown) from what
        the user gave (a bundle of splits, or the training data alone)."""

    @abstractmethod
    def to_device(self, example: Any, device: torch.device) -> Any:
        """An example input (``BatchSource.example``) on ``device``."""

    @abstractmethod
    def output_layers(
        self, model: nn.Module, example: Any, num_classes: int | None
    ) -> list[nn.Module]:
        """The layers never pruned: the model's outputs."""

    def ignored_layers(
        self,
        model: nn.Module,
        example: Any,
        num_classes: int | None,
        given: list[nn.Module] | None,
    ) -> list[nn.Module]:
        """The layers never pruned: the user's ``given`` ones in place of the outputs."""
        return given if given is not None else self.output_layers(model, example, num_classes)

    def target(
        self, model: nn.Module, example: Any, keep: float, keep_kind: str
    ) -> float | PruningTarget:
        """What ``keep`` refers to: a fraction of the whole model's size by default."""
        return keep

    def outside_target(self, model: nn.Module, target: float | PruningTarget) -> list[nn.Module]:
        """Layers that must not lose neurons because they lie outside what ``target`` prunes."""
        return []

    def prepare(self, batch: Any, memory_format: torch.memory_format) -> Any:
        """A training batch as the model takes it (e.g. in channels-last layout)."""
        return batch

    @abstractmethod
    def forward(self, model: nn.Module, batch: Any, fraction: float) -> Any:
        """The model's training-mode output on the first ``fraction`` of ``batch`` (under the
        loop's autocast)."""

    @abstractmethod
    def loss(
        self, output: Any, batch: Any, fraction: float, check: bool, count: bool
    ) -> StepOutput:
        """The loss of ``output`` (in float32) on the same part of ``batch``; ``check``: first
        step of an epoch, validate the targets against the output; ``count``: the step's first
        pass, whose right answers the epoch's training accuracy counts."""

    def distill_inputs(self, output: Any, batch: Any) -> tuple[Tensor, Any]:
        """The student's ``batch x classes`` logits in a training step's ``output`` and the
        teacher's input: the whole ``batch``'s images (for a :attr:`distillable` task)."""
        raise NotImplementedError(f"the {self.name} task has no logits to distil")

    @abstractmethod
    def failed(self, model: nn.Module, batch: Any, phase: str, exc: Exception) -> None:
        """A training step raised ``exc``: raise a clear :class:`UserError` where the cause is
        the input (else return, and the exception goes on)."""

    @abstractmethod
    def score(
        self,
        model: nn.Module,
        data: Any,
        *,
        device: torch.device,
        channels_last: bool = False,
        sharded: bool = False,
    ) -> dict[str, float]:
        """The clean metrics of ``model`` on ``data``, the :attr:`headline` among them."""

    def images(self, batch: Any) -> int:
        """The number of images in a training batch."""
        return len(batch[1])

    # Saved models and their ONNX export (adasap.deploy), one path for every task. The graph
    # takes one input, ``N x C x H x W`` images, and gives ``onnx_outputs`` by name; the axes
    # in ``onnx_dynamic_axes`` vary in size. The export is traced on random images, as many
    # as the largest of ``onnx_check_batches``, and checked with onnxruntime at each of them;
    # it passes when :meth:`onnx_difference` stays below ``onnx_tolerance`` (unless told
    # otherwise).
    onnx_input: ClassVar[str] = "images"
    onnx_outputs: ClassVar[tuple[str, ...]]
    onnx_dynamic_axes: ClassVar[dict[str, dict[int, str]]]
    onnx_check_batches: ClassVar[tuple[int, ...]]
    onnx_tolerance: ClassVar[float]

    @abstractmethod
    def build_saved(self, architecture: dict[str, Any]) -> nn.Module:
        """The unpruned model, with fresh weights, that a saved model's ``architecture``
        (its ``model.json`` entry) describes."""

    @abstractmethod
    def replay_inputs(
        self, model: nn.Module, architecture: dict[str, Any]
    ) -> tuple[Any, list[nn.Module]]:
        """The example input and the layers never pruned with which a saved model's pruning
        history is replayed on ``model``: as the pruning traced them."""

    def onnx_module(self, model: nn.Module) -> nn.Module:
        """``model`` giving its outputs as tensors in the order of :attr:`onnx_outputs` (the
        exporter names outputs by position)."""
        return model

    @abstractmethod
    def onnx_difference(
        self,
        images: Tensor,
        expected: dict[str, np.ndarray],
        got: dict[str, np.ndarray],
        tolerance: float,
    ) -> tuple[float, int | None]:
        """How far onnxruntime's outputs on ``images`` (``got``) are from PyTorch's
        (``expected``), and how many outputs that compared (``None``: all of them)."""


TASKS: Registry[type[Task]] = Registry("task")


def make_task(task: str | Task, **options: Any) -> Task:
    """A task by registered name (built with ``options``, those it does not take ignored) or
    a :class:`Task` as it is."""
    if isinstance(task, Task):
        return task
    cls = TASKS.get(task)
    return cls(**{k: v for k, v in options.items() if k in _fields(cls)})


def task_options(task: str | Task) -> tuple[str, ...]:
    """The options a task by name is built with (``keep_reference``, ``label_smoothing`` ...);
    none for a task built already."""
    return () if isinstance(task, Task) else tuple(_fields(TASKS.get(task)))


def _fields(cls: type) -> Sequence[str]:
    return tuple(getattr(cls, "__dataclass_fields__", {}))
