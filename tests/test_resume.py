import contextlib
import copy
import signal
import subprocess
import sys
import time

import pytest
import torch

import adasap.training.pipeline as pipeline
from adasap.errors import UserError
from adasap.method.onednn_guard import needs_guard
from adasap.training.checkpoint import CHECKPOINT_FILE, RunInterrupted, TrainingDiverged
from adasap.training.pipeline import prune, train

FAST = dict(
    warmup_epochs=1,
    prune_epochs=1,
    finetune_epochs=1,
    prune_steps=2,
    batch_size=20,
    progress=False,
)


def stop_after(monkeypatch, steps):
    """Make the training loop see a stop request (as from SIGTERM) after ``steps`` steps."""
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > steps

    @contextlib.contextmanager
    def fake_stop_requests():
        yield should_stop

    monkeypatch.setattr(pipeline, "stop_requests", fake_stop_requests)


def comparable(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
            for r in history]  # fmt: skip


def assert_same_weights(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


# 4 steps per epoch: stops in the warm-up, in the removal phase (after the first pruning
# step), and in the fine-tuning phase.
@pytest.mark.parametrize("stop_at", [2, 5, 10])
@pytest.mark.parametrize("method,criterion", [("adasap", "taylor"), ("sgd", "magnitude")])
def test_resumed_prune_equals_uninterrupted(
    tmp_path, monkeypatch, tiny_classification, tiny_resnet, stop_at, method, criterion
):
    reference = prune(tiny_resnet, tiny_classification, method=method, criterion=criterion, **FAST)
    with monkeypatch.context() as patch:
        stop_after(patch, stop_at)
        with pytest.raises(RunInterrupted):
            prune(
                tiny_resnet,
                tiny_classification,
                method=method,
                criterion=criterion,
                checkpoint_dir=tmp_path,
                **FAST,
            )
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    logged = []
    resumed = prune(
        tiny_resnet,
        tiny_classification,
        method=method,
        criterion=criterion,
        checkpoint_dir=tmp_path,
        log=logged.append,
        **FAST,
    )
    assert_same_weights(resumed.model, reference.model)
    assert comparable(resumed.history) == comparable(reference.history)
    assert comparable(logged) == comparable(reference.history)
    assert resumed.pruning_history == reference.pruning_history


def test_resume_is_exact_through_a_layer_computed_contiguously(
    tmp_path, monkeypatch, tiny_classification, tiny_resnet
):
    """channels_last and bfloat16 (where native) as by default, but any channel counts: a
    shortcut keeps fewer than 16 input channels, so the oneDNN guard computes it contiguously
    and returns its output in channels_last, before and after the resume alike."""
    settings = dict(FAST, method="sgd", criterion="magnitude", round_to=1, channels_last=True)
    reference = prune(tiny_resnet, tiny_classification, **settings)
    assert any(needs_guard(module) for module in reference.model.modules())
    with monkeypatch.context() as patch:
        stop_after(patch, 5)  # after the first removal
        with pytest.raises(RunInterrupted):
            prune(tiny_resnet, tiny_classification, checkpoint_dir=tmp_path, **settings)
    resumed = prune(tiny_resnet, tiny_classification, checkpoint_dir=tmp_path, **settings)
    assert_same_weights(resumed.model, reference.model)
    assert comparable(resumed.history) == comparable(reference.history)


def test_resume_is_exact_with_distillation_from_the_dense_model(
    tmp_path, monkeypatch, tiny_classification, tiny_resnet
):
    """Stopped after the first removal, in a distilled phase: the teacher (the dense model it
    resumes on) gives the same weights, byte for byte; another dense model is refused."""
    settings = dict(FAST, method="adasap", criterion="taylor", distill_weight=0.5)
    reference = prune(tiny_resnet, tiny_classification, **settings)
    undistilled = prune(tiny_resnet, tiny_classification, **{**settings, "distill_weight": 0.0})
    assert not torch.equal(reference.model[-1].fc.weight, undistilled.model[-1].fc.weight)
    with monkeypatch.context() as patch:
        stop_after(patch, 5)
        with pytest.raises(RunInterrupted):
            prune(tiny_resnet, tiny_classification, checkpoint_dir=tmp_path, **settings)
    other = copy.deepcopy(tiny_resnet)
    with torch.no_grad():
        other[-1].fc.weight.add_(1.0)
    with pytest.raises(UserError, match="distilled from another teacher"):
        prune(other, tiny_classification, checkpoint_dir=tmp_path, **settings)
    resumed = prune(tiny_resnet, tiny_classification, checkpoint_dir=tmp_path, **settings)
    assert_same_weights(resumed.model, reference.model)
    assert comparable(resumed.history) == comparable(reference.history)


def test_resumed_dense_training_equals_uninterrupted(
    tmp_path, monkeypatch, tiny_classification, tiny_resnet
):
    reference = train(copy.deepcopy(tiny_resnet), tiny_classification, epochs=2, **FAST)
    with monkeypatch.context() as patch:
        stop_after(patch, 6)
        with pytest.raises(RunInterrupted):
            train(
                copy.deepcopy(tiny_resnet),
                tiny_classification,
                epochs=2,
                checkpoint_dir=tmp_path,
                **FAST,
            )
    resumed = train(
        copy.deepcopy(tiny_resnet), tiny_classification, epochs=2, checkpoint_dir=tmp_path, **FAST
    )
    assert_same_weights(resumed.model, reference.model)


def test_checkpoint_with_other_settings_is_refused(
    tmp_path, monkeypatch, tiny_classification, tiny_resnet
):
    with monkeypatch.context() as patch:
        stop_after(patch, 3)
        with pytest.raises(RunInterrupted):
            prune(tiny_resnet, tiny_classification, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(UserError, match="other settings"):
        prune(
            tiny_resnet, tiny_classification, checkpoint_dir=tmp_path, **{**FAST, "prune_steps": 3}
        )
    # a work budget changes no result: a run stopped by one resumes with it raised
    prune(
        tiny_resnet,
        tiny_classification,
        checkpoint_dir=tmp_path,
        **{**FAST, "trace_seconds": 600.0},
    )


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny_classification, tiny_resnet):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        prune(tiny_resnet, tiny_classification, checkpoint_dir=tmp_path, **FAST)


def test_divergence_stops_with_step_phase_and_cause(tmp_path, tiny_classification, tiny_resnet):
    with pytest.raises(TrainingDiverged) as info:
        prune(
            tiny_resnet, tiny_classification, method="sgd", lr=1e6, checkpoint_dir=tmp_path, **FAST
        )
    message = str(info.value)
    assert "diverged in phase warmup" in message and "at step" in message
    assert "learning rate (--lr) is probably too large" in message


CLI_RUN = [
    sys.executable, "-m", "adasap", "run",
    "--dataset", "synthetic", "--dense-epochs", "1", "--methods", "adasap",
    "--criterion", "taylor", "--warmup-epochs", "2", "--prune-epochs", "2",
    "--finetune-epochs", "2", "--prune-steps", "2", "--batch-size", "50",
    "--corruptions", "none", "--no-progress",
]  # fmt: skip


def wait_for_records(path, count, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and path.read_text().count("\n") >= count:
            return
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    raise AssertionError(f"no {count} records in {path}")


def assert_kill_9_then_resume_is_exact(command: list[str], out, pause: float) -> None:
    """``command`` (an ``adasap run`` of one method, adasap) run straight, then killed with
    SIGKILL ``pause`` s after its 1st, 3rd and 5th epoch records (in warm-up epoch 2, removal
    epoch 2 and fine-tuning epoch 2) and resumed: the same weights, byte for byte."""
    subprocess.run([*command, "--out", str(out), "--name", "straight"], check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    expected = (out / "straight" / "adasap" / "model.safetensors").read_bytes()
    for records in (1, 3, 5):
        name = f"killed-after-{records}"
        process = subprocess.Popen(
            [*command, "--out", str(out), "--name", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_records(out / name / "adasap" / "metrics.jsonl", records, process)
        time.sleep(pause)  # into the next epoch
        process.send_signal(signal.SIGKILL)
        process.wait()
        subprocess.run([sys.executable, "-m", "adasap", "run", "--resume", str(out / name)],
                       check=True, capture_output=True, timeout=600)  # fmt: skip
        resumed = (out / name / "adasap" / "model.safetensors").read_bytes()
        assert resumed == expected, name


@pytest.mark.slow
def test_kill_9_in_each_phase_then_resume_gives_identical_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    assert_kill_9_then_resume_is_exact(CLI_RUN, tmp_path / "runs", pause=0.3)


@pytest.fixture(scope="module")
def detection_data():
    from adasap.data.detection import DetectionSet, DetectionSpec, make_target
    from test_detection import synthetic_batch

    images, targets = synthetic_batch(8, 64)
    uint8 = [(x * 255).round().to(torch.uint8) for x in images]
    labelled = [make_target(t["boxes"], t["labels"]) for t in targets]
    return DetectionSet(uint8, labelled, DetectionSpec("squares", ("small", "large"), 64))


DETECTION = dict(FAST, batch_size=2, lr=0.01, device="cpu", task="detection")


# 4 steps per epoch, as above: stopped in each phase
@pytest.mark.parametrize("stop_at", [2, 5, 10])
def test_resumed_detection_prune_equals_uninterrupted(
    tmp_path, monkeypatch, detection_data, stop_at
):
    from adasap.models.detection import build_detector

    torch.manual_seed(0)
    dense = build_detector("tiny_ssd", num_classes=3, image_size=64)
    reference = prune(dense, detection_data, detection_data, **DETECTION)
    assert [r["phase"] for r in reference.history] == ["warmup", "prune", "finetune"]
    assert all(0 <= r["val_map_50"] <= 1 for r in reference.history)  # validated every epoch
    with monkeypatch.context() as patch:
        stop_after(patch, stop_at)
        with pytest.raises(RunInterrupted):
            prune(dense, detection_data, detection_data, checkpoint_dir=tmp_path, **DETECTION)
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    resumed = prune(dense, detection_data, detection_data, checkpoint_dir=tmp_path, **DETECTION)
    assert_same_weights(resumed.model, reference.model)
    assert comparable(resumed.history) == comparable(reference.history)
    assert resumed.pruning_history == reference.pruning_history


@pytest.mark.slow
def test_kill_9_of_a_detection_run_then_resume_gives_identical_model(tmp_path, monkeypatch):
    from test_data import write_fashion

    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    fashion = write_fashion(tmp_path / "fashion", 60, 30)
    command = [
        sys.executable, "-m", "adasap", "run", "--task", "detection", "--data-dir", str(fashion),
        "--train-limit", "16", "--test-limit", "4", "--corruptions", "none",
        "--image-size", "48", "--dense-epochs", "1", "--batch-size", "4", "--methods", "adasap",
        "--warmup-epochs", "2", "--prune-epochs", "2", "--finetune-epochs", "2",
        "--prune-steps", "2", "--no-progress",
    ]  # fmt: skip
    assert_kill_9_then_resume_is_exact(command, tmp_path / "runs", pause=0.1)
