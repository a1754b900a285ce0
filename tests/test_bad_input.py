"""Bad input, systematically: every case is one clear line and exit code 2 on the command line
(a :class:`UserError` in Python), with no traceback, and earlier results stay as they were.

The command-line cases run ``adasap.cli.main`` in-process on tiny synthetic data; none trains
more than a few steps.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import adasap
import adasap.training.pipeline as pipeline
from adasap.cli import main
from adasap.data import DataBundle, TensorImageSet, load_dataset
from adasap.deploy.serialization import DESCRIPTION_FILE, WEIGHTS_FILE, save_model
from adasap.errors import UserError
from adasap.experiments.run import ExperimentConfig, run_experiment
from adasap.io import atomic_write_text
from adasap.method.importance import magnitude_scores
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size, select_neurons, size_predictor
from adasap.models.builders import build_model, find_classifier
from adasap.training.checkpoint import save_checkpoint
from adasap.training.pipeline import prune
from adasap.training.settings import PruneSettings, with_overrides

# the synthetic dataset's defaults: 10 classes of 3x16x16 images
SYNTHETIC = dict(name="resnet20", num_classes=10, in_channels=3, image_size=16,
                 mean=[0.5] * 3, std=[0.25] * 3)  # fmt: skip
TINY = [
    "--dataset", "synthetic",
    "--train-limit", "200",
    "--test-limit", "50",
    "--dense-epochs", "1",
    "--warmup-epochs", "0.5",
    "--prune-epochs", "1",
    "--finetune-epochs", "0.5",
    "--batch-size", "50",
    "--corruptions", "none",
    "--no-progress",
]  # fmt: skip
FAST = dict(warmup_epochs=0, prune_epochs=1, finetune_epochs=0, prune_steps=1, batch_size=16,
            progress=False, device="cpu")  # fmt: skip


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ADASAP_DATA", raising=False)
    return tmp_path


def snapshot(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every path below ``root``: a file's bytes and mtime, a folder's presence."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def earlier_results(root: Path) -> Path:
    """A finished-looking earlier run below ``root`` that no failed command may touch."""
    earlier = root / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "results.md").write_text("| method | clean acc |\n| sgd | 91.0% |\n")
    (earlier / "config.json").write_text('{"keep": 0.5}\n')
    return earlier


def cli_fails(capsys, args: list[str], *words: str) -> str:
    """Run the CLI; it must print one ``error:`` line holding ``words`` and return 2."""
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def write_model(directory: Path, architecture: dict | None = None) -> Path:
    torch.manual_seed(0)
    architecture = architecture or SYNTHETIC
    save_model(directory, build_model(**architecture), architecture)
    return directory


@pytest.fixture
def run_dir(isolated) -> Path:
    """A run directory holding one (untrained) model of the synthetic dataset's shape."""
    run = isolated / "run"
    write_model(run / "sgd")
    (run / "config.json").write_text(json.dumps({"dataset": "synthetic", "test_limit": 20}))
    return run


# --------------------------------------------------------------------------- adasap run: flags

RUN_FLAG_CASES = [
    # wrong types on flags
    ("keep-not-a-number", ["--keep", "abc"], ["--keep", "'abc' is not a number", "--help"]),
    ("batch-size-not-int", ["--batch-size", "1.5"], ["--batch-size", "not an integer", "--help"]),
    ("unknown-flag", ["--kep", "0.5"], ["unrecognized arguments: --kep", "--help"]),
    ("methods-without-value", ["--methods"], ["--methods", "expected at least one", "--help"]),
    # out-of-range numbers
    ("keep-0", ["--keep", "0"], ["keep fraction must be in (0, 1]", "--keep 0.5"]),
    ("keep-1.5", ["--keep", "1.5"], ["keep fraction must be in (0, 1]", "got 1.5"]),
    ("dense-epochs-negative", ["--dense-epochs", "-1"],
     ["dense epochs must be > 0", "got -1.0", "--dense-epochs 8"]),
    ("warmup-epochs-negative", ["--warmup-epochs", "-1"], ["warmup_epochs must be >= 0", "-1"]),
    ("rho-min-above-rho-max", ["--rho-min", "0.5", "--rho-max", "0.1"],
     ["0 <= rho_min <= rho_max", "rho_min=0.5", "rho_max=0.1"]),
    ("lr-0", ["--lr", "0"], ["need lr > 0", "lr=0.0"]),
    ("finetune-sharpness-unknown", ["--finetune-sharpness", "asma"],
     ["config key 'finetune_sharpness' must be one of 'sam', 'asam' or null, got 'asma'"]),
    ("finetune-rho-negative", ["--finetune-rho", "-0.5"],
     ["finetune_rho must be a number >= 0 or none", "-0.5"]),
    ("unknown-base-optimizer", ["--base-optimizer", "adamx"],
     ["unknown optimizer 'adamx'", "adamw", "sgd"]),
    ("batch-size-0", ["--batch-size", "0"], ["batch_size must be >= 1", "got 0"]),
    ("train-limit-0", ["--train-limit", "0"], ["train_limit=0 is invalid", "positive integer"]),
    ("fewer-images-than-a-batch", ["--train-limit", "40"],
     ["training set has fewer images than the batch size 50", "lower --batch-size"]),
    ("corruption-limit-0", ["--corruption-limit", "0"],
     ["corruption_limit=0 is invalid", "--corruption-limit 1000"]),
    # latency budgets outside (0, 1]
    ("latency-budget-1.5", ["--keep-kind", "latency", "--keep", "1.5"], ["(0, 1]", "got 1.5"]),
    ("latency-budget-0", ["--keep-kind", "latency", "--keep", "0"], ["(0, 1]", "got 0.0"]),
    # a keep fraction (or latency budget) that would empty a layer: found before any run
    # directory exists
    ("latency-budget-unreachable", ["--keep-kind", "latency", "--keep", "0.001"],
     ["without emptying a layer", "keep a larger fraction of the latency"]),
    ("keep-empties-a-layer", ["--keep", "0.0001"],
     ["without emptying a layer", "smallest reachable", "keep a larger fraction"]),
    # deployment: the runtime, the channel rounding it suits
    ("runtime-unknown", ["--runtime", "tpu"], ["unknown runtime 'tpu'", "choose one of", "ort"]),
    ("round-to-a-word", ["--round-to", "many"],
     ["config key 'round_to' must be an integer or 'auto', got 'many'"]),
    ("round-to-0", ["--round-to", "0"], ["round_to must be >= 1 or auto", "got 0"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "args,words", [c[1:] for c in RUN_FLAG_CASES], ids=[c[0] for c in RUN_FLAG_CASES]
)
def test_run_with_bad_flags(isolated, capsys, args, words):
    runs = isolated / "runs"
    earlier_results(runs)
    before = snapshot(runs)
    cli_fails(capsys, ["run", *TINY, *args, "--out", str(runs), "--name", "new"], *words)
    assert snapshot(runs) == before  # no new run directory, the earlier one untouched


def test_run_on_a_missing_gpu(isolated, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cli_fails(capsys, ["run", *TINY, "--device", "cuda", "--out", str(isolated / "runs")],
              "CUDA is not available", "--device cpu")  # fmt: skip
    assert not (isolated / "runs").exists()


def _without_openvino(monkeypatch):
    from adasap.deploy import runtimes

    fix = "install it with pip install 'adasap[openvino]'"
    monkeypatch.setattr(runtimes.OpenVinoRuntime, "missing", lambda self: fix)


def test_run_in_a_runtime_that_is_not_installed(isolated, capsys, monkeypatch):
    _without_openvino(monkeypatch)
    cli_fails(capsys, ["run", *TINY, "--runtime", "openvino", "--out", str(isolated / "runs")],
              "runtime 'openvino' cannot run here", "pip install 'adasap[openvino]'")  # fmt: skip
    assert not (isolated / "runs").exists()


def test_int8_run_of_detectors(isolated, capsys):
    args = ["run", "--task", "detection", "--int8", "--out", str(isolated / "runs")]
    cli_fails(capsys, args, "detection models are evaluated and timed in torch only",
              "drop --int8")  # fmt: skip
    assert not (isolated / "runs").exists()


def test_distilled_run_of_detectors(isolated, capsys):
    args = ["run", "--task", "detection", "--distill-weight", "0.5", "--out", str(isolated / "r")]
    cli_fails(capsys, args, "distillation is not defined for detectors", "--distill-weight")
    assert not (isolated / "r").exists()


# --------------------------------------------------------------------------- adasap run: YAML

FILE = "config file {config}"  # problems with the file itself name it
YAML_CASES = [
    ("missing", None, [FILE, "does not exist", "check the path"]),
    ("empty", b"", [FILE, "sets no options", "leave the file out"]),
    ("only-comments", b"# keep: 0.5\n", [FILE, "sets no options", "'keep: 0.5'"]),
    ("truncated", b"keep: 0.5\nmethods: [sgd, ada", [FILE, "not valid YAML", "fix the syntax"]),
    ("binary", b"\xff\xfe\x00\x13garbage", [FILE, "is not valid YAML", "fix the syntax"]),
    ("not-a-mapping", b"- keep\n- 0.5\n", [FILE, "must hold a mapping of keys to values"]),
    ("keep-a-word", b"keep: half\n", [FILE, "config key 'keep' must be a number", "'half'"]),
    ("epochs-a-bool", b"dense_epochs: yes\n", [FILE, "'dense_epochs' must be a number", "True"]),
    ("methods-a-string", b"methods: sgd\n", [FILE, "'methods' must be a list", "'sgd'"]),
    ("limit-a-float", b"train_limit: 0.5\n", [FILE, "'train_limit' must be an integer or null"]),
    ("prune-steps-0", b"prune_steps: 0\n", ["prune_steps must be >= 1", "got 0"]),
    ("rho-negative", b"rho: -0.1\n", ["rho >= 0", "rho=-0.1"]),
]


@pytest.mark.parametrize(
    "content,words", [c[1:] for c in YAML_CASES], ids=[c[0] for c in YAML_CASES]
)
def test_run_with_bad_config_file(isolated, capsys, content, words):
    config = isolated / "exp.yaml"
    if content is not None:
        config.write_bytes(content)
    runs = isolated / "runs"
    earlier_results(runs)
    before = snapshot(runs)
    words = [w.format(config=config) for w in words]
    cli_fails(capsys, ["run", str(config), "--out", str(runs)], *words)
    assert snapshot(runs) == before


# --------------------------------------------------------------------------- data


def test_run_on_an_image_folder_without_images(isolated, capsys):
    root = isolated / "images"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    runs = isolated / "runs"
    cli_fails(capsys, ["run", "--dataset", f"imagefolder:{root}", "--out", str(runs)],
              f"{root / 'train'} lacks images", "cat, dog", "put .jpg/.png files")  # fmt: skip
    assert not runs.exists()


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    path.write_bytes(header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


IDX_DAMAGE = {
    "truncated-images": (
        lambda d: (d / "t10k-images-idx3-ubyte").write_bytes(
            (d / "t10k-images-idx3-ubyte").read_bytes()[:-100]
        ),
        ["t10k-images-idx3-ubyte is truncated or corrupt", "fetch it again"],
    ),
    "labels-out-of-range": (
        lambda d: write_idx(d / "train-labels-idx1-ubyte", np.full(20, 12, np.uint8)),
        ["train-labels-idx1-ubyte does not match its 20 images", "label range",
         "use the labels file from the same dataset"],
    ),
    "images-of-the-wrong-size": (
        lambda d: write_idx(d / "train-images-idx3-ubyte", np.zeros((20, 32, 32), np.uint8)),
        ["shape (32, 32), not fashion-mnist's uint8 28x28", "use the right files"],
    ),
    "a-file-missing": (
        lambda d: (d / "t10k-labels-idx1-ubyte").unlink(),
        ["missing t10k-labels-idx1-ubyte", "put the four IDX files there"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(IDX_DAMAGE))
def test_run_on_damaged_dataset_files(isolated, capsys, damage):
    folder = isolated / "fashion"
    folder.mkdir()
    for split, n in (("train", 20), ("t10k", 10)):
        write_idx(folder / f"{split}-images-idx3-ubyte", np.zeros((n, 28, 28), np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    damage_files, words = IDX_DAMAGE[damage]
    damage_files(folder)
    runs = isolated / "runs"
    cli_fails(capsys, ["run", "--dataset", "fashion-mnist", "--data-dir", str(folder),
                       "--out", str(runs)], *words)  # fmt: skip
    assert not runs.exists()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="synthetic", val_fraction=1.5), r"val_fraction=1.5 .*use 0 <= value < 1"),
        (dict(name="synthetic", train_limit="10"), r"train_limit='10' is invalid"),
        (dict(name="synthetic", test_limit=0), r"test_limit=0 is invalid.*positive integer"),
        (dict(name="synthetic", num_train=0), r"num_train=0 is invalid: use an integer >= 1"),
        (dict(name="synthetic", channels=1.5), r"channels=1.5 is invalid"),
        (dict(name="digits", image_size=4), r"digits takes no options, not image_size"),
        (dict(name="imagefolder:"), r"imagefolder needs a path"),
    ],
    ids=[
        "val-fraction",
        "limit-a-string",
        "test-limit-0",
        "empty-synthetic",
        "channels-float",
        "option-for-digits",
        "imagefolder-no-path",
    ],  # fmt: skip
)
def test_load_dataset_rejects(kwargs, message):
    with pytest.raises(UserError, match=message):
        load_dataset(kwargs.pop("name"), **kwargs)


# --------------------------------------------------------------------------- output folders


def test_run_into_an_existing_run_directory(isolated, capsys):
    runs = isolated / "runs"
    earlier = earlier_results(runs)
    before = snapshot(runs)
    cli_fails(capsys, ["run", *TINY, "--out", str(runs), "--name", "earlier"],
              f"{earlier} already exists and is not empty", "--overwrite",
              f"--resume {earlier}")  # fmt: skip
    assert snapshot(runs) == before


def test_train_into_an_existing_directory(isolated, capsys):
    runs = isolated / "runs"
    (runs / "dense").mkdir(parents=True)
    (runs / "dense" / "notes.txt").write_text("mine")
    before = snapshot(runs)
    cli_fails(capsys, ["train", "--dataset", "synthetic", "--batch-size", "50", "--out",
                       str(runs), "--name", "dense"], "already exists", "--overwrite")  # fmt: skip
    assert snapshot(runs) == before


def test_run_into_a_read_only_directory(isolated, capsys):
    runs = isolated / "runs"
    earlier_results(runs)
    runs.chmod(0o500)
    try:
        if os.access(runs, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes (see the next test)")
        before = snapshot(runs)
        cli_fails(capsys, ["run", *TINY, "--out", str(runs), "--name", "new"],
                  f"cannot write to {runs / 'new'}", "choose a writable --out")  # fmt: skip
        assert snapshot(runs) == before
    finally:
        runs.chmod(0o700)


@pytest.mark.parametrize("command", ["run", "train", "bench", "sweep"])
def test_output_below_a_file(isolated, capsys, command):
    blocker = isolated / "results.md"
    blocker.write_text("earlier results")
    out = blocker / "runs"
    if command in ("run", "train"):
        args = [command, "--dataset", "synthetic", "--train-limit", "200", "--out", str(out)]
    else:
        args = [command, "--preset", "smoke" if command == "bench" else "small", "--out", str(out)]
    cli_fails(capsys, args, "cannot write to", str(out), "--out")
    assert blocker.read_text() == "earlier results"


def test_bench_into_a_folder_of_other_files(isolated, capsys):
    out = isolated / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("months of work")
    before = snapshot(out)
    cli_fails(capsys, ["bench", "--preset", "smoke", "--out", str(out)],
              "already holds files that are not adasap preset results",
              "choose an empty or new --out")  # fmt: skip
    assert snapshot(out) == before


def test_sweep_into_a_folder_of_other_files(isolated, capsys):
    out = isolated / "mine"
    out.mkdir()
    (out / "results.jsonl").write_text('{"cell": "somebody else\'s"}\n')
    before = snapshot(out)
    cli_fails(capsys, ["sweep", "--preset", "small", "--out", str(out)],
              "not adasap sweep results", "choose an empty or new --out")  # fmt: skip
    assert snapshot(out) == before


def test_sweep_check_of_a_folder_with_no_sweep(isolated, capsys):
    out = isolated / "sweep"
    out.mkdir()
    (out / "sweep.jsonl").write_text(json.dumps(dict(
        run="r", method="sgd", settings={}, val_accuracy=0.9, val_extra_accuracy=0.8,
        val_cbar_accuracy=0.7, val_images=10, per_corruption={}, params=10, keep_achieved=0.5,
        seconds=1.0)) + "\n")  # fmt: skip
    cli_fails(capsys, ["sweep", "--preset", "small", "--out", str(out), "--report-only",
                       "--check"], "holds no bench.json", "that `adasap sweep` wrote")  # fmt: skip


@pytest.mark.parametrize(
    "preset_file,words",
    [
        ('{"preset": {"name": "another"}}\n', ["holds results of another preset", "another --out"]),
        ('{"preset": {"na', ["bench.json is damaged", "choose another --out"]),
    ],
    ids=["another-preset", "damaged-preset-file"],
)
def test_bench_into_a_folder_of_another_benchmark(isolated, capsys, preset_file, words):
    out = isolated / "bench"
    out.mkdir()
    (out / "bench.json").write_text(preset_file)
    (out / "results.jsonl").write_text('{"cell": "a"}\n')
    before = snapshot(out)
    cli_fails(capsys, ["bench", "--preset", "smoke", "--out", str(out)], *words)
    assert snapshot(out) == before


def test_bench_report_without_results(isolated, capsys):
    out = isolated / "bench"
    out.mkdir()
    cli_fails(capsys, ["bench", "--report-only", "--out", str(out)],
              "holds no results", "run the benchmark first")  # fmt: skip
    assert list(out.iterdir()) == []


def test_bench_with_an_unknown_preset(isolated, capsys):
    cli_fails(capsys, ["bench", "--preset", "huge", "--out", str(isolated / "b")],
              "invalid choice: 'huge'", "smoke", "--help")  # fmt: skip
    assert not (isolated / "b").exists()


# --------------------------------------------------------------------------- a full disk


def fill_disk_after(monkeypatch, fraction: float = 0.5) -> None:
    """Every ``Path.write_bytes`` writes part of its data, then the disk is full."""

    def write_bytes(self: Path, data: bytes) -> int:
        with open(self, "wb") as handle:
            handle.write(data[: int(len(data) * fraction)])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_full_disk_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old results")
    fill_disk_after(monkeypatch)
    with pytest.raises(UserError, match=r"no space left on the device to write .*results\.json"):
        atomic_write_text(target, "new results, much longer than the old ones")
    monkeypatch.undo()
    assert target.read_text() == "old results"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_run_on_a_full_disk_leaves_no_run_directory(isolated, capsys, monkeypatch):
    runs = isolated / "runs"
    earlier_results(runs)
    before = snapshot(runs)
    fill_disk_after(monkeypatch)
    cli_fails(capsys, ["run", *TINY, "--out", str(runs), "--name", "new"],
              "no space left on the device", "config.json", "free some space")  # fmt: skip
    monkeypatch.undo()
    assert snapshot(runs) == before


def test_latency_on_a_full_disk_keeps_the_old_report(run_dir, capsys, monkeypatch):
    old = run_dir / "latency.json"
    old.write_text('{"rows": ["earlier"]}\n')
    before = snapshot(run_dir)
    fill_disk_after(monkeypatch)
    cli_fails(capsys, ["latency", str(run_dir), "--batch-sizes", "1", "--repeats", "1"],
              "no space left on the device", "latency.json", "free some space")  # fmt: skip
    monkeypatch.undo()
    assert snapshot(run_dir) == before


def test_checkpoint_and_model_on_a_full_disk_keep_the_old_files(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})
    save_model(tmp_path, model, {"name": "linear"})
    before = snapshot(tmp_path)
    fill_disk_after(monkeypatch)
    with pytest.raises(UserError, match=r"no space left .*checkpoint\.pt.*choose another --out"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"step": 2, "weights": torch.ones(1000)})
    with pytest.raises(UserError, match=r"no space left .*model\.safetensors"):
        save_model(tmp_path, nn.Linear(3, 2), {"name": "linear"})
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- damaged model files


def _description(directory: Path) -> dict:
    return json.loads((directory / DESCRIPTION_FILE).read_text())


def _set_description(directory: Path, **changes) -> None:
    described = {**_description(directory), **changes}
    (directory / DESCRIPTION_FILE).write_text(json.dumps({k: v for k, v in described.items()
                                                          if v is not ...}))  # fmt: skip


DAMAGE = {
    "json-empty": lambda d: (d / DESCRIPTION_FILE).write_text(""),
    "json-truncated": lambda d: (d / DESCRIPTION_FILE).write_text(
        (d / DESCRIPTION_FILE).read_text()[:40]
    ),
    "json-binary": lambda d: (d / DESCRIPTION_FILE).write_bytes(b"\x89PNG\r\n\x1a\n"),
    "json-missing": lambda d: (d / DESCRIPTION_FILE).unlink(),
    "json-without-architecture": lambda d: _set_description(d, architecture=...),
    "json-edited-architecture": lambda d: _set_description(
        d, architecture={**SYNTHETIC, "depth": 20}
    ),
    "json-foreign-history": lambda d: _set_description(
        d, pruning_history=[["net.no_such_layer", True, [0, 1]]]
    ),
    "weights-empty": lambda d: (d / WEIGHTS_FILE).write_bytes(b""),
    "weights-truncated": lambda d: (d / WEIGHTS_FILE).write_bytes(
        (d / WEIGHTS_FILE).read_bytes()[:1000]
    ),
    "weights-missing": lambda d: (d / WEIGHTS_FILE).unlink(),
    "weights-corrupt-with-checksum": lambda d: (
        (d / WEIGHTS_FILE).write_bytes(b"\xff" * 64),
        _set_description(d, weights_sha256=hashlib.sha256(b"\xff" * 64).hexdigest()),
    ),
}
DAMAGE_WORDS = {
    "json-empty": ["model.json is not valid JSON", "damaged, re-run"],
    "json-truncated": ["model.json is not valid JSON", "damaged, re-run"],
    "json-binary": ["model.json is not valid JSON", "damaged, re-run"],
    "json-missing": ["model.json does not exist", "point at a run directory"],
    "json-without-architecture": ["model.json is damaged", "in_channels", "restore it or re-run"],
    "json-edited-architecture": ["not describe a model adasap can rebuild", "depth", "re-run"],
    "json-foreign-history": ["not describe a model adasap can rebuild", "no_such_layer", "re-run"],
    "weights-empty": ["does not match the checksum", "restore it or re-run"],
    "weights-truncated": ["does not match the checksum", "restore it or re-run"],
    "weights-missing": ["model.safetensors does not exist", "restore the file or re-run"],
    "weights-corrupt-with-checksum": ["not a valid safetensors file", "re-run"],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_load_a_damaged_model(tmp_path, damage):
    model_dir = write_model(tmp_path / "model")
    DAMAGE[damage](model_dir)
    words = DAMAGE_WORDS[damage]
    with pytest.raises(UserError) as caught:
        adasap.load(model_dir)
    for word in words:
        assert word in str(caught.value)


# each command on some of the damages (a model directory without model.json is not a model
# directory, so the commands see "no model" there: tested below)
COMMAND_DAMAGE = [
    ("eval", "json-empty"),
    ("eval", "weights-truncated"),
    ("eval", "json-edited-architecture"),
    ("export", "weights-missing"),
    ("export", "json-without-architecture"),
    ("export", "json-truncated"),
    ("latency", "weights-corrupt-with-checksum"),
    ("latency", "json-binary"),
    ("latency", "weights-empty"),
]


def _command(command: str, path: Path, tmp: Path) -> list[str]:
    return {
        "eval": ["eval", str(path), "--no-progress", "--corruptions", "none"],
        "export": ["export", str(path), "--onnx", str(tmp / "model.onnx")],
        "latency": ["latency", str(path), "--batch-sizes", "1", "--repeats", "1"],
    }[command]


@pytest.mark.parametrize(
    "command,damage", COMMAND_DAMAGE, ids=[f"{c}-{d}" for c, d in COMMAND_DAMAGE]
)
def test_command_on_a_damaged_model(run_dir, capsys, command, damage):
    DAMAGE[damage](run_dir / "sgd")
    before = snapshot(run_dir)
    cli_fails(capsys, _command(command, run_dir, run_dir.parent), *DAMAGE_WORDS[damage])
    assert snapshot(run_dir) == before
    assert not (run_dir.parent / "model.onnx").exists()


@pytest.mark.parametrize("command", ["eval", "export", "latency"])
def test_command_on_a_run_without_models(isolated, capsys, command):
    run = isolated / "run"
    earlier = earlier_results(run)  # a run directory whose models were never written
    before = snapshot(run)
    words = (
        ["holds no saved model", "pass a run directory or a model directory"]
        if command == "eval"
        else ["no models in", "point at a run directory written by a finished adasap run"]
    )
    cli_fails(capsys, _command(command, earlier, isolated), *words)
    assert snapshot(run) == before
    assert not (isolated / "model.onnx").exists()


@pytest.mark.parametrize("command", ["export", "latency"])
def test_command_on_a_path_that_does_not_exist(isolated, capsys, command):
    missing = isolated / "runs" / "2026-typo"
    cli_fails(capsys, _command(command, missing, isolated),
              f"{missing} is not a directory", "point at a run directory")  # fmt: skip
    assert not (isolated / "runs").exists()


@pytest.mark.parametrize(
    "command,words",
    [
        (["eval", "{run}", "--runtime", "tpu"], ["unknown runtime 'tpu'", "choose one of"]),
        (["latency", "{run}", "--runtime", "torch", "tpu"], ["unknown runtime 'tpu'"]),
        (["eval", "{run}", "--runtime", "openvino"], ["runtime 'openvino' cannot run here"]),
        (["latency", "{run}", "--runtime", "openvino"], ["runtime 'openvino' cannot run here"]),
        (["export", "{model}", "--int8", "--onnx", "{out}"],
         ["not in a run directory", "no training images to calibrate", "model of an adasap run"]),
    ],
    ids=["eval-unknown", "latency-unknown", "eval-missing", "latency-missing", "export-int8-bare"],
)  # fmt: skip
def test_runtime_of_a_saved_model(run_dir, capsys, monkeypatch, command, words):
    _without_openvino(monkeypatch)
    model = write_model(run_dir.parent / "model")  # outside a run
    out = run_dir.parent / "int8.onnx"
    before = snapshot(run_dir.parent)
    paths = {"run": run_dir, "model": model, "out": out}
    cli_fails(capsys, [part.format(**paths) for part in command], *words)
    assert snapshot(run_dir.parent) == before


def test_a_detector_runs_in_torch_only(isolated, capsys):
    from adasap.deploy.serialization import detection_architecture
    from adasap.models.detection import build_detector

    model_dir = isolated / "detector"
    save_model(model_dir, build_detector("tiny_ssd", num_classes=3, image_size=48),
               detection_architecture("tiny_ssd", 3, 48))  # fmt: skip
    before = snapshot(model_dir)
    for command in (["eval", str(model_dir), "--runtime", "ort"],
                    ["latency", str(model_dir), "--runtime", "ort-int8"]):  # fmt: skip
        cli_fails(capsys, command, "detection models are evaluated and timed in torch only",
                  "pass --runtime torch")  # fmt: skip
    assert snapshot(model_dir) == before


def test_eval_with_a_damaged_run_config(run_dir, capsys):
    (run_dir / "config.json").write_text('{"dataset": "synth')
    before = snapshot(run_dir)
    cli_fails(capsys, ["eval", str(run_dir)], "config.json is damaged", "restore it")
    assert snapshot(run_dir) == before


def test_resume_with_a_damaged_run_config(run_dir, capsys):
    (run_dir / "config.json").write_bytes(b"\x00\x01\x02")
    before = snapshot(run_dir)
    cli_fails(capsys, ["run", "--resume", str(run_dir)], "config.json is damaged", "restore it")
    assert snapshot(run_dir) == before


# --------------------------------------------------------------------------- data vs model


@pytest.mark.parametrize(
    "architecture,words",
    [
        (
            {**SYNTHETIC, "in_channels": 1, "mean": [0.5], "std": [0.25]},
            ["takes 1x16x16 images", "synthetic has 3x16x16 images", "--dataset"],
        ),
        ({**SYNTHETIC, "image_size": 8}, ["takes 3x8x8 images", "has 3x16x16"]),
        ({**SYNTHETIC, "num_classes": 3}, ["and 3 classes", "and 10 classes", "--dataset"]),
    ],
    ids=["channels", "image-size", "classes"],
)
def test_eval_on_data_the_model_was_not_built_for(isolated, capsys, architecture, words):
    model_dir = write_model(isolated / "model", architecture)
    before = snapshot(model_dir)
    cli_fails(capsys, ["eval", str(model_dir), "--dataset", "synthetic", "--test-limit", "20",
                       "--corruptions", "none", "--no-progress"], *words)  # fmt: skip
    assert snapshot(model_dir) == before


@pytest.fixture(scope="module")
def gray():
    """Tiny 1-channel 8x8 data with 3 classes, and its model."""
    data = load_dataset("synthetic", num_train=64, num_test=16, image_size=8, channels=1,
                        num_classes=3)  # fmt: skip
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=3, in_channels=1, image_size=8, mean=[0.5],
                        std=[0.25])  # fmt: skip
    return data, model


def _with_train_labels(data: DataBundle, labels: torch.Tensor) -> DataBundle:
    return DataBundle(data.spec, TensorImageSet(data.train.images, labels), data.val, data.test)


def test_prune_color_images_with_a_gray_model(gray):
    _, model = gray
    color = load_dataset("synthetic", num_train=64, num_test=16, image_size=8, channels=3,
                         num_classes=3)  # fmt: skip
    with pytest.raises(UserError, match=r"takes 1-channel images.*but the images are 3x8x8"):
        prune(model, color, **FAST)


def test_prune_large_images_with_a_small_mlp(gray):
    data, _ = gray
    large = load_dataset("synthetic", num_train=64, num_test=16, image_size=16, channels=1,
                         num_classes=3)  # fmt: skip
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(UserError, match=r"takes 64 values per image.*1x16x16 = 256 values"):
        prune(mlp, large, **FAST)
    # the same model on 8x8 images works (any channel count: half of its 32 hidden units in
    # multiples of 16 would leave it above half its MACs)
    assert prune(mlp, data, **FAST, round_to=1).size.params < 64 * 32


@pytest.mark.parametrize(
    "shift,message",
    [(5, r"training labels run from 5 to 7, but the model has 3 outputs"),
     (-1, r"training labels run from -1 to 1")],
    ids=["labels-too-large", "labels-negative"],
)  # fmt: skip
def test_prune_with_labels_out_of_range(gray, shift, message):
    data, model = gray
    bad = _with_train_labels(data, data.train.labels + shift)
    with pytest.raises(UserError, match=message):
        prune(model, bad, **FAST)


def test_evaluate_corruptions_with_images_or_labels_that_do_not_fit(gray, tmp_path):
    data, model = gray
    images, labels = data.test.float_images(), data.test.labels
    common = dict(dataset_key="gray", corruptions=["gaussian_noise"], severities=[1],
                  cache_dir=tmp_path, progress=False)  # fmt: skip
    with pytest.raises(UserError, match=r"takes 1-channel images.*3x8x8"):
        adasap.evaluate_corruptions(model, images.expand(-1, 3, -1, -1), labels, **common)
    with pytest.raises(UserError, match=r"labels run from 3 to 5.*3 outputs"):
        adasap.evaluate_corruptions(model, images, labels + 3, **common)
    with pytest.raises(UserError, match=r"labels must have shape \(16,\)"):
        adasap.evaluate_corruptions(model, images, labels[:5], **common)
    with pytest.raises(UserError, match=r"severity must be an integer from 1 to 5, got 9"):
        adasap.evaluate_corruptions(model, images, labels, **{**common, "severities": [9]})
    with pytest.raises(UserError, match=r"unknown corruption 'rain'"):
        adasap.evaluate_corruptions(model, images, labels, **{**common, "corruptions": ["rain"]})


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 3)),
        lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(1, 3, 1), nn.Flatten()),
    ],
    ids=["only-a-linear-classifier", "only-a-conv-classifier"],
)
def test_prune_a_model_without_prunable_layers(gray, make_model):
    data, _ = gray
    with pytest.raises(UserError, match="no prunable layers.*pass a model with convolutions"):
        prune(make_model(), data, **FAST)


def test_prune_to_a_size_that_would_empty_a_layer(gray):
    data, model = gray
    with pytest.raises(UserError, match=r"without emptying a layer.*keep a larger fraction"):
        prune(model, data, keep=0.0005, **FAST)


def test_prune_fails_on_an_unreachable_size_before_training(gray, monkeypatch):
    data, model = gray

    def no_training(*args, **kwargs):
        raise AssertionError("trained before finding that the target is unreachable")

    monkeypatch.setattr(pipeline.EpochLoop, "run", no_training)
    with pytest.raises(UserError, match=r"without emptying a layer"):
        prune(model, data, **{**FAST, "warmup_epochs": 3, "keep": 0.0005})


def test_prune_with_fewer_images_than_a_batch(gray):
    data, model = gray
    few = DataBundle(data.spec, TensorImageSet(data.train.images[:8], data.train.labels[:8]),
                     data.val, data.test)  # fmt: skip
    with pytest.raises(UserError, match=r"training set has fewer images than the batch size 16"):
        prune(model, few, **FAST)


def test_prune_a_model_whose_classifier_is_not_found(gray):
    data, _ = gray  # 3 classes, but the model has 5 outputs
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))  # fmt: skip
    with pytest.raises(UserError, match=r"no classifier with 3 outputs.*ignored_layers="):
        prune(model, data, **FAST)


def test_select_neurons_below_the_floor(gray):
    data, model = gray
    example = data.train.float_images()[:2]
    layout = NeuronLayout(model, example, [find_classifier(model, 3)])
    size = measure_size(model, example)
    predict = size_predictor(layout, size, "params")
    scores = magnitude_scores(layout)
    with pytest.raises(UserError, match=r"cannot reach 10 params without emptying a layer"):
        select_neurons(layout, scores, 10, predict)
    assert len(select_neurons(layout, scores, size.params // 2, predict)) > 0  # reachable is fine


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(keep=0), r"keep fraction must be in \(0, 1\], got 0"),
        (dict(keep=1.5), r"keep fraction must be in \(0, 1\], got 1.5"),
        (dict(warmup_epochs=-1), r"warmup_epochs must be >= 0, got -1"),
        (dict(finetune_epochs=-2), r"finetune_epochs must be >= 0, got -2"),
        (dict(rho_min=0.3, rho_max=0.1), r"0 <= rho_min <= rho_max.*rho_min=0.3"),
        (dict(batch_size=0), r"batch_size must be >= 1, got 0"),
        (dict(kepp=0.5), r"unknown setting\(s\) kepp: allowed are"),
        (dict(keep="0.5"), r"keep must be a number, got '0.5' \(str\)"),
        (dict(prune_steps=2.0), r"prune_steps must be an integer, got 2.0"),
        (dict(lr=True), r"lr must be a number, got True \(bool\)"),
        (dict(amp=True), r"amp must be a string, got True"),
        (dict(amp="yes"), r"amp must be one of auto, bf16, fp16, off, got 'yes'"),
        (dict(method=None), r"method must be a string"),
        (
            dict(finetune_sharpness="ssam"),
            r"finetune_sharpness must be one of 'sam', 'asam' or None, got 'ssam'",
        ),
        (dict(finetune_rho=-1.0), r"finetune_rho must be a number >= 0 or none \(rho\), got -1"),
    ],
    ids=[
        "keep-0",
        "keep-1.5",
        "warmup-negative",
        "finetune-negative",
        "rho-min-above-max",
        "batch-size-0",
        "misspelt-setting",
        "keep-string",
        "steps-float",
        "lr-bool",
        "amp-bool",
        "amp-unknown",
        "method-none",
        "finetune-sharpness-unknown",
        "finetune-rho-negative",
    ],  # fmt: skip
)
def test_bad_prune_settings(overrides, message):
    with pytest.raises(UserError, match=message):
        with_overrides(PruneSettings(), overrides).validate()


def test_run_experiment_checks_before_writing(isolated):
    runs = isolated / "runs"
    earlier_results(runs)
    before = snapshot(runs)
    base = dict(dataset="synthetic", train_limit=200, test_limit=50, out_dir=str(runs))
    with pytest.raises(UserError, match=r"corruption_limit=0 is invalid"):
        run_experiment(ExperimentConfig(**base, corruption_limit=0))
    with pytest.raises(UserError, match=r"no methods given: pass e.g. --methods"):
        run_experiment(ExperimentConfig(**base, methods=()))
    with pytest.raises(UserError, match=r"earlier already exists and is not empty"):
        run_experiment(ExperimentConfig(**base, name="earlier"))
    assert snapshot(runs) == before


# --------------------------------------------------------------------------- deployment


def test_export_to_a_path_that_cannot_be_written(run_dir, capsys):
    blocker = run_dir.parent / "exports"
    blocker.write_text("not a folder")
    before = snapshot(run_dir)
    onnx = blocker / "sgd.onnx"
    cli_fails(capsys, ["export", str(run_dir), "--onnx", str(onnx)],
              f"cannot write to {onnx}", "choose a writable file path for --onnx")  # fmt: skip
    assert blocker.read_text() == "not a folder"
    assert snapshot(run_dir) == before


def test_export_onto_a_directory(run_dir, capsys):
    target = run_dir.parent / "exports"
    target.mkdir()
    (target / "older.onnx").write_bytes(b"older export")
    cli_fails(capsys, ["export", str(run_dir), "--onnx", str(target)],
              "it is a directory", "give a file path like out.onnx")  # fmt: skip
    assert [p.name for p in target.iterdir()] == ["older.onnx"]
    assert (target / "older.onnx").read_bytes() == b"older export"


def test_export_with_an_unsupported_opset(run_dir, capsys):
    onnx = run_dir.parent / "sgd.onnx"
    cli_fails(capsys, ["export", str(run_dir), "--onnx", str(onnx), "--opset", "9"],
              "ONNX opset 9 is not supported", "use 17 to")  # fmt: skip
    assert not onnx.exists()


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--batch-sizes", "0"], ["batch sizes must be >= 1", "got [0]", "e.g. 1 64"]),
        (["--repeats", "0"], ["repeats >= 1", "got 5 and 0"]),
        (["--repeats", "many"], ["--repeats", "invalid int value: 'many'", "--help"]),
        (["--device", "tpu"], ["unknown device 'tpu'", "use auto, cpu or cuda"]),
    ],
    ids=["batch-size-0", "repeats-0", "repeats-a-word", "unknown-device"],
)
def test_latency_with_bad_timing_options(run_dir, capsys, flags, words):
    before = snapshot(run_dir)
    cli_fails(capsys, ["latency", str(run_dir), *flags], *words)
    assert snapshot(run_dir) == before
