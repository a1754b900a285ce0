"""Mixed precision: the ``amp`` modes, bf16 autocast on the CPU, fp16 with a grad scaler."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adasap.devices as devices
from adasap.data import load_dataset
from adasap.devices import autocast_dtype
from adasap.errors import UserError
from adasap.method.optim import SAM
from adasap.method.step import sharpness_aware_step
from adasap.models.builders import build_model
from adasap.training.pipeline import prune

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "amp,device,native_bf16,expected",
    [
        ("auto", CUDA, False, torch.float16),
        ("auto", CPU, True, torch.bfloat16),
        ("auto", CPU, False, None),
        ("bf16", CPU, False, torch.bfloat16),
        ("bf16", CUDA, True, torch.bfloat16),
        ("fp16", CPU, True, torch.float16),
        ("off", CUDA, True, None),
        ("off", CPU, True, None),
    ],
)
def test_amp_modes(monkeypatch, amp, device, native_bf16, expected):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)
    assert autocast_dtype(amp, device) == expected


def test_unknown_amp_mode_names_the_modes():
    with pytest.raises(UserError, match=r"amp must be one of auto, bf16, fp16, off, got 'fp8'"):
        autocast_dtype("fp8", CPU)


@pytest.fixture(scope="module")
def data():
    return load_dataset(
        "synthetic", num_train=128, num_test=32, image_size=12, channels=1, num_classes=3
    )


def model_for(data):
    s = data.spec
    torch.manual_seed(0)
    return build_model(
        "resnet20",
        num_classes=s.num_classes,
        in_channels=s.channels,
        image_size=s.image_size,
        mean=list(s.mean),
        std=list(s.std),
    )


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("off", torch.float32)])
def test_the_training_forward_runs_at_the_amp_dtype(data, amp, dtype):
    model = model_for(data)
    seen = set()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda m, i, out: seen.add(out.dtype) if m.training else None)
    fast = dict(warmup_epochs=1, prune_epochs=1, finetune_epochs=0, prune_steps=1)
    result = prune(model, data, amp=amp, batch_size=32, progress=False, device="cpu", **fast)
    assert seen == {dtype}
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # master weights


def test_fp16_on_the_cpu_trains_with_a_grad_scaler(monkeypatch, data):
    scalers = []
    real = torch.amp.GradScaler

    def recording(*args, **kwargs):
        scalers.append(real(*args, **kwargs))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", recording)
    fast = dict(warmup_epochs=1, prune_epochs=1, finetune_epochs=0, prune_steps=1)
    prune(model_for(data), data, amp="fp16", batch_size=32, progress=False, device="cpu", **fast)
    assert scalers and all(s.is_enabled() for s in scalers)
    assert scalers[0].get_scale() > 0


def test_a_step_with_an_overflowing_gradient_changes_no_weight():
    """fp16 with a scaler: an inf in the first pass skips the second pass and the update."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    calls = []

    def overflowing():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        return loss * torch.tensor(float("inf")) if len(calls) == 1 else loss

    sharpness_aware_step(model, optimizer, overflowing, scaler=scaler)
    assert len(calls) == 1  # no direction to ascend: no second pass
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert scaler.get_scale() == 2.0**3  # the scaler saw the overflow and backed off
    sharpness_aware_step(model, optimizer, lambda: F.cross_entropy(model(x), y), scaler=scaler)
    assert not torch.equal(model.weight, before["weight"])  # the next finite step updates


@pytest.mark.parametrize(
    ("requested", "device", "expected"),
    [
        (True, "cpu", True),
        (True, "cuda", True),  # cuDNN's tensor-core kernels take NHWC
        (True, "mps", False),
        (False, "cuda", False),
        (False, "cpu", False),
    ],
)
def test_channels_last_on_cpu_and_cuda_only(requested, device, expected):
    assert devices.wants_channels_last(requested, torch.device(device)) is expected
