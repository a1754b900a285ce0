"""Small hostile files must fail fast and cheaply, with one line: a YAML alias bomb, huge
values in a config, and model files that ask for huge sizes, long histories or the network."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import torch

import adasap
from adasap.deploy.serialization import DESCRIPTION_FILE, save_model
from adasap.errors import UserError
from adasap.method.pruning import replay_pruning
from adasap.models.builders import build_model
from test_bad_input import cli_fails

# 9 levels of 9 aliases: 9**9 (387 million) strings once expanded, about 400 bytes on disk
BOMB = "\n".join(
    ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    + ["keep: *a8"]
)
SMALL = dict(name="resnet20", num_classes=10, in_channels=1, image_size=16, mean=[0.5], std=[0.25])


def cheaply(action) -> None:
    """Run ``action`` (which must fail) within a few MB of Python memory: the bomb is never
    expanded (time is the benchmarks' business: a busy machine makes any bound flaky)."""
    tracemalloc.start()
    try:
        action()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 50e6, peak


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ADASAP_DATA", raising=False)
    return tmp_path


@pytest.mark.parametrize("key", ["keep", "methods"])
def test_yaml_alias_bomb_is_refused_at_once(isolated, capsys, key):
    config = isolated / "exp.yaml"
    config.write_text(BOMB.replace("keep:", f"{key}:"))
    assert len(config.read_bytes()) < 500
    runs = isolated / "runs"
    cheaply(lambda: cli_fails(capsys, ["run", str(config), "--out", str(runs)], str(config),
                              "alias"))  # fmt: skip
    assert not runs.exists()


def test_a_long_list_is_quoted_short(isolated, capsys):
    config = isolated / "exp.yaml"
    config.write_text(f"methods: [{', '.join(['1'] * 10_000)}]\n")
    line = cli_fails(capsys, ["run", str(config), "--out", str(isolated / "runs")], "methods")
    assert len(line) < 200 + len(str(config)), line


def test_a_long_value_is_quoted_short_from_python():
    with pytest.raises(UserError) as caught:
        adasap.PrunerSettings(rho="x" * 100_000)
    assert len(str(caught.value)) < 200


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_model(tmp_path / "model", build_model(**SMALL), SMALL)


def edit(directory: Path, **changes) -> None:
    path = directory / DESCRIPTION_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "architecture,words",
    [
        ({"image_size": 3000}, ["image_size", "1 to 2048"]),
        ({"num_classes": 1e7}, ["num_classes", "integer"]),
        ({"num_classes": 10_000_000}, ["num_classes", "1 to 100000"]),
        ({"in_channels": 100_000}, ["in_channels"]),
        ({"image_size": True}, ["image_size"]),
        ({"pretrained": True}, ["pretrained", "remove the key"]),
    ],
)
def test_model_file_sizes_are_bounded_before_building(model_dir, monkeypatch, architecture,
                                                      words):  # fmt: skip
    # loading a model file must never reach the network
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", pytest.fail)
    edit(model_dir, architecture={**SMALL, **architecture})
    with pytest.raises(UserError) as caught:
        cheaply(lambda: adasap.load(model_dir))
    message = str(caught.value)
    assert "\n" not in message and DESCRIPTION_FILE in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize(
    "history,words",
    [
        ([["net.conv1", True, []]] * 2_000_000, ["pruning_history has 2000000 entries"]),
        ([["net.conv1", True, []]], ["pruning_history[0]"]),
        ([["net.conv1", True, [1, 1]]], ["pruning_history[0]"]),
        ([["net.conv1", True, [-1]]], ["pruning_history[0]"]),
        ([["net.conv1", "yes", [1]]], ["pruning_history[0]"]),
        ([["net.conv1", True, [99]]], ["pruning_history[0]", "net.conv1", "16 left"]),
        ([["net.conv1", True, list(range(16))]], ["pruning_history[0]", "16 left"]),
        ([["net.conv1", True, [0]]] * 20, ["pruning_history[15]", "1 left"]),
        ([["net.no_such_layer", True, [0]]], ["pruning_history[0]", "no_such_layer"]),
    ],
)
def test_model_file_history_is_checked(model_dir, history, words):
    edit(model_dir, pruning_history=history)
    with pytest.raises(UserError) as caught:
        adasap.load(model_dir)
    message = str(caught.value)
    assert "\n" not in message and DESCRIPTION_FILE in message
    for word in words:
        assert word in message, (word, message)


def test_a_sound_pruned_model_file_still_loads(tmp_path):
    torch.manual_seed(0)
    history = [["net.conv1", True, [0, 3]], ["net.layer3.0.conv1", True, [5]]]
    model = build_model(**SMALL).eval()
    replay_pruning(model, history, torch.rand(1, 1, 16, 16))
    save_model(tmp_path, model, SMALL, history)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(adasap.load(tmp_path)(x), model(x))
