"""Image classification: ``(images, labels)`` batches, cross-entropy, top-1 accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from adasap.checks import check_input, check_labels
from adasap.data import DataBundle, training_source
from adasap.data.batching import Shard
from adasap.data.sources import BatchSource
from adasap.errors import UserError
from adasap.method.cheap_sam import sub_batch
from adasap.method.output_layers import default_ignored_layers
from adasap.models.builders import build_model, find_classifier
from adasap.tasks.base import TASKS, StepOutput, Task
from adasap.tasks.evaluate import count_correct

Batch = tuple[Tensor, Tensor]


@TASKS.register("classification")
@dataclass
class ClassificationTask(Task):
    """One class per image; ``label_smoothing`` in the training loss."""

    label_smoothing: float = 0.0

    name: ClassVar[str] = "classification"
    headline: ClassVar[str] = "accuracy"
    training_accuracy: ClassVar[bool] = True
    distillable: ClassVar[bool] = True

    def training_source(
        self, data: Any, *, batch_size: int, seed: int, shard: Shard
    ) -> BatchSource:
        return training_source(data, batch_size=batch_size, seed=seed, shard=shard)

    def split(self, data: Any, val: Any) -> tuple[Any, Any, int | None]:
        if isinstance(data, DataBundle):
            return data.train, data.val if val is None else val, data.spec.num_classes
        return data, val, None

    def to_device(self, example: Tensor, device: torch.device) -> Tensor:
        return example.to(device)

    def output_layers(
        self, model: nn.Module, example: Tensor, num_classes: int | None
    ) -> list[nn.Module]:
        if num_classes is None:
            return default_ignored_layers(model, example)
        classifier = find_classifier(model, num_classes)
        if classifier is None:
            raise UserError(
                f"found no classifier with {num_classes} outputs (the dataset's classes) to "
                "protect from pruning: pass ignored_layers=[the output layer], or a model with "
                "one output per class"
            )
        return [classifier]

    def prepare(self, batch: Batch, memory_format: torch.memory_format) -> Batch:
        images, labels = batch
        return images.contiguous(memory_format=memory_format), labels

    def forward(self, model: nn.Module, batch: Batch, fraction: float) -> Tensor:
        images, _ = sub_batch(fraction, *batch)
        return model(images)

    def loss(
        self, output: Tensor, batch: Batch, fraction: float, check: bool, count: bool
    ) -> StepOutput:
        _, labels = sub_batch(fraction, *batch)
        if check:  # before the loss: on CUDA a bad label is a bare assert
            check_labels(batch[1], output.shape[-1], "the training labels")
        loss = nn.functional.cross_entropy(
            output.float(), labels, label_smoothing=self.label_smoothing
        )
        correct = (output.detach().argmax(1) == labels).sum() if count else None
        return StepOutput(loss, len(labels), correct)

    def distill_inputs(self, output: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        return output, batch[0]

    def failed(self, model: nn.Module, batch: Batch, phase: str, exc: Exception) -> None:
        if isinstance(exc, RuntimeError | ValueError):
            check_input(model, batch[0], "the training images")

    def score(
        self,
        model: nn.Module,
        data: Any,
        *,
        device: torch.device,
        channels_last: bool = False,
        sharded: bool = False,
    ) -> dict[str, float]:
        correct, total = count_correct(
            model, data, device=device, channels_last=channels_last, sharded=sharded
        )
        if total == 0:
            raise UserError("no images to evaluate: the test set is empty")
        return {"accuracy": correct / total}

    onnx_outputs: ClassVar[tuple[str, ...]] = ("logits",)
    onnx_dynamic_axes: ClassVar[dict[str, dict[int, str]]] = {
        "images": {0: "batch"},
        "logits": {0: "batch"},
    }
    # traced at the largest: on one image, the exporter could take the batch size for a constant
    onnx_check_batches: ClassVar[tuple[int, ...]] = (1, 5)
    onnx_tolerance: ClassVar[float] = 1e-4

    def build_saved(self, architecture: dict[str, Any]) -> nn.Module:
        return build_model(**architecture)

    def replay_inputs(
        self, model: nn.Module, architecture: dict[str, Any]
    ) -> tuple[Tensor, list[nn.Module]]:
        size, channels = architecture["image_size"], architecture["in_channels"]
        return torch.rand(1, channels, size, size), []

    def onnx_difference(
        self,
        images: Tensor,
        expected: dict[str, np.ndarray],
        got: dict[str, np.ndarray],
        tolerance: float,
    ) -> tuple[float, None]:
        want, have = expected["logits"], got["logits"]
        if have.shape != want.shape:
            raise RuntimeError(f"onnxruntime output {have.shape} != PyTorch {want.shape}")
        return float(np.abs(have - want).max()), None
