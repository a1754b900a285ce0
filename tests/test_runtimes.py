"""Runtimes (adasap.deploy.runtimes): every one reproduces PyTorch within its tolerance, INT8
keeps a trained classifier's accuracy, and bad names or a missing package are one-line errors."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adasap.deploy.runtimes import DEFAULT_RUNTIME, RUNTIMES, get_runtime
from adasap.errors import UserError

# what an INT8 runtime may cost the digits classifier below, in points of test accuracy
INT8_ACCURACY_DROP = 0.02


def runnable(name: str) -> str:
    """``name``, the test skipped where the runtime's package is not installed."""
    if name.startswith("openvino"):
        pytest.importorskip("openvino")
    return name


def small_cnn(in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """A small CNN trained for a second on scikit-learn's 8x8 digits (about 95% accurate):
    the model, training images (calibration), test images and their labels."""
    datasets = pytest.importorskip("sklearn.datasets")
    images, labels = datasets.load_digits(return_X_y=True)
    images = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    labels = torch.tensor(labels)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    model = small_cnn(in_channels=1).train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(8):
        for start in range(0, 1400, 50):
            batch = slice(start, start + 50)
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), images[:1400], images[1400:], labels[1400:]


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    with torch.inference_mode():
        return float((model(images).argmax(1) == labels).float().mean())


@pytest.mark.parametrize("name", RUNTIMES.names())
def test_every_runtime_reproduces_pytorch_within_its_tolerance(name, tmp_path):
    runtime = get_runtime(runnable(name))
    model = small_cnn()
    images = torch.rand(5, 3, 16, 16)
    deployed = runtime.deploy(model, (3, 16, 16), workdir=tmp_path, calibration=images)
    with torch.inference_mode():
        expected = model(images)
    got = deployed(images)
    assert got.shape == expected.shape and got.device.type == "cpu"
    error = runtime.output_error(expected, got)
    assert error < runtime.tolerance, f"{name}: {error:.3g} >= {runtime.tolerance}"
    own = {p.data_ptr() for p in model.parameters()}
    assert not own & {p.data_ptr() for p in deployed.parameters()}  # a copy runs
    deployed.runner(3)()  # the timed call runs on a batch of its own


@pytest.mark.parametrize(
    "name", [n for n in RUNTIMES.names() if RUNTIMES.get(n).precision == "int8"]
)
def test_int8_keeps_a_trained_classifier_accurate(name, digits, tmp_path):
    model, train, test, labels = digits
    dense = accuracy(model, test, labels)
    assert dense > 0.9  # trained: a drop means something
    runtime = get_runtime(runnable(name))
    deployed = runtime.deploy(model, (1, 8, 8), workdir=tmp_path, calibration=train[:256])
    assert accuracy(deployed, test, labels) >= dense - INT8_ACCURACY_DROP


def test_output_error_is_absolute_in_fp32_and_relative_in_int8():
    expected, got = torch.tensor([[10.0, -20.0]]), torch.tensor([[10.0, -19.0]])
    assert get_runtime("ort").output_error(expected, got) == 1.0
    assert get_runtime("ort-int8").output_error(expected, got) == pytest.approx(0.05)


def test_unknown_runtime_is_a_one_line_error_naming_the_known_ones():
    with pytest.raises(
        UserError, match="unknown runtime 'tensorrt': choose one of torch, ort"
    ) as info:
        get_runtime("tensorrt")
    assert "\n" not in str(info.value) and "openvino-int8" in str(info.value)
    assert DEFAULT_RUNTIME in RUNTIMES.names()


@pytest.mark.parametrize("name", ["openvino", "openvino-int8"])
def test_missing_openvino_says_how_to_install_it(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now fails
    with pytest.raises(UserError, match=r"pip install 'adasap\[openvino\]'") as info:
        get_runtime(name)
    assert "\n" not in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("name", ["ort-int8", "openvino", "openvino-int8"])
def test_cpu_runtimes_refuse_a_gpu(name, tmp_path):
    with pytest.raises(UserError, match="runs on the CPU"):
        get_runtime(runnable(name)).deploy(small_cnn(), (3, 8, 8), device="cuda", workdir=tmp_path)


def test_int8_deploys_without_calibration_for_timing(tmp_path):
    deployed = get_runtime("ort-int8").deploy(small_cnn(), (3, 8, 8), workdir=tmp_path)
    assert deployed(torch.rand(2, 3, 8, 8)).shape == (2, 10)
    assert (tmp_path / "model.int8.onnx").stat().st_size < (tmp_path / "model.onnx").stat().st_size


def test_runtimes_compute_with_pytorchs_thread_count(tmp_path):
    threads = torch.get_num_threads()  # 1 under the tests (conftest.py): not the default
    ort_model = get_runtime("ort").deploy(small_cnn(), (3, 8, 8), workdir=tmp_path / "ort")
    assert ort_model.session.get_session_options().intra_op_num_threads == threads
    pytest.importorskip("openvino")
    ov_model = get_runtime("openvino").deploy(small_cnn(), (3, 8, 8), workdir=tmp_path / "ov")
    assert ov_model.compiled.get_property("INFERENCE_NUM_THREADS") == threads
    # fp32 means fp32: OpenVINO would compute in bfloat16 on CPUs that have it
    assert str(ov_model.compiled.get_property("INFERENCE_PRECISION_HINT")) in (
        "f32",
        "<Type: 'float32'>",
    )


def test_timing_images_must_fit_the_input_shape(tmp_path):
    deployed = get_runtime("torch").deploy(
        small_cnn(), (3, 8, 8), workdir=tmp_path, images=torch.rand(2, 3, 4, 4)
    )
    with pytest.raises(UserError, match=r"do not fit inputs of shape \(3, 8, 8\)"):
        deployed.runner(1)
