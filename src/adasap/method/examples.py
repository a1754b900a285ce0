"""Example inputs: a batch tensor (classifiers) or a list of images (torchvision detectors).

The pruner runs the model on its example input to trace it, to count its size and to record
each layer's output size. A classifier takes one ``N x C x H x W`` tensor; a torchvision
detector takes a list of ``C x H x W`` images (sizes may differ) and returns a list of dicts.
Torch-Pruning's tracer and counter would unpack a list into separate arguments, so every
forward pass on an example goes through :func:`run_example`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from adasap.errors import UserError

Example = Tensor | Sequence[Tensor]


def check_example(example: Example) -> None:
    """A batch tensor, or a non-empty list of ``C x H x W`` image tensors; else UserError."""
    if isinstance(example, Tensor):
        return
    images = list(example) if isinstance(example, list | tuple) else None
    if not images or not all(isinstance(i, Tensor) and i.dim() == 3 for i in images):
        raise UserError(
            f"the example input is a {type(example).__name__}, not a batch tensor or a list of "
            "C x H x W image tensors: pass one batch of images (a detector's: a list of images)"
        )


def run_example(model: nn.Module, example: Example) -> Any:
    """The model's output on ``example`` (a list of images goes in as one argument)."""
    return model(example) if isinstance(example, Tensor) else model(list(example))


def first_sample(example: Example) -> Example:
    """The first image of the example, in the same form (for per-image counts)."""
    return example[:1] if isinstance(example, Tensor) else list(example[:1])


def tracing_forward(watched: Sequence[nn.Module]) -> Callable[[nn.Module, Example], Any]:
    """Torch-Pruning's ``forward_fn``: what to trace from, given the layers never pruned.

    A classifier is traced from its output and the outputs of ``watched``. A detector (a
    list of images) is traced from the outputs of ``watched``, its heads' output layers,
    alone: a layer whose output leaves the autograd graph before the detections (the region
    proposals are detached from the RPN head) would otherwise not be traced, and pruning the
    channels it reads would break it; and what follows the output layers (box decoding,
    per-image splits, non-maximum suppression) holds no channels, while Torch-Pruning's
    reshape mapping fails on it.
    """

    def forward(model: nn.Module, example: Example) -> Any:
        captured: list[Tensor] = []

        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                captured.append(output)

        hooks = [m.register_forward_hook(capture) for m in watched]
        try:
            output = run_example(model, example)
        finally:
            for hook in hooks:
                hook.remove()
        if not isinstance(example, Tensor) and captured:
            return captured
        return [output, captured]

    return forward
