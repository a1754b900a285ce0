"""Hostile JSON and integers: deep nesting, integers over Python's 4300 digits, YAML keys that
are not names, huge batch sizes, damaged summaries and vision transformers at the wrong image
size each fail with one line (a :class:`UserError`, exit code 2 on the command line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from adasap.cli import main
from adasap.deploy.serialization import DESCRIPTION_FILE, read_description, save_model
from adasap.errors import UserError
from adasap.experiments.config import ExperimentConfig
from adasap.experiments.run import pruned_row
from adasap.io import CacheMiss, read_checked_json, read_json_mapping
from adasap.models.builders import build_model

DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in json, unguarded
MIDDLE = '{"a": ' * 500 + "1" + "}" * 500  # parses, but too deep for code that walks it
HUGE_INT = "9" * 5000  # over int's 4300-digit limit
SMALL = dict(num_classes=10, in_channels=3, image_size=16, mean=[0.5] * 3, std=[0.25] * 3)


def cli_fails(capsys, args: list[str], *words: str) -> str:
    """Run the CLI; it must print one ``error:`` line holding ``words`` and return 2."""
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert len(lines[0]) < 400, lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ADASAP_DATA", raising=False)
    return tmp_path


@pytest.mark.parametrize(
    "text,why",
    [
        (DEEP, "nested deeper than"),
        (MIDDLE, "nested deeper than"),
        ('{"seed": ' + HUGE_INT + "}", "4300"),
        ("[1, 2]", "not a mapping"),
    ],
    ids=["deep", "deep-enough-to-parse", "huge-int", "list"],
)
def test_a_hostile_json_file_is_one_line(tmp_path, text, why):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(UserError, match=why) as caught:
        read_json_mapping(path, "restore it")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_a_too_large_json_file_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr("adasap.io.MAX_JSON_BYTES", 10)
    path = tmp_path / "config.json"
    path.write_text('{"keep": 0.5, "seed": 1}')
    with pytest.raises(UserError, match="larger than"):
        read_json_mapping(path, "restore it")


@pytest.mark.parametrize("text", [DEEP, MIDDLE, '{"format": ' + HUGE_INT + "}"])
def test_a_hostile_model_description_is_one_line(tmp_path, text):
    (tmp_path / DESCRIPTION_FILE).write_text(text)
    with pytest.raises(UserError, match="not valid JSON"):
        read_description(tmp_path)


@pytest.mark.parametrize("text", [DEEP, MIDDLE, '{"sha256": ' + HUGE_INT + "}"])
def test_a_hostile_cache_manifest_is_a_cache_miss(tmp_path, text):
    path = tmp_path / "entry.json"
    path.write_text(text)
    with pytest.raises(CacheMiss, match="unreadable"):
        read_checked_json(path)


@pytest.mark.parametrize(
    "text,why", [(DEEP, "nested deeper"), ('{"seed": ' + HUGE_INT + "}", "4300")]
)
def test_resume_with_a_hostile_run_config(isolated, capsys, text, why):
    run = isolated / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text(text)
    cli_fails(capsys, ["run", "--resume", str(run)], "config.json is damaged", why, "restore it")


@pytest.mark.parametrize("seed", [HUGE_INT, "9" * 30, "-" + "9" * 30])
def test_absurd_int_flags_are_one_line(isolated, capsys, seed):
    args = ["run", "--dataset", "synthetic", "--seed", seed, "--out", str(isolated / "runs")]
    cli_fails(capsys, args, "--seed", "--help")
    assert not (isolated / "runs").exists()


@pytest.mark.parametrize("key", ["1", "null", "0.5"])
def test_yaml_keys_must_be_names(isolated, capsys, key):
    config = isolated / "exp.yaml"
    config.write_text(f"{key}: 2\n")
    cli_fails(capsys, ["run", str(config)], f"config file {config}", "not a name", "keep: 0.5")


def test_latency_batch_sizes_are_capped(isolated, capsys):
    torch.manual_seed(0)
    architecture = dict(name="resnet20", **SMALL)
    save_model(isolated / "model", build_model(**architecture), architecture)
    args = ["latency", str(isolated / "model"), "--batch-sizes", "1", "200000"]
    cli_fails(capsys, args, "batch sizes must be <= 4096", "200000")
    cli_fails(capsys, ["latency", str(isolated / "model"), "--batch-sizes", HUGE_INT], "--help")


@pytest.mark.parametrize("text", ['{"method": "sgd", "clean_acc', DEEP, "[]"])
def test_a_damaged_summary_of_a_finished_method(tmp_path, text):
    method_dir = tmp_path / "sgd"
    method_dir.mkdir()
    (method_dir / "summary.json").write_text(text)
    (method_dir / "model.json").write_text(json.dumps({"format": "adasap-model"}))
    with pytest.raises(UserError, match=r"summary\.json is damaged .*delete .*sgd"):
        pruned_row("sgd", None, None, ExperimentConfig(), tmp_path, Console(quiet=True))


@pytest.mark.parametrize(
    "name,size,pretrained,words",
    [
        ("vit_b_16", 28, False, ["vit_b_16", "16 px patches", "28 px", "multiple of 16"]),
        ("vit_b_32", 48, False, ["vit_b_32", "32 px patches", "multiple of 32"]),
        ("vit_b_16", 32, True, ["pretrained vit_b_16 takes 224 px", "no --pretrained"]),
    ],
)
def test_a_vision_transformer_at_a_size_it_cannot_take(name, size, pretrained, words):
    kwargs = {**SMALL, "image_size": size, "in_channels": 1, "mean": [0.5], "std": [0.25]}
    if pretrained:
        kwargs.update(in_channels=3, num_classes=1000, mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(UserError) as caught:
        build_model(name, pretrained=pretrained, **kwargs)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_sound_json_still_reads(tmp_path: Path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"keep": 0.5, "nested": [[[{"a": 1}]]], "seed": 10**100}))
    assert read_json_mapping(path, "restore it")["seed"] == 10**100


@pytest.mark.parametrize(
    "state, match",
    [
        ([1, 2, 3], "not an adasap training state"),
        ({"loop": {}, "model": {}, "pruner": "x"}, "not an adasap training state"),
        ({"loop": {"step": "x"}, "model": {}, "pruner": {}}, "is damaged"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_on_resume(tmp_path, state, match):
    import torch

    from adasap.data import load_dataset
    from adasap.models.builders import build_model
    from adasap.training.checkpoint import CHECKPOINT_FILE
    from adasap.training.pipeline import prune
    from adasap.training.settings import PruneSettings, with_overrides

    data = load_dataset("synthetic", num_train=40, num_test=8, image_size=8, channels=1,
                        num_classes=2)  # fmt: skip
    model = build_model("resnet20", num_classes=2, in_channels=1, image_size=8, mean=[0.5],
                        std=[0.5])  # fmt: skip
    tiny = dict(batch_size=20, warmup_epochs=1, prune_epochs=1, finetune_epochs=1, prune_steps=1)
    # the run's own identity: the checkpoint gets past the settings check to its contents
    settings = with_overrides(PruneSettings(), tiny).validate().identity()
    identity = {"settings": settings, "task": "classification", "world_size": 1}
    torch.save({**identity, **state} if isinstance(state, dict) else state,
               tmp_path / CHECKPOINT_FILE)  # fmt: skip
    with pytest.raises(UserError, match=match) as info:
        prune(model, data, checkpoint_dir=tmp_path, progress=False, **tiny)
    assert "\n" not in str(info.value) and "delete it" in str(info.value)


def test_a_seed_beyond_32_bits_is_one_line():
    from adasap.training.settings import PruneSettings

    with pytest.raises(UserError, match=r"seed must be in 0\.\.4294967295"):
        PruneSettings(seed=2**40).validate()
