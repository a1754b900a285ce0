import pytest

from adasap.errors import UserError
from adasap.experiments.config import SCHEMA, dump_yaml, from_flat, load_yaml
from adasap.experiments.run import ExperimentConfig


def test_schema_covers_every_flat_key():
    assert set(ExperimentConfig().to_flat()) == set(SCHEMA)


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
        from_flat(values)
    assert message in str(info.value)


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
