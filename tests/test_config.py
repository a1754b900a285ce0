from dataclasses import dataclass, field, fields
from typing import Literal, get_args, get_origin

import pytest
import torch
from torch import nn

from adasap import settings
from adasap.cli import build_parser, config_from_args
from adasap.data import load_dataset
from adasap.errors import UserError
from adasap.experiments.config import SCHEMA, ExperimentConfig, dump_yaml, from_flat, load_yaml
from adasap.method.pruner import Pruner, PrunerSettings
from adasap.training import pipeline
from adasap.training.loop import OptimizerSettings
from adasap.training.settings import PruneSettings, with_overrides

# The pruner's keep_kind and seed are the run's own keys (the run sets them on the pruner).
RUN_SETS = {"keep_kind", "seed"}


def test_schema_covers_every_flat_key():
    assert set(ExperimentConfig().to_flat()) == set(SCHEMA)


def test_every_settings_field_is_a_config_key():
    sections = {"prune", "optimizer", "pruner"}
    per_run = {"method"}  # an experiment's `methods` replaces it
    for cls in (ExperimentConfig, PruneSettings, OptimizerSettings, PrunerSettings):
        for f in fields(cls):
            if f.name not in sections | per_run:
                assert f.name in SCHEMA, f"{cls.__name__}.{f.name}"
    assert SCHEMA["keep"] == (float,) and SCHEMA["train_limit"] == (int, type(None))
    assert SCHEMA["methods"] == (tuple[str, ...],)


@dataclass(frozen=True)
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    steps: int = 3
    names: tuple[str, ...] = ("x",)
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_schema_follows_the_dataclasses():
    schema = settings.flat_schema(Outer)
    assert list(schema) == ["steps", "names", "limit", "rate", "mode"]
    assert list(settings.flat_schema(Outer, omit=("mode",))) == ["steps", "names", "limit", "rate"]
    built = settings.from_flat(Outer(), {"rate": 1, "names": ["p", "q"], "limit": None})
    assert built == Outer(names=("p", "q"), inner=Inner(rate=1.0))
    assert isinstance(built.inner.rate, float)
    assert settings.to_flat(built) == {
        "steps": 3, "names": ["p", "q"], "limit": None, "rate": 1.0, "mode": "a"
    }  # fmt: skip
    with pytest.raises(UserError, match=r"^in.yaml: config key 'rate' must be a number, got 'x'$"):
        settings.from_flat(Outer(), {"rate": "x"}, source="in.yaml")


def test_instance_types_are_checked_with_python_spelling():
    settings.check_field_types(Outer(steps=2, limit=5))
    with pytest.raises(UserError) as info:
        settings.check_field_types(Outer(limit=2.5))
    assert str(info.value) == (
        "limit must be an integer or None, got 2.5 (float): pass e.g. limit=None"
    )
    with pytest.raises(UserError, match=r"^names must be a list of strings, got \('x', 1\)"):
        settings.check_field_types(Outer(names=("x", 1)))
    with pytest.raises(UserError, match=r"^inner must be an Inner, got 3 \(int\)$"):
        settings.check_field_types(Outer(inner=3))
    with pytest.raises(UserError, match=r"^dense_epochs must be a number, got True"):
        ExperimentConfig(dense_epochs=True).validate()
    with pytest.raises(UserError, match=r"^rate must be a number, got 'x' \(str\)"):
        settings.check_field_types(Outer(inner=Inner(rate="x")))  # sections field by field
    with pytest.raises(UserError, match=r"^pruner must be a PrunerSettings, got \{\} \(dict\)$"):
        PruneSettings(pruner={}).validate()


@dataclass(frozen=True)
class Parent:
    mode: str = "own"
    inner: Inner = settings.section(Inner, omit=("mode",))


def test_a_section_may_leave_fields_to_its_parent():
    assert list(settings.flat_schema(Parent)) == ["mode", "rate"]
    built = settings.from_flat(Parent(), {"mode": "b", "rate": 0.5})
    assert built == Parent(mode="b", inner=Inner(rate=0.5))  # the section's mode is untouched
    assert settings.to_flat(built) == {"mode": "b", "rate": 0.5}
    assert settings.replace_flat(Parent(), {"mode": "x"}).inner.mode == "a"


def test_literal_fields_are_checked_by_value():
    assert settings.flat_schema(Outer)["mode"] == (Literal["a", "b"],)
    assert settings.from_flat(Outer(), {"mode": "b"}).inner.mode == "b"
    with pytest.raises(UserError) as info:
        settings.check_field_types(Inner(mode="c"))
    assert str(info.value) == "mode must be one of 'a', 'b', got 'c'"
    with pytest.raises(UserError) as info:
        settings.from_flat(Outer(), {"mode": True}, source="in.yaml")
    assert str(info.value) == "in.yaml: config key 'mode' must be one of 'a', 'b', got True"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"keep_kind": "flops"},
         "keep_kind must be one of 'params', 'macs', 'latency', got 'flops'"),
        ({"normalization": "layer"},
         "normalization must be one of 'global', 'neuron', 'neuron-scaled', got 'layer'"),
        ({"score_normalization": "sum"},
         "score_normalization must be one of 'mean', 'max', 'none', got 'sum'"),
        ({"taylor_form": "full"}, "taylor_form must be one of 'group', 'bn', got 'full'"),
        ({"finetune_sharpness": "ASAM"},
         "finetune_sharpness must be one of 'sam', 'asam' or None, got 'ASAM'"),
    ],
)  # fmt: skip
def test_literal_settings_are_checked_by_value_from_python(values, message):
    with pytest.raises(UserError) as info:
        with_overrides(PruneSettings(), values).validate()
    assert str(info.value) == message
    (name, value), *_ = values.items()
    if name != "keep_kind":  # the method's own: the Pruner's settings check it too
        with pytest.raises(UserError) as info:
            PrunerSettings(**{name: value})
        assert str(info.value) == message


@pytest.mark.parametrize(
    "text, message",
    [
        ("keep_kind: flops\n",
         "config key 'keep_kind' must be one of 'params', 'macs', 'latency', got 'flops'"),
        ("finetune_sharpness: ASAM\n",
         "config key 'finetune_sharpness' must be one of 'sam', 'asam' or null, got 'ASAM'"),
        ("corruptions: some\n",
         "config key 'corruptions' must be one of 'all', 'quick', 'none', got 'some'"),
        ("taylor_form: 1\n", "config key 'taylor_form' must be one of 'group', 'bn', got 1"),
        ("round_to: fast\n", "config key 'round_to' must be an integer or 'auto', got 'fast'"),
    ],
)  # fmt: skip
def test_literal_settings_are_checked_by_value_from_yaml(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        from_flat(load_yaml(path), source=str(path))
    assert str(info.value) == f"{path}: {message}"
    assert from_flat({"keep_kind": "macs", "finetune_sharpness": None}).validate()


def test_flat_round_trip_through_yaml(tmp_path):
    config = from_flat({"keep": 0.3, "rho_max": 0.4, "methods": ["sgd", "sam"], "seed": 7})
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(config))
    again = from_flat(load_yaml(path))
    assert again == config
    assert again.prune.keep == 0.3 and again.prune.pruner.rho_max == 0.4
    assert again.methods == ("sgd", "sam") and again.prune.seed == 7


def test_integers_are_accepted_for_float_keys():
    assert from_flat({"keep": 1}).prune.keep == 1.0


@pytest.mark.parametrize(
    "values,message",
    [
        ({"kep": 0.5}, "unknown config key(s) 'kep'"),
        ({"keep": "half"}, "config key 'keep' must be a number"),
        ({"prune_steps": 2.5}, "config key 'prune_steps' must be an integer"),
        ({"seed": True}, "config key 'seed' must be an integer"),
        ({"asam": "yes"}, "config key 'asam' must be true or false"),
        ({"methods": "sgd"}, "config key 'methods' must be a list"),
        ({"train_limit": -3.5}, "config key 'train_limit' must be an integer or null"),
        ({"keep": 0}, "keep fraction must be in (0, 1]"),
        ({"rho_min": 0.5, "rho_max": 0.1}, "rho_min <= rho_max"),
        ({"methods": []}, "no methods given"),
        ({"dataset": "imagenet"}, "unknown dataset"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(UserError) as info:
        from_flat(values).validate()
    assert message in str(info.value)


def test_parsing_checks_types_and_validate_checks_ranges():
    config = from_flat({"keep": 0})  # a number: parsed; its range is checked when a job starts
    with pytest.raises(UserError, match="keep fraction"):
        config.validate()


def test_bad_yaml_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("keep: [0.5\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_yaml(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- keep\n")
    with pytest.raises(UserError, match="mapping"):
        load_yaml(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


def test_phase3_settings_reach_the_pruner_from_yaml_and_flags(tmp_path):
    path = tmp_path / "asam.yaml"
    path.write_text("finetune_sharpness: asam\nfinetune_rho: 1\n")
    config, _ = config_from_args(build_parser().parse_args(["run", str(path)]))
    s = config.validate().prune.pruner
    assert (s.finetune_sharpness, s.finetune_rho, s.asam, s.rho) == ("asam", 1.0, False, 0.05)
    flags = ["run", str(path), "--finetune-sharpness", "none", "--finetune-rho", "0.2"]
    config, _ = config_from_args(build_parser().parse_args(flags))
    s = config.validate().prune.pruner
    assert (s.finetune_sharpness, s.finetune_rho) == (None, 0.2)  # flags override the file
    assert PruneSettings().pruner.finetune_sharpness == "asam"  # docs/tuning.md


# fields whose valid values their types do not tell: checked against a list of names
OTHER_VALUES = {"runtime": "torch"}


def _changed(name: str, allowed: settings.Types, default: object) -> object:
    """A valid value other than ``default`` for a field of these types, whatever the field."""
    if name in OTHER_VALUES:
        return OTHER_VALUES[name]
    for form in allowed:
        others = [v for v in get_args(form) if v != default] if get_origin(form) is Literal else []
        if others:
            return others[0]
    if bool in allowed:
        return not default
    if not isinstance(default, int | float):  # None, or a Literal's only value ("auto")
        return 0.5 if float in allowed else 2
    return default + 1 if int in allowed else default / 2


class _Built(Exception):
    """Stops prune() once the Pruner has its settings."""


def test_every_pruner_setting_is_a_flat_key_that_reaches_the_pruner(tmp_path, monkeypatch):
    """A new PrunerSettings field is a config key, a YAML key and an override of prune() with
    no other edit; the pruner's keep_kind and seed are the run's."""
    changed = {
        f.name: _changed(f.name, SCHEMA[f.name], f.default)
        for f in fields(PrunerSettings)
        if f.name not in RUN_SETS
    }
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(from_flat({**changed, "keep_kind": "params", "seed": 3})))
    config = from_flat(load_yaml(path)).validate()
    expected = PrunerSettings(**changed, keep_kind="params", seed=3)
    assert config.prune.pruner == expected
    assert with_overrides(config.prune, {"keep_kind": "latency"}).pruner.keep_kind == "params"
    built: list[PrunerSettings] = []

    class Recorded(Pruner):
        def __init__(self, *args, settings, **kwargs):
            built.append(settings)
            raise _Built

    monkeypatch.setattr(pipeline, "Pruner", Recorded)
    data = load_dataset("synthetic", num_train=8, num_test=4, image_size=8, channels=1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(144, data.spec.num_classes))  # fmt: skip
    torch.manual_seed(0)
    with pytest.raises(_Built):
        pipeline.prune(model, data, settings=config.prune, batch_size=4, progress=False)
    assert built == [expected]


def test_the_default_target_is_rounded_macs_for_onnxruntime(tmp_path):
    """MACs, not parameters (a parameter target on Taylor scores kept 63% of the MACs and gave
    no speed), in channel counts the deployment runtime's kernels like (docs/deployment.md)."""
    s = PruneSettings()
    assert (s.keep_kind, s.pruner.keep_kind) == ("macs", "macs")
    assert (s.pruner.runtime, s.pruner.round_to) == ("ort", "auto")
    path = tmp_path / "config.yaml"
    path.write_text("round_to: auto\nruntime: openvino\nkeep_kind: params\n")
    config = from_flat(load_yaml(path)).validate()
    assert (config.prune.pruner.round_to, config.prune.pruner.runtime) == ("auto", "openvino")
    assert config.prune.pruner.keep_kind == "params"
    assert from_flat({"round_to": 1}).validate().prune.pruner.round_to == 1
    with pytest.raises(UserError) as caught:
        from_flat({"runtime": "tensorrt"})
    assert str(caught.value).startswith("unknown runtime 'tensorrt': choose one of torch, ort")
    assert "\n" not in str(caught.value)
