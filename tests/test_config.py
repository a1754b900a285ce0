from dataclasses import dataclass, field, fields

import pytest

from adasap import settings
from adasap.cli import build_parser, config_from_args
from adasap.errors import UserError
from adasap.experiments.config import SCHEMA, ExperimentConfig, dump_yaml, from_flat, load_yaml
from adasap.training.loop import OptimizerSettings
from adasap.training.settings import PruneSettings, pruner_settings


def test_schema_covers_every_flat_key():
    assert set(ExperimentConfig().to_flat()) == set(SCHEMA)


def test_every_settings_field_is_a_config_key():
    sections = {"prune", "optimizer"}
    per_run = {"method"}  # an experiment's `methods` replaces it
    for cls in (ExperimentConfig, PruneSettings, OptimizerSettings):
        for f in fields(cls):
            if f.name not in sections | per_run:
                assert f.name in SCHEMA, f"{cls.__name__}.{f.name}"
    assert SCHEMA["keep"] == (float,) and SCHEMA["train_limit"] == (int, type(None))
    assert SCHEMA["methods"] == (tuple[str, ...],)


@dataclass(frozen=True)
class Inner:
    rate: float = 0.1
    mode: str = "a"


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


def test_flat_round_trip_through_yaml(tmp_path):
    config = from_flat({"keep": 0.3, "rho_max": 0.4, "methods": ["sgd", "sam"], "seed": 7})
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(config))
    again = from_flat(load_yaml(path))
    assert again == config
    assert again.prune.keep == 0.3 and again.prune.optimizer.rho_max == 0.4
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
    s = pruner_settings(config.validate().prune)
    assert (s.finetune_sharpness, s.finetune_rho, s.asam, s.rho) == ("asam", 1.0, False, 0.05)
    flags = ["run", str(path), "--finetune-sharpness", "none", "--finetune-rho", "0.2"]
    config, _ = config_from_args(build_parser().parse_args(flags))
    s = pruner_settings(config.validate().prune)
    assert (s.finetune_sharpness, s.finetune_rho) == (None, 0.2)  # flags override the file
    assert PruneSettings().optimizer.finetune_sharpness == "asam"  # docs/tuning.md
