"""Scale-out settings (docs/distributed.md, docs/paper.md): SyncBatchNorm, loader workers,
ImageNet-C and ImageNet-V2 from the command line, the paper preset and its 8-GPU command."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

import adasap
from adasap import cli, distributed
from adasap.data import default_workers, load_dataset
from adasap.data import folders as folder_module
from adasap.deploy.serialization import save_model
from adasap.errors import UserError
from adasap.experiments.commands import evaluate_path
from adasap.experiments.dense import load_data
from adasap.experiments.presets import PRESETS, Cell
from adasap.method.pruner import Pruner
from adasap.method.schedule import PhaseSchedule
from adasap.models.builders import build_model
from adasap.robustness.official import load_imagenet_v2
from adasap.robustness.report import SOURCE_RENDERED
from adasap.tasks.evaluate import evaluate_accuracy
from adasap.training import pipeline
from adasap.training.settings import PruneSettings
from test_distributed import ROOT, bn_net, plain_net, run_ranks, tiny_data


def _image(path: Path, level: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size, size, 3), level, dtype=np.uint8)
    array[: size // 2] = 255 - level  # not flat, so that crops and resizes differ
    Image.fromarray(array).save(path, format="PNG")


def _imagenet_tree(root: Path, classes=("n01", "n02", "n03"), per_class: int = 2) -> Path:
    for split in ("train", "val"):
        for c, wnid in enumerate(classes):
            for i in range(per_class):
                _image(root / split / wnid / f"{i}.png", 40 * c + 10 * i + 5)
    return root


# --------------------------------------------------------------------------- SyncBatchNorm


def test_sync_bn_converts_only_under_torchrun(monkeypatch):
    model = bn_net()
    pipeline.sync_batchnorm(model, PruneSettings(sync_bn=True))  # one process: BatchNorm as is
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    monkeypatch.setattr(pipeline, "is_distributed", lambda: True)
    pipeline.sync_batchnorm(model, PruneSettings(sync_bn=False))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    pipeline.sync_batchnorm(model, PruneSettings(sync_bn=True))
    converted = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(converted) == 2 and not any(type(m) is nn.BatchNorm2d for m in model.modules())
    # the converted layers keep their values, so a saved model loads as BatchNorm
    assert list(model.state_dict()) == list(bn_net().state_dict())
    assert torch.equal(model.state_dict()["1.weight"], bn_net().state_dict()["1.weight"])


def test_a_syncbatchnorm_model_is_pruned_like_its_batchnorm_twin():
    """torch-pruning and adasap's layout treat SyncBatchNorm as BatchNorm (outside a process
    group its forward is BatchNorm's): the same channels go, with the same values left."""
    example = tiny_data(4)[0]

    def pruned(sync: bool) -> nn.Module:
        torch.manual_seed(0)
        model = build_model(
            "resnet20", num_classes=4, in_channels=1, image_size=8, mean=(0.5,), std=(0.25,)
        )
        if sync:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        schedule = PhaseSchedule(0, 1, 0, removals=1)
        pruner = Pruner(model, example, schedule, keep=0.5, criterion="magnitude", round_to=1)
        pruner.remove(1.0)
        model.train()(example)  # the training forward runs outside a process group
        return model

    plain, synced = pruned(False), pruned(True)
    norms = [m for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(norms) == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) > 10
    reference = plain.state_dict()
    assert {k: v.shape for k, v in synced.state_dict().items()} == {
        k: v.shape for k, v in reference.items()
    }
    assert reference["net.conv1.weight"].shape[0] < 16  # really pruned
    for key, value in synced.state_dict().items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, reference[key]), key


def test_sync_bn_and_workers_flags_reach_the_config():
    parser = cli.build_parser()
    for command in ("run", "train"):
        config, _ = cli.config_from_args(parser.parse_args([command, "--sync-bn"]))
        assert config.prune.sync_bn and config.to_flat()["sync_bn"] is True
    default, _ = cli.config_from_args(parser.parse_args(["run"]))
    assert not default.prune.sync_bn and default.workers is None
    evaluate, _ = cli.config_from_args(parser.parse_args(["eval", "runs/x", "--workers", "2"]))
    assert evaluate.workers == 2


def _prune_with_sync_bn_on_the_cpu() -> str:
    try:
        adasap.prune(bn_net(), tiny_data(), sync_bn=True, device="cpu", keep=0.5, progress=False)
    except UserError as exc:
        return str(exc)
    return "no error"


def test_sync_bn_on_the_cpu_under_torchrun_is_one_clear_error(tmp_path):
    messages = run_ranks(tmp_path, _prune_with_sync_bn_on_the_cpu)
    assert messages[0] == messages[1]
    assert messages[0].startswith("sync_bn needs CUDA: SyncBatchNorm runs on GPUs only")
    assert "drop --sync-bn" in messages[0]


# --------------------------------------------------------------------------- loader workers


def test_default_workers_share_the_cores_between_torchrun_processes(monkeypatch):
    monkeypatch.setattr(folder_module.os, "cpu_count", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 8  # at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_workers() == 4
    monkeypatch.setattr(folder_module.os, "cpu_count", lambda: 2)
    assert default_workers() == 1  # never 0: decoding stays off the training process


def test_workers_setting_reaches_the_folder_loader(tmp_path):
    root = _imagenet_tree(tmp_path / "imagenet")
    args = cli.build_parser().parse_args(
        ["run", "--dataset", f"imagefolder:{root}", "--workers", "3"]
    )
    config, _ = cli.config_from_args(args)
    data = load_data(config.validate())
    assert data.train.num_workers == data.test.num_workers == 3
    assert load_data(config.__class__(dataset=f"imagefolder:{root}")).train.num_workers == (
        default_workers()
    )
    synthetic = cli.build_parser().parse_args(["run", "--dataset", "synthetic", "--workers", "3"])
    cli.config_from_args(synthetic)[0].validate()  # in-memory data ignores it
    bad = cli.build_parser().parse_args(["run", "--workers", "-1"])
    with pytest.raises(UserError, match="workers must be >= 0, got -1"):
        cli.config_from_args(bad)[0].validate()


def test_folder_batches_use_worker_processes_and_pinned_memory_on_cuda(tmp_path, monkeypatch):
    root = _imagenet_tree(tmp_path / "imagenet")
    data = load_dataset(f"imagefolder:{root}", image_size=8, num_workers=2)
    made = {}

    class Recorded(Exception):
        pass

    def fake_loader(dataset, **kwargs):
        made.update(kwargs)
        raise Recorded

    monkeypatch.setattr(torch.utils.data, "DataLoader", fake_loader)
    for device in ("cuda", "cpu"):
        with pytest.raises(Recorded):
            next(adasap.data.batches(data.train, 2, shuffle=True, augment=True, device=device))
        assert made["num_workers"] == 2
        assert made["pin_memory"] is (device == "cuda")


# ----------------------------------------------------------------- ImageNet-C and ImageNet-V2


def test_eval_reads_imagenet_c_and_imagenet_v2_folders_from_the_command_line(
    tmp_path, capsys, monkeypatch
):
    root = _imagenet_tree(tmp_path / "imagenet", per_class=1)
    for corruption in ("gaussian_noise", "gaussian_blur"):  # --corruptions quick
        for severity in range(1, 6):
            for c, wnid in enumerate(("n01", "n02", "n03")):
                _image(tmp_path / "c" / corruption / str(severity) / wnid / "a.png", 30 * c)
    for index, count in ((0, 1), (1, 2), (2, 3)):  # ImageNet-V2: folders named by class index
        for i in range(count):  # unequal counts: each prediction gives its own accuracy
            _image(tmp_path / "v2" / str(index) / f"{i}.png", 60 * index + 20 * i, size=10)
    torch.manual_seed(0)
    architecture = dict(
        name="resnet20", num_classes=3, in_channels=3, image_size=224,
        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
    )  # fmt: skip
    model = build_model(**architecture)
    save_model(tmp_path / "model", model, architecture)
    args = [
        "eval", str(tmp_path / "model"), "--dataset", f"imagefolder:{root}", "--device", "cpu",
        "--corruptions", "quick", "--official", "imagenet-c", "--official-dir",
        str(tmp_path / "c"), "--imagenet-v2", str(tmp_path / "v2"), "--workers", "0",
        "--cache-dir", str(tmp_path / "cache"), "--no-progress",
    ]  # fmt: skip
    assert cli.main(args) == 0, capsys.readouterr().err
    assert "ImageNet-V2" in capsys.readouterr().out
    report = json.loads((tmp_path / "model" / "corruptions.json").read_text())
    assert report["source"] == "ImageNet-C official files"
    parsed = cli.build_parser().parse_args(args)
    config, _ = cli.config_from_args(parsed)
    # rendered corruptions of an image folder: its render cache needs a safe folder name
    (row,) = evaluate_path(parsed.path, config, None, imagenet_v2=parsed.imagenet_v2)
    assert row.corruption_source == SOURCE_RENDERED
    v2 = load_imagenet_v2(tmp_path / "v2", resize=256, crop=224)
    assert v2.labels.tolist() == [0, 1, 1, 2, 2, 2]
    assert row.shift_accuracy == evaluate_accuracy(model.eval(), v2, device="cpu")
    assert row.shift_accuracy in (1 / 6, 2 / 6, 3 / 6)


# --------------------------------------------------------------------------- the paper preset


def _paper_files(tmp_path: Path) -> list[str]:
    """docs/paper.md's 8-GPU command, less ``torchrun ... -m adasap``, and its YAML file."""
    text = (ROOT / "docs" / "paper.md").read_text()
    config = re.search(r"```yaml\n(.*?)```", text, re.S)
    command = re.search(r"```bash\n(torchrun --nproc_per_node 8 .*?)\n```", text, re.S)
    assert config and command, "docs/paper.md lacks the 8-GPU config or command"
    (tmp_path / "paper-8gpu.yaml").write_text(config.group(1))
    words = shlex.split(command.group(1).replace("\\\n", " "))
    args = words[words.index("adasap") + 1 :]
    return [str(tmp_path / a) if a == "paper-8gpu.yaml" else a for a in args]


def test_the_paper_command_is_the_preset_at_eight_gpus(tmp_path):
    """The documented torchrun command runs the preset's adasap/Taylor/keep-40% cell with
    HALP's global batch of 1024 (8 x 128) and its learning rate 1.024 (the preset's 0.256 at
    batch 256, scaled linearly)."""
    args = _paper_files(tmp_path)
    assert args[0] == "run"
    config, _ = cli.config_from_args(cli.build_parser().parse_args(args))
    preset = PRESETS["paper"]
    cell = {**preset.base, "methods": ["adasap"], "criterion": "taylor", "keep": 0.4, "seed": 0}
    cell.update(dataset="imagefolder:/data/imagenet", batch_size=128, lr=1.024, dense_lr=1.024)
    flat = config.to_flat()
    assert {key: flat[key] for key in cell} == cell
    assert Cell("adasap", "taylor", 0.4, 0) in preset.cells()
    assert not config.prune.sync_bn and config.workers is None


def test_the_paper_preset_validates_on_an_imagenet_layout(tmp_path):
    root = _imagenet_tree(tmp_path / "imagenet")
    preset = PRESETS["paper"].with_base(dataset=f"imagefolder:{root}")
    configs = [preset.config(cell) for cell in preset.cells()]
    assert len(configs) == 10 and {c.model for c in configs} == {"resnet50"}
    assert {c.prune.keep for c in configs} == {0.4, 0.2}
    s = configs[0].prune
    assert (s.warmup_epochs + s.prune_epochs + s.finetune_epochs, configs[0].dense_epochs) == (
        90.0,
        90.0,
    )


# --------------------------------------------------------------------------- two machines

TINY_RUN = [
    "-m", "adasap", "run", "--device", "cpu", "--dataset", "synthetic", "--train-limit", "192",
    "--test-limit", "32", "--corruptions", "none", "--dense-epochs", "1", "--warmup-epochs", "1",
    "--prune-epochs", "1", "--finetune-epochs", "1", "--prune-steps", "1", "--batch-size", "16",
    "--no-progress",
]  # fmt: skip


def _launch(tmp_path: Path, name: str, *torchrun: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", *torchrun, *TINY_RUN,
        "--out", str(tmp_path / "runs"), "--name", name, "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_equal_one_node_with_two_processes(tmp_path):
    """Two torchrun "machines" (one process each, c10d rendezvous on this host) run the job
    that one torchrun with 2 processes runs: rank 0 alone writes and prints, and the pruned
    models are the same, bit for bit (the same 2 ranks, whichever node each landed on)."""
    single = _launch(tmp_path, "one-node", "--standalone", "--nproc_per_node", "2")
    out, err = single.communicate(timeout=900)
    assert single.returncode == 0, err.decode()[-3000:]
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [
        _launch(
            tmp_path, "two-nodes", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
            str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id",
            "two-nodes",
        )
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=900) for node in nodes]
    for node, (_, node_err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, node_err.decode()[-3000:]
    printed = [node_out.decode() for node_out, _ in outputs]
    assert sum(text.count("results:") for text in printed) == 1  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["one-node", "two-nodes"]
    runs = tmp_path / "runs"
    assert sorted(p.name for p in (runs / "two-nodes").iterdir()) == sorted(
        p.name for p in (runs / "one-node").iterdir()
    )
    for method in ("sgd", "adasap"):
        theirs = adasap.load(runs / "one-node" / method).state_dict()
        ours = adasap.load(runs / "two-nodes" / method).state_dict()
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), (method, key)
    results = [json.loads((runs / n / "results.json").read_text()) for n in os.listdir(runs)]
    accuracies = [[row["clean_accuracy"] for row in r["rows"]] for r in results]
    assert accuracies[0] == accuracies[1]


# ------------------------------------------------------------- fp16 under DDP, local ascent


def _one_rank_overflows() -> dict:
    model = plain_net()
    x, y = tiny_data(16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    schedule = adasap.PhaseSchedule(2, 0, 0, removals=0)
    pruner = Pruner(model, x[:2], schedule, method="sam", keep=1.0, scaler=scaler)
    net = pruner.distribute()  # local ascent: each rank's first pass stays its own
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def overflow_on_rank_1() -> torch.Tensor:
        calls.append(1)
        loss = F.cross_entropy(net(x), y)
        first = len(calls) == 1 and distributed.rank() == 1
        return loss * torch.tensor(float("inf")) if first else loss

    pruner.step(overflow_on_rank_1)
    unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    scale = scaler.get_scale()
    pruner.step(lambda: F.cross_entropy(net(x), y))  # the ranks stay in step afterwards
    return {
        "unchanged": unchanged,
        "scale": scale,
        "fingerprint": distributed.model_fingerprint(model),
    }


def test_an_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """With a local ascent only rank 1's first gradient overflows; every rank skips the
    second pass (whose all-reduce needs them all) and the update, and the scalers agree."""
    ranks = run_ranks(tmp_path, _one_rank_overflows)
    assert [r["unchanged"] for r in ranks] == [True, True]
    assert [r["scale"] for r in ranks] == [2.0**3, 2.0**3]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert ranks[0]["fingerprint"] != distributed.model_fingerprint(plain_net())  # then trained
