"""ONNX export of detectors: the order-free comparison, and every torchvision detector
exported with real detections and checked against PyTorch (``-m slow``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection.fcos import FCOSRegressionHead

from adasap.deploy.onnx import ExportReport, export_onnx, onnx_session
from adasap.deploy.runtimes import get_runtime
from adasap.deploy.serialization import detection_architecture, save_model
from adasap.errors import UserError
from adasap.method.output_layers import detector_output_layers, layer_names
from adasap.models.builders import build_model
from adasap.models.detection import build_detector
from adasap.tasks.detection import detection_difference
from test_detection import TORCHVISION_DETECTORS

TOLERANCE = 1e-3


def detections(boxes, scores, labels) -> dict[str, np.ndarray]:
    return {
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "scores": np.asarray(scores, dtype=np.float32),
        "labels": np.asarray(labels, dtype=np.int64),
    }


THREE = detections([[0, 0, 10, 10], [20, 20, 40, 40], [5, 50, 30, 60]], [0.9, 0.8, 0.3], [1, 2, 1])


def test_detections_in_another_order_match():
    swapped = {name: value[[1, 0, 2]] for name, value in THREE.items()}
    assert detection_difference(THREE, swapped, 100, TOLERANCE) == (0.0, 2)


def test_a_moved_box_a_changed_score_or_label_shows():
    moved = {**THREE, "boxes": THREE["boxes"] + np.array([[0, 0, 0, 0], [0, 0, 5, 0], [0] * 4])}
    assert detection_difference(THREE, moved, 100, TOLERANCE)[0] == pytest.approx(0.05)
    rescored = {**THREE, "scores": np.array([0.9, 0.7, 0.3], dtype=np.float32)}
    assert detection_difference(THREE, rescored, 100, TOLERANCE)[0] == pytest.approx(0.1)
    relabelled = {**THREE, "labels": np.array([1, 1, 1])}
    assert detection_difference(THREE, relabelled, 100, TOLERANCE)[0] == float("inf")


def test_only_near_ties_with_the_weakest_detection_may_differ():
    # the last place went to another candidate scoring within rounding of it: legitimate
    cut = detections(
        [[0, 0, 10, 10], [20, 20, 40, 40], [60, 60, 70, 70]], [0.9, 0.8, 0.3005], [1, 2, 1]
    )
    assert detection_difference(THREE, cut, 100, TOLERANCE)[0] == 0.0
    # a strong detection missing is not
    missing = {name: value[[0, 2]] for name, value in THREE.items()}
    assert detection_difference(THREE, missing, 100, TOLERANCE)[0] == float("inf")
    empty = detections([], [], [])
    assert detection_difference(THREE, empty, 100, TOLERANCE)[0] == float("inf")
    assert detection_difference(empty, empty, 100, TOLERANCE) == (0.0, 0)


def test_an_export_with_no_detection_to_compare_is_unverified(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"onnx")
    report = ExportReport.written(path, 17, (3, 64, 64), 0.0, TOLERANCE, (1,), 0)
    assert not report.passed and "UNVERIFIED: no detection to compare" in str(report)
    checked = ExportReport.written(path, 17, (3, 64, 64), 1e-5, TOLERANCE, (1,), 7)
    assert checked.passed and "over 7 detections" in str(checked)


def test_classifiers_and_detectors_export_through_the_one_function(tmp_path):
    torch.manual_seed(0)
    classifier = dict(
        name="resnet20",
        num_classes=10,
        in_channels=3,
        image_size=32,
        mean=[0.5] * 3,
        std=[0.25] * 3,
    )
    save_model(tmp_path / "classifier", build_model(**classifier), classifier, [])
    detector = build_detector("tiny_ssd", num_classes=3, image_size=64)
    save_model(tmp_path / "detector", detector, detection_architecture("tiny_ssd", 3, 64), [])
    reports = {
        name: export_onnx(tmp_path / name, tmp_path / f"{name}.onnx")
        for name in ("classifier", "detector")
    }
    outputs = {
        name: [o.name for o in onnx_session(r.path).get_outputs()] for name, r in reports.items()
    }
    assert outputs == {"classifier": ["logits"], "detector": ["boxes", "scores", "labels"]}
    classified, detected = reports["classifier"], reports["detector"]
    assert classified.passed and classified.batch_sizes == (1, 5) and classified.tolerance == 1e-4
    assert classified.detections_compared is None
    assert detected.passed and detected.batch_sizes == (1,) and detected.tolerance == TOLERANCE
    assert detected.detections_compared > 0


def give_confident_detections(model: nn.Module, side: int) -> nn.Module:
    """Make an untrained detector's outputs worth comparing, without training.

    Untrained, its scores tie (SSDlite: all 1/3; SSD300: saturated at 1) or stay under the
    score threshold (RetinaNet, FCOS: the 0.01 prior), and FCOS's boxes have no size, so
    a check would compare nothing or only break ties. Here BatchNorm's statistics are those
    of random images, each classification output layer is rescaled to logits of mean 0 and
    std 1 on them, and FCOS's box sizes are offset: hundreds of boxes with distinct scores.
    """
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, side, side, generator=generator) for _ in range(4)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1])}]
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # the plain average over the batch
    layers = detector_output_layers(model)
    names = layer_names(model, layers)
    scoring = [m for m, n in zip(layers, names, strict=True) if "cls" in n or "classification" in n]
    logits: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in scoring}
    hooks = [m.register_forward_hook(lambda m, _, out: logits[m].append(out)) for m in scoring]
    with torch.no_grad():
        model.train()(images, targets * len(images))  # BatchNorm statistics
        for log in logits.values():
            log.clear()
        model.eval()(images)
        for layer, outputs in logits.items():
            values = torch.cat([out.flatten() for out in outputs])
            layer.weight.div_(values.std())
            layer.bias.sub_(values.mean()).div_(values.std())
        for head in model.modules():
            if isinstance(head, FCOSRegressionHead):  # ReLU'd sizes, zero untrained
                head.bbox_reg.bias.add_(0.5)
    for hook in hooks:
        hook.remove()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION_DETECTORS)
def test_torchvision_detector_exports_and_onnxruntime_reproduces_its_detections(name, tmp_path):
    side = 268 if name == "ssd300_vgg16" else 128
    torch.manual_seed(0)
    model = give_confident_detections(build_detector(name, num_classes=3, image_size=side), side)
    save_model(tmp_path / "model", model, detection_architecture(name, 3, side), [])
    report = export_onnx(tmp_path / "model", tmp_path / "model.onnx")
    assert report.passed and report.tolerance == TOLERANCE, str(report)
    assert report.detections_compared >= 50
    # the image the check ran on (export_onnx's) gave many distinct detections
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = model(image)[0]["scores"]
    assert len(scores) >= 50 and len(set(scores.tolist())) >= 0.9 * len(scores)
    assert float(scores.max()) - float(scores.min()) > 0.1


def without_detections(model: nn.Module) -> nn.Module:
    """The detector keeping no detection at all: its score threshold above any score."""
    for module in model.modules():
        if hasattr(module, "score_thresh"):
            module.score_thresh = 1.01
    return model


def test_a_detector_exports_in_int8_and_runs_with_and_without_detections(tmp_path):
    torch.manual_seed(0)
    detector = give_confident_detections(
        build_detector("tiny_ssd", num_classes=3, image_size=64), 64
    )
    save_model(tmp_path / "detector", detector, detection_architecture("tiny_ssd", 3, 64), [])
    calibration = torch.rand(10, 3, 64, 64)
    report = export_onnx(
        tmp_path / "detector", tmp_path / "int8.onnx", int8=True, calibration=calibration
    )
    # two held-back images, compared as detection sets at INT8's looser tolerance
    assert report.int8 and report.checked and report.batch_sizes == (2,) and report.tolerance == 0.1
    assert report.agreement is None and report.detections_compared > 0
    assert "INT8" in str(report) and "held-back" in str(report) and "detections" in str(report)
    image = {"images": torch.rand(1, 3, 64, 64).numpy()}
    assert onnx_session(report.path).run(None, image)[1].size > 0  # scores
    # an image without detections: onnxruntime's INT8 kernels once crashed on the empty tensors
    runtime = get_runtime("ort-int8")
    empty = runtime.deploy(without_detections(detector), (3, 64, 64), task="detection",
                           workdir=tmp_path, calibration=calibration)  # fmt: skip
    boxes, scores, labels = empty(torch.rand(1, 3, 64, 64))
    assert boxes.shape == (0, 4) and scores.shape == labels.shape == (0,)


def test_openvino_refuses_detectors(tmp_path):
    pytest.importorskip("openvino")
    detector = build_detector("tiny_ssd", num_classes=3, image_size=64)
    with pytest.raises(UserError, match="does not run detection models.*spurious detection"):
        get_runtime("openvino").deploy(detector, (3, 64, 64), task="detection", workdir=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION_DETECTORS)
def test_every_torchvision_detector_runs_in_int8_with_and_without_detections(name, tmp_path):
    side = 268 if name == "ssd300_vgg16" else 128
    torch.manual_seed(0)
    model = give_confident_detections(build_detector(name, num_classes=3, image_size=side), side)
    calibration = torch.rand(8, 3, side, side)
    image = torch.rand(1, 3, side, side)
    deploy = get_runtime("ort-int8").deploy
    kept = deploy(model, (3, side, side), task="detection", workdir=tmp_path / "kept",
                  calibration=calibration)  # fmt: skip
    assert len(kept(image)[1]) > 0
    with torch.no_grad():
        assert len(model(image)[0]["scores"]) > 0
    # RetinaNet and Faster R-CNN crashed onnxruntime here when it quantized their
    # post-processing (adasap.deploy.int8.QUANTIZED_OPS)
    none = deploy(without_detections(model), (3, side, side), task="detection",
                  workdir=tmp_path / "none", calibration=calibration)  # fmt: skip
    assert [len(out) for out in none(image)] == [0, 0, 0]
