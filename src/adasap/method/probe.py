"""Groups whose removal Torch-Pruning completes but leaves the model unable to run, found on a
copy before any real removal.

Some models keep a channel count where Torch-Pruning cannot see it: a ``torch.split`` whose
sizes a block computes from its own attribute (Res2Net's ``width``), a ``chunk`` into halves of
which Torch-Pruning cuts one (gMLP's gate). Removing any neuron of such a group breaks the
model. So the layout removes every other neuron of each group (the even ones) from a copy of
the model (copied with its dependency graph: nothing is traced again) and runs the copy on the
example; only if that fails, it does so again group by group, running the copy after each,
and every group whose removal breaks it stays whole; then the same with the odd ones (a
split's parts cut unevenly may fit one way and not the other). A model Torch-Pruning handles
costs two copies, two removals per group and two forward passes (DenseNet-201 at 64 px: 5 s
of its 6.6 s layout, ``benchmarks/bench_layout.py``). A removal that breaks the model only
with more neurons removed is still caught after the real one (:mod:`adasap.method.failures`).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from adasap.method.effort import Effort
from adasap.method.examples import Example, run_example
from adasap.method.failures import uncopyable
from adasap.method.grouped import root_channels

if TYPE_CHECKING:  # neurons.py imports this module
    from adasap.method.neurons import NeuronGroup


def _copied(model: nn.Module, graph: tp.DependencyGraph) -> tuple[dict[int, Any], nn.Module]:
    """A copy of ``model`` with its graph, and the memo mapping each original's id to its copy.
    The autograd nodes the graph recorded while tracing are shared, not copied (they cannot
    be), and so is the graph's reference to Torch-Pruning's ``ops`` module."""
    memo: dict[int, Any] = {id(graph.ops): graph.ops}
    memo.update({id(n.grad_fn): n.grad_fn for n in graph.module2node.values() if n.grad_fn})
    limit = sys.getrecursionlimit()
    # the copy recurses along the graph's chains of nodes: a few frames per node
    sys.setrecursionlimit(max(limit, 10 * len(graph.module2node) + 1000))
    try:
        copied_model, _ = copy.deepcopy((model, graph), memo)
    except TypeError as exc:
        raise uncopyable("to check removals on the copy", exc) from exc
    finally:
        sys.setrecursionlimit(limit)
    return memo, copied_model.eval()


def _every_other(size: int, odd: bool) -> torch.Tensor:
    """Every other of ``size`` neurons, the even ones (or the odd): no layer of a group
    with two channels or more in it is emptied, and a split's parts each lose about half."""
    return torch.arange(int(odd), size, 2)


def _first_breaking(
    model: nn.Module,
    graph: tp.DependencyGraph,
    groups: Sequence[NeuronGroup],
    example: Example,
    effort: Effort,
    odd: bool,
    run_each: bool,
) -> int | None:
    """Remove every other neuron of each group (:func:`_every_other`) in turn from a copy of
    ``model``: the index of the group whose removal raised or (``run_each``) after whose removal
    the copy no longer runs, ``len(groups)`` if only the run after the last fails; None if it
    runs."""
    memo, copied = _copied(model, graph)
    copied_graph = memo[id(graph)]
    try:
        with torch.no_grad():
            for index, group in enumerate(groups):
                effort.check()
                root = memo[id(group.root)]
                prune_out = copied_graph.get_pruner_of_module(root).prune_out_channels
                channels = root_channels(group.neuron_of_root, _every_other(group.size, odd))
                try:
                    pruning = copied_graph.get_pruning_group(root, prune_out, channels)
                    pruning.prune(record_history=False)
                    if run_each:
                        run_example(copied, example)
                except Exception:  # whatever Torch-Pruning or the broken model raises
                    return index
            try:
                run_example(copied, example)
            except Exception:  # the removals together broke it
                return len(groups)
        return None
    finally:  # the graph's nodes refer to each other: unlinked, the copy is freed right away
        for node in copied_graph.module2node.values():
            node.inputs.clear()
            node.outputs.clear()
            node.dependencies.clear()


def breaking_groups(
    model: nn.Module,
    graph: tp.DependencyGraph,
    groups: Sequence[NeuronGroup],
    example: Example,
    effort: Effort,
) -> list[NeuronGroup]:
    """The channel groups (not heads, which adasap removes itself) whose removal breaks
    ``model`` (in eval mode): those to leave whole."""
    pending = [g for g in groups if g.heads is None and g.size > 1]
    broken: list[NeuronGroup] = []
    for odd in (False, True):
        if (
            not pending
            or _first_breaking(model, graph, pending, example, effort, odd, False) is None
        ):
            continue
        rest = pending
        while rest:
            index = _first_breaking(model, graph, rest, example, effort, odd, True)
            if index is None or index == len(rest):
                break
            broken.append(rest[index])
            rest = rest[index + 1 :]
        pending = [g for g in pending if all(g is not b for b in broken)]
    return broken
