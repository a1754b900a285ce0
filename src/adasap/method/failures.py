"""One clear answer when Torch-Pruning fails on a model or leaves it broken.

Torch-Pruning raises whatever its code meets (an ``IndexError`` deep in its index mapping), and
some removals it completes leave a model that no longer runs: an operation it cannot see kept
the old channel count (a ``torch.split`` with sizes fixed in the model's code, a per-channel
scale held in a buffer). Both become one :class:`UserError` naming the layer, so that the user
can leave it unpruned with ``ignored_layers`` instead of reading a traceback, or being told
their images are at fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch_pruning.dependency import Dependency, Node

from adasap.errors import UserError, exception_summary
from adasap.method.examples import Example, run_example

if TYPE_CHECKING:  # neurons.py imports this module
    from adasap.method.neurons import NeuronGroup

_SHOWN = 3  # layers a message names at most


def module_in_traceback(exc: BaseException, names: dict[nn.Module, str]) -> nn.Module | None:
    """The model layer Torch-Pruning was handling when it raised, else the innermost layer
    whose forward raised (a pruned model failing in a layer's own code); None if neither.

    Torch-Pruning's frames hold the graph node (or dependency) at hand; an operation node is
    named by the nearest layer feeding it.
    """
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            node = value.target if isinstance(value, Dependency) else value
            if not isinstance(node, Node):
                continue
            seen, queue = set(), [node]
            while queue:
                current = queue.pop(0)
                if id(current) in seen:
                    continue
                seen.add(id(current))
                if current.module in names:
                    return current.module
                queue.extend(current.inputs)
    for frame in reversed(frames):
        module = frame.f_locals.get("self")
        if isinstance(module, nn.Module) and module in names:
            return module
    return None


def layer_in_traceback(exc: BaseException, names: dict[nn.Module, str]) -> str:
    """``name (Type)`` of :func:`module_in_traceback`'s layer, or ``an unnamed layer``."""
    return _described(module_in_traceback(exc, names), names)


def _described(module: nn.Module | None, names: dict[nn.Module, str]) -> str:
    if module is None:
        return "an unnamed layer"
    return f"{names[module] or 'the model'} ({type(module).__name__})"


def uncopyable(purpose: str, exc: BaseException) -> UserError:
    """The error for a model ``copy.deepcopy`` refuses (``purpose``: what the copy is for)."""
    return UserError(
        f"cannot copy the model {purpose} ({exception_summary(exc)}): keep objects that cannot "
        "be copied (such as the Pruner itself) outside the pruned module"
    )


def check_pruned_forward(
    model: nn.Module, example_inputs: Example, pruned: Sequence[NeuronGroup]
) -> None:
    """Run ``model`` once on ``example_inputs`` (in eval mode, without gradients) right after
    removing neurons of the ``pruned`` groups; if it fails, the removal broke it.

    The model ran on the same input before, so its input is not at fault (the trace that
    follows a removal would otherwise report it so). The error names the layer that failed
    and the pruned groups nearest it, whose roots ``ignored_layers`` then leaves whole. The
    model stays pruned: ``adasap.prune`` works on a copy.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_example(model, example_inputs)
    except Exception as exc:  # whatever the broken operation raises
        names = {m: n for n, m in model.named_modules()}
        failed = module_in_traceback(exc, names)
        roots = _nearest_roots(pruned, failed, names)
        shown = ", ".join(f"model.{root}" for root in roots[:_SHOWN])
        more = ", ..." if len(roots) > _SHOWN else ""
        raise UserError(
            f"removing channels of {', '.join(roots[:_SHOWN])}{more} broke the model (not its "
            f"input): {_described(failed, names)} now fails ({exception_summary(exc)}), "
            "as Torch-Pruning left something there at its old size; leave those channels "
            f"unpruned with ignored_layers=[{shown}{more}]"
        ) from exc
    finally:
        model.train(was_training)


def _nearest_roots(
    pruned: Sequence[NeuronGroup], failed: nn.Module | None, names: dict[nn.Module, str]
) -> list[str]:
    """The roots of the pruned groups nearest the failed layer: with an output in it, else with
    any slice in it (the layers it reads from), else the same in the smallest module around
    it, up to the model (every pruned group). A block's own layer comes before the one
    feeding it: an operation in the block's code most often handles what its layers made."""
    prefix = names.get(failed, "") if failed is not None else ""
    while True:
        for outputs_only in (True, False):
            near = [
                group.name
                for group in pruned
                if any(
                    _within(names.get(s.module, ""), prefix)
                    for s in group.slices
                    if s.is_output or not outputs_only
                )
            ]
            if near:
                return near
        if not prefix:
            return [group.name for group in pruned]
        prefix = prefix.rpartition(".")[0]


def _within(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def no_prunable_layers(model: nn.Module, ignored_layers: Sequence[nn.Module]) -> UserError:
    """The error for a layout without groups, saying why: every group stays whole, or no
    conv or linear layer lies outside the ignored ones."""
    ignored = set(map(id, ignored_layers))
    if any(isinstance(m, nn.Conv2d | nn.Linear) and id(m) not in ignored for m in model.modules()):
        why, fix = (
            "every group of channels of its conv and linear layers stays whole (attention, "
            "channel moves, or removals Torch-Pruning leaves broken: docs/models.md, 'What is "
            "not pruned')",
            "prune another model",
        )
    else:
        why, fix = (
            "no conv or linear outputs outside the ignored layers",
            "pass a model with convolutions or fewer ignored layers",
        )
    return UserError(f"the model has no prunable layers: {why}; {fix}")
