"""The experiment config: one flat key space for YAML files, CLI flags and run directories.

One flat key space (``keep``, ``rho_max``, ``dataset`` ...) covers :class:`ExperimentConfig`,
its :class:`PruneSettings` and their sections (the base optimizer's, the pruner's);
:data:`SCHEMA` is derived from their fields (:mod:`adasap.settings`), so a new field is a new
key. :func:`from_flat` checks keys, types and ``Literal`` values; ranges are checked by
:meth:`ExperimentConfig.validate` when a job starts (the pruner's, when its section is built).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from adasap import settings
from adasap.errors import UserError, exception_reason
from adasap.io import check_cache_dir
from adasap.training.settings import PruneSettings

# PruneSettings.method is one run's; an experiment compares several (``methods``).
PER_RUN = ("method",)


@dataclass(frozen=True)
class ExperimentConfig:
    """One comparison of pruning methods on one dataset and model.

    The defaults are the built-in demo: Fashion-MNIST, ResNet-20, keep 50% of the parameters,
    ``sgd`` (plain prune and fine-tune) against ``adasap``, in a reduced setting that takes
    about 8 minutes on a 2-core CPU (10,800 training images: README, Results).
    """

    task: str = "classification"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    model: str = "resnet20"
    methods: tuple[str, ...] = ("sgd", "adasap")
    train_limit: int | None = 12000
    test_limit: int | None = None
    corruption_limit: int | None = 1000
    corruptions: Literal["all", "quick", "none"] = "all"
    dense_epochs: float = 8.0
    dense_lr: float = 0.1
    prune: PruneSettings = field(
        default_factory=lambda: PruneSettings(
            warmup_epochs=1.0, prune_epochs=2.0, finetune_epochs=3.0, prune_steps=4
        )
    )
    out_dir: str = "runs"
    name: str | None = None
    overwrite: bool = False
    cache_dir: str | None = None
    progress: bool = True
    # DataLoader processes per training process for lazily decoded image folders (None: the
    # machine's cores shared by the processes on it, at most 8; adasap.data.default_workers)
    workers: int | None = None
    # detection: the side of the canvases and of the detector's input (None: the job's default)
    image_size: int | None = None
    # after the methods: every model quantized to INT8 (ONNX Runtime), evaluated and timed
    int8: bool = False

    @property
    def reduced(self) -> bool:
        return any(
            v is not None for v in (self.train_limit, self.test_limit, self.corruption_limit)
        )

    def to_flat(self) -> dict[str, Any]:
        """One flat mapping, as YAML config files and run directories hold it."""
        return settings.to_flat(self, omit=PER_RUN)

    def validate(self) -> ExperimentConfig:
        """Raise :class:`UserError` for the first bad value, naming it and what is allowed."""
        settings.check_field_types(self)
        name = self.name  # one folder inside out_dir, so that --overwrite never reaches outside
        if name is not None and (name in ("", ".", "..") or any(c in name for c in "/\\\0")):
            raise UserError(
                f"name {name!r} is not one plain folder name (it is empty, '.' or '..', or holds "
                "a '/'): pass e.g. --name my-run; the run directory goes inside --out"
            )
        from adasap.experiments.job import JOBS  # the jobs import this module

        for task in JOBS:  # a model or dataset of another task: name the task to pass
            claim = JOBS.get(task).claims(self) if task != self.task else None
            if claim is not None:
                raise UserError(f"{claim}: pass --task {task}, or a {self.task} one")
        JOBS.get(self.task).validate(self)
        if not self.methods:
            raise UserError("no methods given: pass e.g. --methods sgd adasap")
        for method in self.methods:
            replace(self.prune, method=method).validate()
        if self.dense_epochs <= 0:
            raise UserError(
                f"dense epochs must be > 0, got {self.dense_epochs}: e.g. --dense-epochs 8"
            )
        if self.workers is not None and self.workers < 0:
            raise UserError(
                f"workers must be >= 0, got {self.workers}: e.g. --workers 8, or none for the "
                "default"
            )
        check_cache_dir(self.cache_dir)
        limit = self.corruption_limit  # train_limit and test_limit: checked by load_dataset
        if limit is not None and limit < 1:
            raise UserError(
                f"corruption_limit={limit!r} is invalid: use a positive number of test images "
                "(e.g. --corruption-limit 1000) or none for all"
            )
        return self


# key -> accepted types (float keys take ints too; bool is never taken for a number)
SCHEMA: dict[str, settings.Types] = settings.flat_schema(ExperimentConfig, omit=PER_RUN)


def from_flat(
    values: dict[str, Any], base: ExperimentConfig | None = None, source: str | None = None
) -> ExperimentConfig:
    """``base`` (the defaults: :class:`ExperimentConfig`'s under the task's own, its job's
    ``defaults``) with a flat mapping applied; keys and types are checked, with ``source``
    (say, the file) named in the message. Ranges: :meth:`ExperimentConfig.validate`.
    """
    if base is None:
        from adasap.experiments.job import JOBS  # the jobs import this module

        task = values.get("task", ExperimentConfig.task)
        defaults = JOBS.get(task).defaults if isinstance(task, str) else {}
        base = settings.from_flat(ExperimentConfig(), defaults, omit=PER_RUN)
    return settings.from_flat(base, values, omit=PER_RUN, source=source)


class _AliasFound(yaml.YAMLError):
    def __init__(self, event: yaml.AliasEvent) -> None:
        super().__init__(f"*{event.anchor[:40]} at line {event.start_mark.line + 1}")


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing aliases: a few hundred bytes of nested aliases (a "billion
    laughs" file) expand into gigabytes once anything walks the loaded value, and a config
    never needs them."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            raise _AliasFound(self.get_event())
        return super().compose_node(parent, index)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a flat mapping (not yet checked)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: check the path")
    try:
        values = yaml.load(path.read_text(), Loader=_NoAliasLoader)
    except _AliasFound as exc:
        raise UserError(
            f"config file {path} uses a YAML alias ({exc}): adasap reads no aliases, write the "
            "value out in full"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = exception_reason(exc, 160)
        raise UserError(f"config file {path} is not valid YAML ({reason}): fix the syntax") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    # YAML reads `1: 2` or `null: x` as non-string keys, which the key checks cannot compare
    odd = [key for key in values if not isinstance(key, str)]
    if odd:
        raise UserError(
            f"config file {path} has a key that is not a name ({settings.quote(odd[0])}): "
            "write option names as keys, e.g. 'keep: 0.5'"
        )
    return values


def dump_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_flat(), sort_keys=False)
