"""Pruned-model files without pickle: safetensors weights plus a JSON description.

The JSON names the base architecture (as :func:`adasap.models.build_model` arguments, or for a
detector ``task: detection`` with :func:`adasap.models.detection.build_detector`'s) and the
pruning history; loading rebuilds the base model, replays the pruning with Torch-Pruning as
its task traced it (:meth:`~adasap.tasks.Task.replay_inputs`: a detector's head output layers
protected) and loads the weights. A checksum of the weights file guards against truncation
and tampering.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from adasap.errors import UserError
from adasap.io import atomic_write_bytes, atomic_write_json, file_sha256
from adasap.method.pruning import replay_pruning
from adasap.tasks import make_task

WEIGHTS_FILE = "model.safetensors"
DESCRIPTION_FILE = "model.json"
DENSE = "dense"  # the dense model's folder in a run directory (and its row's method)
FORMAT_VERSION = 1
# what every reader needs (the input shape); build_model's other arguments are checked on load
_ARCHITECTURE_KEYS = ("in_channels", "image_size")


def save_model(
    directory: str | Path,
    model: nn.Module,
    architecture: dict[str, Any],
    pruning_history: list[list[Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` (atomically each).

    ``architecture`` holds the :func:`build_model` keyword arguments of the base model
    (``name``, ``num_classes``, ``in_channels``, ``image_size``, ``mean``, ``std``); a
    detector's is ``detection_architecture(...)``.
    """
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # bytes first: a full disk is then our OSError (one line), not a SafetensorError
    weights = atomic_write_bytes(directory / WEIGHTS_FILE, safetensors_bytes(tensors))
    history = [
        [name, bool(is_out), [int(i) for i in idxs]]
        for name, is_out, idxs in (pruning_history or [])
    ]
    description = {
        "format": "adasap-model",
        "version": FORMAT_VERSION,
        "architecture": architecture,
        "pruning_history": history,
        "weights_sha256": file_sha256(weights),
        **(extra or {}),
    }
    atomic_write_json(directory / DESCRIPTION_FILE, description)
    return directory


def detection_architecture(name: str, num_classes: int, image_size: int) -> dict[str, Any]:
    """The architecture entry of a detector built by ``build_detector(name, ...)``."""
    return {
        "task": "detection",
        "name": name,
        "num_classes": num_classes,
        "image_size": image_size,
        "in_channels": 3,
    }


def saved_task(description: dict[str, Any]) -> str:
    """The task of a saved model: the one place that reads it from its description (a
    classifier's architecture, :func:`build_model`'s arguments, names none)."""
    return description["architecture"].get("task", "classification")


def read_description(directory: str | Path) -> dict[str, Any]:
    """The JSON description of a saved model, validated."""
    path = Path(directory) / DESCRIPTION_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist: point at a run directory that holds a model")
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): the file is damaged, re-run") from exc
    if not isinstance(description, dict) or description.get("format") != "adasap-model":
        raise UserError(f"{path} is not an adasap model description: use a file adasap wrote")
    if description.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has format version {description.get('version')}, this adasap reads "
            f"{FORMAT_VERSION}: load it with the adasap version that wrote it"
        )
    architecture = description.get("architecture")
    missing = [
        k for k in _ARCHITECTURE_KEYS if not isinstance(architecture, dict) or k not in architecture
    ]
    if missing or not isinstance(description.get("pruning_history", []), list):
        what = (
            f"no {', '.join(missing)} in its architecture"
            if missing
            else "a pruning_history that is not a list"
        )
        raise UserError(f"{path} is damaged ({what}): restore it or re-run")
    return description


def load_model(directory: str | Path, base_model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved (pruned) model; no pickle is involved.

    ``base_model`` replaces the architecture in the description, for models that
    :func:`build_model` cannot build (a user's own module): pass a fresh, unpruned instance.
    """
    directory = Path(directory)
    description = read_description(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(
            f"{weights} does not exist: the model directory is incomplete; restore the file "
            "or re-run"
        )
    if file_sha256(weights) != description.get("weights_sha256"):
        raise UserError(
            f"{weights} does not match the checksum in {DESCRIPTION_FILE}: the file was "
            "truncated or modified; restore it or re-run"
        )
    architecture = description["architecture"]
    history = description.get("pruning_history") or []
    try:
        task = make_task(saved_task(description))
        model = base_model if base_model is not None else task.build_saved(architecture)
        replay_pruning(model, history, *task.replay_inputs(model, architecture))
    except UserError as exc:
        raise UserError(
            f"{directory / DESCRIPTION_FILE} describes a model adasap cannot build ({exc}); "
            "restore the file or re-run"
        ) from exc
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"{directory / DESCRIPTION_FILE} does not describe a model adasap can rebuild "
            f"({type(exc).__name__}: {reason}): the file is damaged or was edited; restore it "
            "or re-run"
        ) from exc
    try:
        state = load_file(str(weights))
    except SafetensorError as exc:
        raise UserError(f"{weights} is not a valid safetensors file ({exc}): re-run") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(
            f"{weights} does not fit the described architecture ({first}): the files do not "
            "belong together"
        ) from exc
    return model.eval()
