"""Pruned-model files without pickle: safetensors weights plus a JSON description.

The JSON names the base architecture (as :func:`adasap.models.build_model` arguments, or for a
detector ``task: detection`` with :func:`adasap.models.detection.build_detector`'s) and the
pruning history; loading rebuilds the base model, replays the pruning (Torch-Pruning's, and
attention heads: :mod:`adasap.method.heads`) as its task traced it
(:meth:`~adasap.tasks.Task.replay_inputs`: a detector's head output layers protected) and
loads the weights. A checksum of the weights file guards against truncation
and tampering.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from adasap.errors import UserError, quote
from adasap.io import atomic_write_bytes, atomic_write_json, file_sha256, load_json
from adasap.method.heads import HEADS_SUFFIX, head_count
from adasap.method.layer_pruners import layer_pruner
from adasap.method.pruning import replay_pruning
from adasap.tasks import make_task

WEIGHTS_FILE = "model.safetensors"
DESCRIPTION_FILE = "model.json"
DENSE = "dense"  # the dense model's folder in a run directory (and its row's method)
FORMAT_VERSION = 1
# what every reader needs (the input shape); build_model's other arguments are checked on load
_ARCHITECTURE_KEYS = ("in_channels", "image_size")
# Bounds on what a model file may ask for, checked before anything is built: the file is input,
# and an edited size or history otherwise costs gigabytes or minutes before any other check.
_LIMITS = {"image_size": 2048, "in_channels": 64, "num_classes": 100_000}
_MAX_HISTORY = 20_000  # entries; a run records one per pruned group per removal step
# The weights file's metadata key for the state dict's per-module metadata (``_metadata``: each
# module's ``_version``), which a ``.pt`` file keeps and safetensors would drop: modules that
# convert older layouts in ``_load_from_state_dict`` (torchvision's MNASNet) refuse to load
# without it.
_MODULE_METADATA = "adasap.module_metadata"


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
    state = model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {_MODULE_METADATA: json.dumps(_module_metadata(state), sort_keys=True)}
    # bytes first: a full disk is then our OSError (one line), not a SafetensorError
    weights = atomic_write_bytes(directory / WEIGHTS_FILE, safetensors_bytes(tensors, metadata))
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


def _module_metadata(state: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    """The per-module metadata of a state dict (``{"layers.0": {"version": 1}, ...}``), its
    JSON values only (all PyTorch writes: a module's ``_version``, an int or None)."""
    scalar = (bool, int, float, str, type(None))
    return {
        prefix: {k: v for k, v in meta.items() if isinstance(v, scalar)}
        for prefix, meta in (getattr(state, "_metadata", None) or {}).items()
    }


def _read_weights(weights: Path, model: nn.Module) -> OrderedDict[str, Tensor]:
    """The tensors of ``weights`` as a state dict carrying its per-module metadata, as
    ``torch.load`` gives it; for a file written before the metadata was kept, ``model``'s own
    (the module versions of the classes that wrote it, which are the ones rebuilt)."""
    try:
        with safe_open(str(weights), framework="pt") as file:
            header = file.metadata() or {}
            state = OrderedDict((key, file.get_tensor(key)) for key in file.keys())
    except SafetensorError as exc:
        raise UserError(f"{weights} is not a valid safetensors file ({exc}): re-run") from exc
    if _MODULE_METADATA in header:
        try:
            metadata = json.loads(header[_MODULE_METADATA])
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict) or not all(
            isinstance(meta, dict) for meta in metadata.values()
        ):
            raise UserError(
                f"{weights} holds damaged module metadata ({_MODULE_METADATA}): restore it or "
                "re-run"
            )
    else:
        metadata = _module_metadata(model.state_dict())
    # load_state_dict reads each module's entry from this attribute, as torch.load sets it
    state._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return state


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
        description = load_json(path, mapping=False)
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): the file is damaged, re-run") from exc
    if not isinstance(description, dict) or description.get("format") != "adasap-model":
        raise UserError(f"{path} is not an adasap model description: use a file adasap wrote")
    if description.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has format version {quote(description.get('version'))}, this adasap reads "
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
    _check_bounds(path, architecture, description.get("pruning_history", []))
    return description


def _check_bounds(path: Path, architecture: dict[str, Any], history: list[Any]) -> None:
    """:class:`UserError` for sizes or a history beyond :data:`_LIMITS`, or for pretrained
    weights (which would make loading a file reach the network)."""
    for key, limit in _LIMITS.items():
        value = architecture.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise UserError(
                f"{path}: architecture {key} must be an integer from 1 to {limit}, got "
                f"{str(value)[:40]}: the file is damaged or was edited; restore it or re-run"
            )
    if architecture.get("pretrained"):
        raise UserError(
            f"{path}: architecture pretrained is set, but a saved model's weights are its own "
            "and loading never downloads any: remove the key"
        )
    if len(history) > _MAX_HISTORY:
        raise UserError(
            f"{path}: pruning_history has {len(history)} entries, more than {_MAX_HISTORY}: the "
            "file is damaged or was edited; restore it or re-run"
        )
    for i, entry in enumerate(history):
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], bool)
            and isinstance(entry[2], list)
            and entry[2]
            and all(isinstance(j, int) and not isinstance(j, bool) and j >= 0 for j in entry[2])
            and len(set(entry[2])) == len(entry[2])
        ):
            raise UserError(
                f"{path}: pruning_history[{i}] is not [layer name, true/false, distinct channel "
                "indices]: the file is damaged or was edited; restore it or re-run"
            )


class _CheckedHistory(list):
    """A pruning history that checks each entry against the model as Torch-Pruning replays it
    (the earlier entries applied): Torch-Pruning ignores indices beyond a layer's channels and
    so rebuilds a wrong model from a damaged file without a word."""

    def __init__(self, history: list[list[Any]], model: nn.Module) -> None:
        super().__init__(history)
        self.model = model

    def __iter__(self) -> Iterator[list[Any]]:
        for i, entry in enumerate(super().__iter__()):
            name, is_out, indices = entry
            size = _channels(self.model, name, is_out)
            if size is None:
                raise ValueError(f"pruning_history[{i}] names {name[:80]!r}, no prunable layer")
            if max(indices) >= size or len(indices) >= size:
                raise ValueError(
                    f"pruning_history[{i}] removes {len(indices)} channel(s), up to "
                    f"{max(indices)}, of {name[:80]!r}, which has {size} left"
                )
            yield entry


def _channels(model: nn.Module, name: str, is_out: bool) -> int | None:
    """The output (or input) channels of the layer ``name`` of ``model``, or the heads left in
    an attention layer (``<layer>:heads``); None where it names no layer adasap prunes."""
    if name.endswith(HEADS_SUFFIX):
        return head_count(model, name)
    layer: Any = model
    for part in name.split("."):
        layer = getattr(layer, part, None)
    if isinstance(layer, nn.Parameter):  # an unwrapped parameter: pruned along one of its dims
        return max(layer.shape, default=0)
    pruner = layer_pruner(layer) if isinstance(layer, nn.Module) else None
    if pruner is None:
        return None
    return pruner.get_out_channels(layer) if is_out else pruner.get_in_channels(layer)


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
        checked = _CheckedHistory(history, model)
        replay_pruning(model, checked, *task.replay_inputs(model, architecture))
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
    state = _read_weights(weights, model)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:  # ValueError: a module refusing its metadata
        first = str(exc).strip().splitlines()[0]
        raise UserError(
            f"{weights} does not fit the described architecture ({first}): the files do not "
            "belong together"
        ) from exc
    return model.eval()
