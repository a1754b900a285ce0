"""Data-parallel training (docs/distributed.md): 2 Gloo processes on the CPU, forked by the test.

Every test starts its ranks with ``torch.multiprocessing`` (fork: the children share the
imported modules, so a test takes seconds); each rank returns a result through a file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import adasap
from adasap import distributed
from adasap.data import training_source
from adasap.errors import UserError

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


def _entry(rank: int, init: str, out: str, target, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        torch.save(target(*args), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path: Path, target, *args) -> list:
    """``target(*args)`` on each of 2 ranks of a Gloo group; their return values, by rank."""
    out = tmp_path / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    rendezvous = tmp_path / f"rendezvous-{uuid.uuid4().hex}"  # a fresh one for every job
    mp.start_processes(
        _entry,
        args=(str(rendezvous), str(out), target, args),
        nprocs=WORLD,
        start_method="fork",
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def tiny_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.rand(n, 1, 8, 8, generator=generator) * 0.5
    images[torch.arange(n), 0, labels, labels] += 0.5  # learnable: a bright pixel per class
    return images, labels


def plain_net(seed: int = 0) -> nn.Module:
    """No BatchNorm: per-rank batch statistics would make 2 x B differ from 1 x 2B."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


SETTINGS = dict(
    method="adasap",
    criterion="taylor",
    keep=0.5,
    warmup_epochs=1,
    prune_epochs=2,
    finetune_epochs=1,
    prune_steps=2,
    lr=0.05,
    rho_min=0.02,
    rho_max=0.2,
    device="cpu",
    channels_last=False,
    amp="off",  # float32: the sums of 2 x B and of 2B rows agree to 1e-4, bfloat16's do not
    progress=False,
)


def prune_tiny(net: str, batch_size: int, overrides: dict) -> dict:
    model = {"plain": plain_net, "bn": bn_net}[net]()
    result = adasap.prune(model, tiny_data(), **{**SETTINGS, "batch_size": batch_size, **overrides})
    return {
        "state": {k: v.clone() for k, v in result.model.state_dict().items()},
        "fingerprint": distributed.model_fingerprint(result.model),
        "history": result.history,
    }


def test_synchronised_ascent_on_two_ranks_equals_one_process_with_the_global_batch(tmp_path):
    ranks = run_ranks(tmp_path, prune_tiny, "plain", 8, dict(sync_ascent=True))
    single = prune_tiny("plain", 16, dict(sync_ascent=True))
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    state, reference = ranks[0]["state"], single["state"]
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
    assert state["0.weight"].shape[0] < 8  # really pruned
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # the epoch statistics are those of the whole global batch
    for mine, theirs in zip(ranks[0]["history"], single["history"], strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert mine["train_accuracy"] == pytest.approx(theirs["train_accuracy"])


def local_ascent_runs() -> list[dict]:
    return [prune_tiny(net, 8, {}) for net in ("bn", "plain")]


def test_local_ascent_keeps_the_ranks_identical(tmp_path):
    """Each rank perturbs with its own gradient; BatchNorm statistics are per rank."""
    (bn, plain), (bn_1, plain_1) = run_ranks(tmp_path, local_ascent_runs)
    assert (
        bn["fingerprint"] == bn_1["fingerprint"] and plain["fingerprint"] == plain_1["fingerprint"]
    )
    for key, value in bn["state"].items():  # buffers too: rank 0's after training
        assert torch.equal(value, bn_1["state"][key]), key
    # not the step of one process with the global batch (which a synchronised ascent takes)
    single = prune_tiny("plain", 16, dict(sync_ascent=True))["state"]
    assert any(
        v.shape != single[k].shape or not torch.allclose(v, single[k], atol=1e-4)
        for k, v in plain["state"].items()
    )


def same_boxes_canvases(count: int = 8):
    """Canvases of different noise with the same boxes, left-right symmetric: every image (and
    its flip) matches the same anchors, so each rank's detector loss, normalised by its own
    matched anchors, is its share of the global batch's, and 2 x B on two ranks is 2B in one
    process (the detector has no BatchNorm, whose statistics would be per rank)."""
    from adasap.data.detection import DetectionSet, DetectionSpec, make_target

    generator = torch.Generator().manual_seed(0)
    images = []
    for _ in range(count):
        image = torch.randint(0, 60, (3, 64, 64), generator=generator, dtype=torch.uint8)
        image[:, 6:18, 26:38] = 230
        image[:, 30:62, 16:48] = 230
        images.append(image)
    target = make_target([[26.0, 6, 38, 18], [16.0, 30, 48, 62]], [1, 2])
    spec = DetectionSpec("boxes", ("small", "large"), 64)
    return DetectionSet(images, [target] * count, spec)


def without_batchnorm(model: nn.Module) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.Identity())
    return model


def prune_detector_tiny(batch_size: int) -> dict:
    from adasap.models.detection import build_detector

    torch.manual_seed(0)
    model = without_batchnorm(build_detector("tiny_ssd", num_classes=3, image_size=64))
    data = same_boxes_canvases()
    # one removal, before any update: a near-tie of two scores could go either way under the
    # rounding differences of the two setups and change the architecture
    settings = {**SETTINGS, "criterion": "magnitude", "lr": 0.01, "batch_size": batch_size,
                "warmup_epochs": 0, "prune_steps": 1}  # fmt: skip
    result = adasap.prune(model, data, data, task="detection", sync_ascent=True, **settings)
    return {
        "state": {k: v.clone() for k, v in result.model.state_dict().items()},
        "fingerprint": distributed.model_fingerprint(result.model),
        "history": result.history,
        "dense_weights": sum(
            v.numel() for k, v in model.state_dict().items() if k.endswith("weight")
        ),
    }


def test_detection_on_two_ranks_equals_one_process_with_the_global_batch(tmp_path):
    ranks = run_ranks(tmp_path, prune_detector_tiny, 2)
    single = prune_detector_tiny(4)
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    state, reference = ranks[0]["state"], single["state"]
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
    pruned = sum(v.numel() for k, v in state.items() if k.endswith("weight"))
    assert pruned < 0.6 * single["dense_weights"]  # really pruned
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for mine, theirs in zip(ranks[0]["history"], single["history"], strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert mine["val_map_50"] == pytest.approx(theirs["val_map_50"])


def own_loop(rank_scores: bool) -> str:
    """A user's DDP loop around Pruner; ``rank_scores``: a criterion that differs by rank."""
    model = plain_net()
    images, labels = tiny_data()
    loader = training_source((images, labels), batch_size=8, shard=distributed.shard())

    def criterion(layout):
        scores = torch.arange(layout.num_neurons, dtype=torch.float32)
        return scores.flip(0) if rank_scores and distributed.rank() == 1 else scores

    schedule = adasap.PhaseSchedule(2, 1, 1, removals=1)
    pruner = adasap.Pruner(model, images[:2], schedule, criterion=criterion, keep=0.5)
    net = pruner.distribute()
    try:
        for x, y in loader.epoch(0):
            pruner.step(lambda x=x, y=y: F.cross_entropy(net(x), y))
    except UserError as exc:
        return str(exc)
    return distributed.model_fingerprint(model)


def test_pruner_in_a_users_ddp_loop_rebuilds_the_wrapper_after_removal(tmp_path):
    ranks = run_ranks(tmp_path, own_loop, False)
    assert ranks[0] == ranks[1]
    dense = distributed.model_fingerprint(plain_net())
    assert [shape for _, shape, _ in ranks[0]] != [shape for _, shape, _ in dense]  # pruned


def test_ranks_that_remove_different_neurons_fail_clearly(tmp_path):
    messages = run_ranks(tmp_path, own_loop, True)
    for message in messages:
        assert "after the removal at step 2, rank 1's model differs from rank 0's" in message
        assert "same scores on every rank" in message


def _sharded_counts(data) -> tuple:
    from adasap.tasks.evaluate import count_correct

    model = plain_net()
    source = training_source(data, batch_size=4, shard=distributed.shard())
    labels = [y.tolist() for _, y in source.epoch(0)]
    return count_correct(model, data, batch_size=8, sharded=True), labels, len(source)


def test_sharded_sources_split_every_global_batch_and_evaluation_adds_up(tmp_path):
    images, labels = tiny_data(36)
    ranks = run_ranks(tmp_path, _sharded_counts, (images, labels))
    from adasap.tasks.evaluate import count_correct

    assert ranks[0][0] == ranks[1][0] == count_correct(plain_net(), (images, labels))
    whole = training_source((images, labels), batch_size=8)  # the global batch: 2 x 4
    assert ranks[0][2] == ranks[1][2] == len(whole) == 4
    for step, (_, y) in enumerate(whole.epoch(0)):
        assert ranks[0][1][step] == y[:4].tolist() and ranks[1][1][step] == y[4:].tolist()


def _corruption_accuracy(cache: str) -> tuple:
    from adasap.robustness import evaluation

    images, labels = tiny_data(30)
    rendered, render = [], evaluation.render_cached
    evaluation.render_cached = lambda *a, **k: rendered.append(a[2:4]) or render(*a, **k)
    try:
        report = adasap.evaluate_corruptions(
            plain_net(),
            (images, labels),
            dataset_key="tiny",
            corruptions=("gaussian_noise", "gaussian_blur"),
            severities=(1, 3, 5),
            batch_size=8,
            cache_dir=cache,
            progress=False,
            sharded=True,
        )
    finally:
        evaluation.render_cached = render
    return (report.clean_accuracy, report.accuracy, report.num_images), rendered


def test_corrupted_evaluation_splits_its_cells_over_the_ranks(tmp_path):
    (ours, cells), (theirs, other_cells) = run_ranks(
        tmp_path, _corruption_accuracy, str(tmp_path / "cache")
    )
    single, all_cells = _corruption_accuracy(str(tmp_path / "cache"))  # no group: all cells
    assert ours == theirs == single
    assert len(cells) == len(other_cells) == 3  # each rank renders and evaluates its half
    assert sorted(cells + other_cells) == sorted(all_cells)


def test_one_process_without_torchrun_is_unchanged():
    """No process group: every helper is the single-process identity (no collective)."""
    assert distributed.shard() == (0, 1) and distributed.is_main()
    assert not distributed.is_distributed() and not distributed.any_rank(False)
    assert distributed.on_main(lambda: 42) == 42 and distributed.broadcast_value("x") == "x"
    values = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_mean(values), values)
    distributed.check_same_model(plain_net(), "nothing")
    with pytest.raises(UserError, match="run directory exists"):
        distributed.on_main(lambda: (_ for _ in ()).throw(UserError("run directory exists")))


def test_under_torchrun_cuda_is_the_process_s_own_gpu(monkeypatch):
    from adasap.devices import resolve_device

    for name, value in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")  # asked for by number: kept
    assert resolve_device("cpu") == torch.device("cpu")


def _train_and_maybe_die(out: str, kill_at: int | None) -> dict:
    """Prune with checkpoints; rank 1 kills itself (SIGKILL) after step ``kill_at``."""
    if kill_at is not None and distributed.rank() == 1:
        original = adasap.Pruner.step

        def step(self, closure):
            if self.steps_done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, closure)

        adasap.Pruner.step = step
    model = bn_net()
    result = adasap.prune(model, tiny_data(), **{**SETTINGS, "batch_size": 8}, checkpoint_dir=out)
    return {k: v.clone() for k, v in result.model.state_dict().items()}


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_resume_continues_exactly(tmp_path):
    straight = run_ranks(tmp_path / "a", _train_and_maybe_die, str(tmp_path / "a"), None)[0]
    (tmp_path / "b").mkdir()
    with pytest.raises(Exception):  # noqa: B017 (the job dies with its rank)
        run_ranks(tmp_path / "b", _train_and_maybe_die, str(tmp_path / "b"), 6)
    checkpoint = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert checkpoint["loop"]["step"] == 4  # the last epoch's (4 steps each), intact
    resumed = run_ranks(tmp_path / "b", _train_and_maybe_die, str(tmp_path / "b"), None)[0]
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


# torchrun's workers otherwise share its rendezvous store, where a restarted worker may read
# the previous attempt's addresses (pytorch/pytorch#135712; docs/distributed.md)
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


CLASSIFICATION_JOB = (
    "--dataset", "synthetic", "--train-limit", "256", "--test-limit", "64",
    "--corruption-limit", "32", "--warmup-epochs", "1", "--prune-epochs", "2",
    "--finetune-epochs", "2", "--prune-steps", "2", "--batch-size", "16",
)  # fmt: skip


def _torchrun(
    tmp_path: Path, name: str, *extra: str, job: tuple[str, ...] = CLASSIFICATION_JOB
) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        *extra,
        "-m", "adasap", "run", "--device", "cpu", *job, "--corruptions", "quick",
        "--dense-epochs", "1", "--out", str(tmp_path / "runs"), "--name", name,
        "--cache-dir", str(tmp_path / "cache"), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **RESTARTABLE}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_torchrun_command_line_and_elastic_restart_after_a_killed_rank(tmp_path):
    """``torchrun -m adasap run`` on 2 CPU processes prints one table; a worker killed mid-run
    is restarted by torchrun (--max-restarts), which continues the named run exactly."""
    straight = _torchrun(tmp_path, "straight")
    out, err = straight.communicate(timeout=900)
    assert straight.returncode == 0, err.decode()[-3000:]
    assert out.decode().count("results:") == 1  # rank 0 alone prints
    restarted = _torchrun(tmp_path, "restarted", "--max-restarts", "1")
    checkpoint = tmp_path / "runs" / "restarted" / "adasap" / "checkpoint.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(restarted.pid)
    assert checkpoint.is_file() and workers
    os.kill(max(workers), signal.SIGKILL)  # adasap, the second method, is mid-run
    out, err = restarted.communicate(timeout=900)
    assert restarted.returncode == 0, err.decode()[-3000:]
    assert "sgd: finished earlier" in out.decode()  # the restart continued the run
    for method in ("sgd", "adasap"):
        ours = adasap.load(tmp_path / "runs" / "restarted" / method).state_dict()
        theirs = adasap.load(tmp_path / "runs" / "straight" / method).state_dict()
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), (method, key)


@pytest.mark.slow
def test_torchrun_command_line_runs_a_detection_job(tmp_path):
    """``torchrun -m adasap run --task detection``: the ranks train and prune the detector
    together, rank 0 alone prints and writes; every model is saved once."""
    from test_data import write_fashion

    fashion = write_fashion(tmp_path / "fashion", 60, 30)
    job = (
        "--task", "detection", "--data-dir", str(fashion), "--train-limit", "16",
        "--test-limit", "4", "--corruption-limit", "2", "--image-size", "48",
        "--batch-size", "2", "--warmup-epochs", "1", "--prune-epochs", "1",
        "--finetune-epochs", "1", "--prune-steps", "1",
    )  # fmt: skip
    process = _torchrun(tmp_path, "detection", job=job)
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err.decode()[-3000:]
    assert out.decode().count("results:") == 1
    run_dir = tmp_path / "runs" / "detection"
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "sgd", "adasap"]
    assert rows[1]["params"] < rows[0]["params"]
    for method in ("dense", "sgd", "adasap"):
        assert isinstance(adasap.load(run_dir / method), nn.Module)
