import math

import onnx
import pytest
import torch
from torch import nn

from adasap.deploy import int8
from adasap.deploy.onnx import (
    export_onnx,
    find_models,
    onnx_session,
    select_model,
)
from adasap.deploy.serialization import load_model, save_model
from adasap.errors import UserError
from adasap.method.importance import magnitude_scores
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size, remove_neurons, select_neurons, size_predictor
from adasap.models.builders import Normalize, build_model, find_classifier

ARCHITECTURE = dict(
    name="resnet20", num_classes=10, in_channels=3, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding one ResNet-20 pruned to half its parameters."""
    torch.manual_seed(0)
    model = build_model(**ARCHITECTURE).eval()
    example = torch.rand(2, 3, 32, 32)
    layout = NeuronLayout(model, example, [find_classifier(model, 10)])
    dense = measure_size(model, example)
    chosen = select_neurons(
        layout, magnitude_scores(layout), dense.params // 2, size_predictor(layout, dense, "params")
    )
    remove_neurons(layout, chosen)
    run = tmp_path_factory.mktemp("run")
    save_model(run / "adasap", model, ARCHITECTURE, layout.graph.pruning_history())
    return run


def test_export_round_trip_matches_pytorch_with_dynamic_batch(run_dir, tmp_path):
    path = tmp_path / "out" / "model.onnx"
    report = export_onnx(run_dir, path)  # a run with one model: that one
    assert report.passed and report.max_abs_diff < 1e-4
    assert report.opset >= 17 and report.batch_sizes == (1, 5)
    assert report.file_bytes == path.stat().st_size > 0
    assert "passed" in str(report) and report.to_dict()["passed"] is True
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]

    model = load_model(run_dir / "adasap")
    session = onnx_session(path)
    x = torch.rand(7, 3, 32, 32)
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == (7, 10)
    assert abs(got - expected).max() < 1e-4


def test_export_of_a_module_needs_the_image_size(run_dir, tmp_path):
    model = load_model(run_dir / "adasap")
    with pytest.raises(UserError, match="image_size"):
        export_onnx(model, tmp_path / "m.onnx")
    report = export_onnx(model, tmp_path / "m.onnx", image_size=32, check=False)
    assert report.input_shape == (3, 32, 32) and not report.checked and not report.passed
    assert "not checked" in str(report)


def test_a_classifier_the_tracer_refuses_gets_a_classifier_fix_and_no_file(tmp_path):
    # AlexNet at 64 px: a 1x1 feature map pooled up to 6x6, which ONNX cannot express
    upsampling = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(6), nn.Flatten())
    with pytest.raises(
        UserError, match=r"adaptive pooling must divide .*\(224 for AlexNet"
    ) as info:
        export_onnx(upsampling, tmp_path / "m.onnx", image_size=4, check=False)
    assert "detection.md" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_module_input_channels_come_from_its_normalisation_before_a_reshaping_stem(tmp_path):
    # TResNet's space-to-depth stem: its first convolution reads 4 x 3 channels here
    model = nn.Sequential(
        Normalize([0.5] * 3, [0.25] * 3), nn.PixelUnshuffle(2), nn.Conv2d(12, 4, 1), nn.Flatten()
    )
    report = export_onnx(model, tmp_path / "m.onnx", image_size=4)
    assert report.input_shape == (3, 4, 4) and report.passed


class _Fold(nn.Module):
    """``F.fold`` (ONNX's Col2Im, opset 18), as in VOLO's outlook attention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = nn.functional.unfold(self.conv(x), kernel_size=2, stride=2)
        return nn.functional.fold(patches, output_size=(4, 4), kernel_size=2, stride=2).flatten(1)


def test_an_operator_of_a_newer_opset_names_that_opset(tmp_path):
    with pytest.raises(UserError, match=r"export with opset 18 \(--opset 18;") as info:
        export_onnx(_Fold(), tmp_path / "m.onnx", image_size=4)
    assert "replace the layer" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    report = export_onnx(_Fold(), tmp_path / "m.onnx", image_size=4, opset=18)
    assert report.passed and report.opset == 18


def test_a_nan_output_fails_the_check(run_dir, tmp_path):
    model = load_model(run_dir / "adasap")
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")  # NaN in both runtimes' outputs
    report = export_onnx(model, tmp_path / "m.onnx", image_size=32)
    assert report.checked and math.isnan(report.max_abs_diff)
    assert not report.passed and "FAILED" in str(report)


def test_unwritable_onnx_path_is_a_user_error_and_leaves_nothing(run_dir, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="cannot write"):
        export_onnx(run_dir / "adasap", blocker / "model.onnx", check=False)
    folder = tmp_path / "taken"
    folder.mkdir()
    with pytest.raises(UserError, match="cannot write"):
        export_onnx(run_dir / "adasap", folder, check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "taken"]
    assert list(folder.iterdir()) == []


def test_unsupported_opset_is_a_user_error(run_dir, tmp_path):
    with pytest.raises(UserError, match="opset 13"):
        export_onnx(run_dir / "adasap", tmp_path / "m.onnx", opset=13)


def test_directory_without_a_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no models"):
        export_onnx(tmp_path, tmp_path / "m.onnx")
    with pytest.raises(UserError, match="no models"):
        find_models(tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        find_models(tmp_path / "missing")


def test_find_and_select_models(run_dir, tmp_path):
    assert find_models(run_dir) == {"adasap": run_dir / "adasap"}
    assert find_models(run_dir / "adasap") == {"adasap": run_dir / "adasap"}
    assert select_model(run_dir) == run_dir / "adasap"
    with pytest.raises(UserError, match="choose one of adasap"):
        select_model(run_dir, "sgd")
    for method in ("sgd", "adasap"):
        (tmp_path / method).mkdir()
        (tmp_path / method / "model.json").write_text("{}")
    assert list(find_models(tmp_path)) == ["adasap", "sgd"]
    with pytest.raises(UserError, match=r"several models \(adasap, sgd\).*--method"):
        select_model(tmp_path)
    assert select_model(tmp_path, "sgd") == tmp_path / "sgd"


def test_int8_export_is_smaller_loads_in_onnxruntime_and_is_checked(run_dir, tmp_path):
    calibration = torch.rand(40, 3, 32, 32)
    fp32 = export_onnx(run_dir, tmp_path / "fp32.onnx", check=False)
    report = export_onnx(run_dir, tmp_path / "int8.onnx", int8=True, calibration=calibration)
    assert report.int8 and report.file_bytes < fp32.file_bytes / 2
    # a fifth of the images held back: the check ran on images the ranges did not come from
    assert report.batch_sizes == (8,) and report.tolerance == 0.1
    assert report.passed and 0.9 <= report.agreement <= 1 and report.max_abs_diff < 0.1
    assert "INT8" in str(report) and "top-1 agreement" in str(report)
    assert report.to_dict()["int8"] is True
    session = onnx_session(report.path)
    (logits,) = session.run(None, {"images": torch.rand(3, 3, 32, 32).numpy()})
    assert logits.shape == (3, 10)
    ops = {node.op_type for node in onnx.load(str(report.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "int8.onnx"]


def test_int8_export_needs_fitting_calibration_images(run_dir, tmp_path):
    path = tmp_path / "int8.onnx"
    with pytest.raises(UserError, match="needs calibration images") as info:
        export_onnx(run_dir, path, int8=True)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"do not fit the model: pass N x 3 x 32 x 32"):
        export_onnx(run_dir, path, int8=True, calibration=torch.rand(10, 3, 16, 16))
    assert not path.exists()


def test_a_failed_quantization_is_a_user_error_and_leaves_the_old_file(
    run_dir, tmp_path, monkeypatch
):
    path = tmp_path / "int8.onnx"
    path.write_bytes(b"an earlier export")

    def fail(*args, **kwargs):
        raise ValueError("No data is collected.")

    monkeypatch.setattr(int8, "quantize_static", fail)
    with pytest.raises(UserError, match="cannot quantize .* to INT8 .*No data") as info:
        export_onnx(run_dir, path, int8=True, calibration=torch.rand(10, 3, 32, 32))
    assert "\n" not in str(info.value)
    assert path.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]  # no temporary file left
