"""Experiment configs as flat mappings: YAML files, CLI flags and run directories share them.

One flat key space (``keep``, ``rho_max``, ``dataset`` ...) covers the experiment, the pruning
settings and the optimizer settings. Every mapping is checked against :data:`SCHEMA` before
any work starts: unknown keys and wrong types are rejected with the key and what is allowed;
ranges are checked by the dataclasses' ``validate()``.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml

from adasap.errors import UserError
from adasap.experiments.run import ExperimentConfig
from adasap.training.loop import OptimizerSettings
from adasap.training.settings import PruneSettings

OPTIONAL = type(None)

# key -> accepted types (float keys take ints too; bool is never taken for a number)
SCHEMA: dict[str, tuple[type, ...]] = {
    "dataset": (str,),
    "data_dir": (str, OPTIONAL),
    "model": (str,),
    "methods": (list,),
    "train_limit": (int, OPTIONAL),
    "test_limit": (int, OPTIONAL),
    "corruption_limit": (int, OPTIONAL),
    "corruptions": (str,),
    "dense_epochs": (float,),
    "dense_lr": (float,),
    "out_dir": (str,),
    "name": (str, OPTIONAL),
    "overwrite": (bool,),
    "cache_dir": (str, OPTIONAL),
    "criterion": (str,),
    "keep": (float,),
    "keep_kind": (str,),
    "warmup_epochs": (float,),
    "prune_epochs": (float,),
    "finetune_epochs": (float,),
    "prune_steps": (int,),
    "batch_size": (int,),
    "label_smoothing": (float,),
    "lr_warmup_epochs": (float,),
    "score_refresh": (int,),
    "score_normalization": (str,),
    "per_layer_radii": (bool,),
    "taylor_form": (str,),
    "min_channels": (int,),
    "round_to": (int,),
    "seed": (int,),
    "device": (str,),
    "amp": (bool,),
    "channels_last": (bool,),
    "progress": (bool,),
    "base_optimizer": (str,),
    "lr": (float,),
    "momentum": (float,),
    "weight_decay": (float,),
    "rho": (float,),
    "rho_min": (float,),
    "rho_max": (float,),
    "normalization": (str,),
    "asam": (bool,),
    "max_grad_norm": (float, OPTIONAL),
}
_EXPERIMENT_KEYS = {f.name for f in fields(ExperimentConfig)} - {"prune"}
_PRUNE_KEYS = {f.name for f in fields(PruneSettings)} - {"optimizer", "method"}
_OPTIMIZER_KEYS = {f.name for f in fields(OptimizerSettings)}


def _type_name(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", OPTIONAL: "null"}  # fmt: skip
    return " or ".join(names[t] for t in types)


def _check_type(key: str, value: Any) -> Any:
    types = SCHEMA[key]
    ok = any(
        (t is OPTIONAL and value is None)
        or (t is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t in (str, bool) and isinstance(value, t))
        or (
            t is list and isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        )
        for t in types
    )
    if not ok:
        raise UserError(f"config key {key!r} must be {_type_name(types)}, got {value!r}")
    if float in types and isinstance(value, int):
        return float(value)
    return tuple(value) if list in types else value


def check_keys_and_types(values: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """``values`` with their types checked (ints accepted as floats); :class:`UserError`
    for an unknown key or a wrong type, prefixed with ``source`` (say, the file) when given."""
    try:
        unknown = sorted(set(values) - set(SCHEMA))
        if unknown:
            raise UserError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}: allowed keys are "
                f"{', '.join(sorted(SCHEMA))}"
            )
        return {k: _check_type(k, v) for k, v in values.items()}
    except UserError as exc:
        if source is None:
            raise
        raise UserError(f"{source}: {exc}") from None


def from_flat(values: dict[str, Any], base: ExperimentConfig | None = None) -> ExperimentConfig:
    """Apply a flat mapping onto ``base`` (the defaults), checking keys, types and ranges."""
    checked = check_keys_and_types(values)
    base = base or ExperimentConfig()
    optimizer = replace(
        base.prune.optimizer, **{k: v for k, v in checked.items() if k in _OPTIMIZER_KEYS}
    )
    prune = replace(
        base.prune, optimizer=optimizer, **{k: v for k, v in checked.items() if k in _PRUNE_KEYS}
    )
    config = replace(
        base, prune=prune, **{k: v for k, v in checked.items() if k in _EXPERIMENT_KEYS}
    )
    return config.validate()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a flat mapping (not yet checked)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: check the path")
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise UserError(f"config file {path} is not valid YAML ({reason}): fix the syntax") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return values


def dump_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_flat(), sort_keys=False)
