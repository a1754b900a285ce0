"""The end-to-end check every head adapter's tests share."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adasap
from adasap.data import load_dataset
from adasap.deploy.onnx import export_onnx
from adasap.deploy.serialization import load_model, save_model
from adasap.method.pruning import measure_size, predict_size, remove_neurons
from adasap.method.target import OffTarget


def pruned_saved_reloaded_exported(
    make: Callable[[], nn.Module],
    size: int,
    x: torch.Tensor,
    heads_of: Callable[[nn.Module], list[int]],
    tmp_path: Path,
) -> tuple[list[int], Any]:
    """``make()`` (a 4-class model) pruned to half its parameters, whole heads removed; its
    reload from safetensors is identical and its ONNX export passes. Returns the heads each
    attention layer kept, and the pruning's result."""
    data = load_dataset(
        "synthetic", num_classes=4, channels=3, image_size=size, num_train=10, num_test=4,
        val_fraction=0.2,
    )  # fmt: skip
    with warnings.catch_warnings():  # whole heads (5% each here) may land under the target
        warnings.simplefilter("ignore", OffTarget)
        result = adasap.prune(
            make(), data, keep=0.5, keep_kind="params", round_to=1, warmup_epochs=0,
            prune_epochs=1, finetune_epochs=0, prune_steps=1, batch_size=8, method="sgd",
            criterion="magnitude", device="cpu", amp="off", channels_last=False, progress=False,
        )  # fmt: skip
    pruned = result.model.eval()
    # one head is 5% of these models: whole heads land within one of the target
    assert 0.44 <= result.keep_fraction("params") <= 0.5
    assert sum(p.numel() for p in pruned.parameters()) == result.size.params
    assert any(entry[0].endswith(":heads") for entry in result.pruning_history)
    heads = heads_of(pruned)
    with torch.no_grad():
        expected = pruned(x)
    architecture = {"in_channels": 3, "image_size": size}
    save_model(tmp_path / "model", pruned, architecture, result.pruning_history)
    loaded = load_model(tmp_path / "model", base_model=make()).eval()
    assert heads_of(loaded) == heads
    assert [type(m) for m in loaded.modules()] == [type(m) for m in pruned.modules()]
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    report = export_onnx(pruned, tmp_path / "model.onnx", image_size=size, tolerance=1e-4)
    assert report.passed, str(report)
    return heads, result


def removed_as_predicted(layout: Any, neurons: torch.Tensor, x: torch.Tensor) -> None:
    """Remove ``neurons``; the size predicted beforehand is the size measured after."""
    removed = torch.zeros(layout.num_neurons, dtype=torch.bool)
    removed[neurons] = True
    predicted, _ = predict_size(layout, removed, measure_size(layout.model, x))
    remove_neurons(layout, neurons)
    assert predicted == measure_size(layout.model, x)
