import pytest
import torch
from torch import nn

import adasap.training.pipeline as pipeline
from adasap import alignment
from adasap.alignment import channel_alignment
from adasap.data import load_dataset
from adasap.deploy.serialization import WEIGHTS_FILE, load_model, save_model
from adasap.errors import UserError
from adasap.models.builders import build_model
from adasap.training.pipeline import prune, train
from adasap.training.settings import PruneSettings, with_overrides

FAST = dict(
    warmup_epochs=1,
    prune_epochs=1,
    finetune_epochs=1,
    prune_steps=2,
    batch_size=32,
    progress=False,
    channels_last=True,
)


@pytest.fixture(scope="module")
def data():
    return load_dataset(
        "synthetic", num_train=160, num_test=64, image_size=12, channels=1, num_classes=3
    )


def architecture(data):
    s = data.spec
    return dict(
        name="resnet20",
        num_classes=s.num_classes,
        in_channels=s.channels,
        image_size=s.image_size,
        mean=list(s.mean),
        std=list(s.std),
    )


@pytest.fixture(scope="module")
def dense(data):
    torch.manual_seed(0)
    return build_model(**architecture(data))


@pytest.mark.parametrize(
    "method,phases",
    [
        ("adasap", ["adasap", "adasap", "sam"]),
        ("sam", ["sam", "sam", "sam"]),
        ("sgd", ["sgd", "sgd", "sgd"]),
        ("adasap-sgd", ["adasap", "adasap", "sgd"]),
        ("sgd-sam", ["sgd", "sgd", "sam"]),
    ],
)
def test_prune_reaches_target_with_the_methods_optimizers(data, dense, method, phases):
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    result = prune(dense, data, method=method, keep=0.5, **FAST)  # of the MACs, rounded
    assert [h["optimizer"] for h in result.history] == phases
    assert [h["phase"] for h in result.history] == ["warmup", "prune", "finetune"]
    assert 0.48 <= result.keep_fraction("macs") <= 0.505
    assert result.round_to == channel_alignment("ort", "cpu")
    assert result.history[-1]["params"] == result.size.params
    out = result.model(torch.rand(2, 1, 12, 12))
    assert out.shape == (2, 3)
    assert result.pruning_history
    for key, value in dense.state_dict().items():  # the dense model is left alone
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("criterion", ["taylor", "l1", "bn_scale"])
def test_prune_with_each_criterion_reaches_macs_target(data, dense, criterion):
    result = prune(dense, data, criterion=criterion, keep=0.6, keep_kind="macs", **FAST)
    assert 0.58 <= result.keep_fraction("macs") <= 0.61


def test_same_seed_gives_identical_weights(data, dense):
    a = prune(dense, data, method="adasap", criterion="taylor", seed=3, **FAST).model
    b = prune(dense, data, method="adasap", criterion="taylor", seed=3, **FAST).model
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_saved_pruned_model_reloads_without_pickle(tmp_path, data, dense):
    result = prune(dense, data, keep=0.6, **FAST)
    save_model(tmp_path, result.model, architecture(data), result.pruning_history)
    loaded = load_model(tmp_path)
    x = torch.rand(4, 1, 12, 12)
    torch.testing.assert_close(loaded(x), result.model.eval()(x))
    assert sum(p.numel() for p in loaded.parameters()) == result.size.params


def test_tampered_weights_are_rejected(tmp_path, data, dense):
    save_model(tmp_path, dense, architecture(data))
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(UserError, match="checksum"):
        load_model(tmp_path)


def test_train_improves_accuracy(data):
    torch.manual_seed(0)
    model = build_model(**architecture(data))
    result = train(model, data, epochs=3, batch_size=32, progress=False, lr=0.05)
    assert result.val_accuracy > 0.6  # 3 classes: chance is 1/3


def test_model_without_prunable_layers_is_a_user_error(data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 3))
    with pytest.raises(UserError, match="no prunable layers"):
        prune(model, data, **FAST)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(keep=0.0), "keep fraction"),
        (dict(keep=1.5), "keep fraction"),
        (dict(method="magic"), "unknown method"),
        (dict(criterion="hessian"), "unknown criterion"),
        (
            dict(keep_kind="flops"),
            "keep_kind must be one of 'params', 'macs', 'latency', got 'flops'",
        ),
        (dict(rho_min=0.5, rho_max=0.1), "rho_min <= rho_max"),
        (dict(prune_steps=0), "prune_steps"),
        (dict(round_to=0), "round_to must be >= 1"),
        (dict(round_to="fast"), "round_to must be an integer or 'auto', got 'fast'"),
        (dict(runtime="tensorrt"), "unknown runtime 'tensorrt': choose one of"),
        (dict(colour="red"), "unknown setting"),
    ],
)
def test_bad_settings_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message) as caught:
        with_overrides(PruneSettings(), overrides).validate()
    assert "\n" not in str(caught.value)


def test_prune_to_a_latency_budget(tmp_path, monkeypatch, data, dense):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path))
    result = prune(dense, data, keep=0.9, keep_kind="latency", **FAST)
    latency = result.latency
    assert latency["budget_ms"] == pytest.approx(0.9 * latency["dense_ms"])
    assert latency["predicted_ms"] <= latency["budget_ms"] * 1.0001
    assert latency["measured_ms"] > 0
    assert result.size.params < result.dense_size.params


@pytest.mark.parametrize(
    "round_to, instructions, multiple",
    [(8, "avx512", 8), ("auto", "avx512", 16), ("auto", "avx2", 8)],
)
def test_round_to_keeps_channel_multiples_through_every_pruning_step(
    monkeypatch, data, dense, round_to, instructions, multiple
):
    monkeypatch.setattr(alignment, "cpu_instruction_set", lambda: instructions)
    result = prune(dense, data, method="sgd", keep=0.5, round_to=round_to, **FAST)
    assert result.round_to == multiple
    assert 0.47 * result.dense_size.macs <= result.size.macs <= result.target
    widths = [m.out_channels for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % multiple == 0 for w in widths), widths
    dense_widths = [m.out_channels for m in dense.modules() if isinstance(m, nn.Conv2d)]
    assert sum(widths) < sum(dense_widths)


def test_progress_off_a_terminal_is_one_readable_line_per_epoch(data, dense, capsys):
    prune(dense, data, **{**FAST, "progress": True})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 3  # one per (phase) epoch, no bar frames cut to "0:0…"
    for line, phase in zip(lines, ("warmup", "prune", "finetune"), strict=True):
        assert line.startswith(f"adasap {phase} ep")
        assert "loss " in line and "val " in line and "img/s" in line and "…" not in line


@pytest.mark.parametrize("compile", [True, False])
def test_the_compile_setting_reaches_the_training_loop(monkeypatch, data, dense, compile):
    seen = []
    monkeypatch.setattr(pipeline.EpochLoop, "run", lambda loop, *a, **k: seen.append(loop.compile))
    prune(dense, data, **{**FAST, "compile": compile})
    assert seen == [compile] * 3  # one call per phase


def test_ignored_layers_of_another_model_are_a_clear_error(data, dense):
    other = build_model(**architecture(data))
    with pytest.raises(UserError, match="ignored_layers holds a module that is not part of the"):
        prune(dense, data, **{**FAST, "ignored_layers": [other.net.fc]})
