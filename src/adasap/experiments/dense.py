"""The data and the dense starting model of a job: loaded as the config says, cached once.

The dense model is trained once per recipe (architecture, data, epochs, precision ...) and
kept in ``<cache>/dense/``; parallel benchmark cells share the entry through the locked cache
of :mod:`adasap.io`, and torchrun's ranks train it together (docs/distributed.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from adasap.data import default_workers
from adasap.deploy.serialization import DESCRIPTION_FILE, load_model, save_model
from adasap.distributed import any_rank, is_distributed, on_main
from adasap.errors import UserError
from adasap.experiments.config import ExperimentConfig
from adasap.experiments.job import job_of
from adasap.io import CacheMiss, cache_root, cached, load_json
from adasap.training.checkpoint import CHECKPOINT_FILE
from adasap.training.pipeline import train


def load_data(config: ExperimentConfig) -> Any:
    """The config's data (its task's), split and limited as the config says."""
    return job_of(config).load_data(config)


def loader_workers(config: ExperimentConfig) -> int:
    """DataLoader processes for image files: the config's ``workers``, else the default."""
    return default_workers() if config.workers is None else config.workers


def model_architecture(config: ExperimentConfig, data: Any) -> dict[str, Any]:
    """The model-building arguments of the config's model for the data (``model.json``)."""
    return job_of(config).architecture(config, data)


def dense_recipe(config: ExperimentConfig, data: Any) -> dict[str, Any]:
    """What makes a dense model what it is: the key of its cache entry."""
    return job_of(config).recipe(config, data)


def dense_cache_directory(config: ExperimentConfig, recipe: dict[str, Any]) -> Path:
    """The dense cache entry of ``recipe`` (:func:`dense_recipe`)."""
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(config.cache_dir) / "dense" / f"{folder_label(config)}-{key}"


def cached_dense_sha256(directory: Path) -> str | None:
    """The sha256 of the weights file of the dense model cached in ``directory``
    (:func:`dense_cache_directory`), as its description records it; None when there is none."""
    try:
        return load_json(directory / DESCRIPTION_FILE).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def dense_model(config: ExperimentConfig, data: Any, console: Console):
    """Train the dense starting model, or reuse the cached one trained with the same recipe.

    Processes that ask for the same recipe at once (a parallel benchmark's cells) train it
    once: the others wait for the cache entry (:func:`adasap.io.cached`). A damaged entry
    (its weights not matching their checksum) is trained again. The model is always the one
    loaded from the cache, on the CPU. ``info["val_accuracy"]`` is the last epoch's
    validation score in the task's headline metric.
    """
    job = job_of(config)
    recipe = job.recipe(config, data)
    architecture = recipe["architecture"]
    s = config.prune
    directory = dense_cache_directory(config, recipe)

    def train_dense():
        console.print(f"dense model: training {config.model} for {config.dense_epochs} epochs")
        torch.manual_seed(s.seed)  # the same initial weights on every rank
        result = train(
            job.build(architecture),
            data,
            epochs=config.dense_epochs,
            settings=s,
            lr=config.dense_lr,
            checkpoint_dir=directory,
            progress=config.progress,
            task=job.training_task(config, data),
        )
        info = {"seconds": result.seconds, "val_accuracy": result.val_accuracy, "recipe": recipe}

        def publish() -> None:
            save_model(directory, result.model.cpu(), architecture, extra={"train": info})
            (directory / CHECKPOINT_FILE).unlink(missing_ok=True)

        on_main(publish)
        return result.model, info

    if is_distributed():
        # all ranks train together, so rank 0 cannot hold the cache's lock while others wait
        try:
            model_info = load_cached_model(directory, console)
        except CacheMiss:
            model_info = None
        if not any_rank(model_info is None):  # reused only when every rank has it
            return model_info
        return train_dense()

    def build():
        _, info = train_dense()
        # as loaded, not as trained (channels_last on the CPU): the numbers of the dense model
        # are then the same whether this process trained it or another one did
        return load_model(directory), info

    return cached_dense_model(directory, build, console)


def load_cached_model(directory: Path, console: Console) -> tuple[nn.Module, dict[str, Any]]:
    """The model saved in ``directory`` and its training info; ``CacheMiss`` when there is none
    or it cannot be read."""
    if not (directory / DESCRIPTION_FILE).is_file():
        raise CacheMiss()
    try:
        model = load_model(directory)
    except UserError as exc:
        raise CacheMiss(str(exc)) from exc
    console.print(f"dense model: reusing {directory}")
    return model, load_json(directory / DESCRIPTION_FILE).get("train", {})


def cached_dense_model(
    directory: Path, build: Callable[[], tuple[nn.Module, dict[str, Any]]], console: Console
) -> tuple[nn.Module, dict[str, Any]]:
    """The dense model cached in ``directory``, or ``build()``'s, published once for every
    process that asks at the same time (:func:`adasap.io.cached`)."""
    return cached(
        directory,
        partial(load_cached_model, directory, console),
        build,
        on_damaged=lambda why: console.print(
            f"[yellow]dense cache unusable ({why}); training again[/yellow]"
        ),
        on_wait=lambda: console.print(f"dense model: another process is training {directory}"),
    )


def folder_label(config: ExperimentConfig) -> str:
    """Dataset and model as one folder name (``timm:x`` and ``imagefolder:/a/b`` included)."""
    return safe_name(f"{config.dataset}-{config.model}")


def safe_name(text: str) -> str:
    """``text`` as a folder name: runs of other characters than letters, digits, ``._-``
    become one ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")
