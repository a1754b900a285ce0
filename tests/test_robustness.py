"""Tests for robustness evaluation: official-layout loaders, evaluation and the report."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from torch import nn

from adasap.data import FolderImageSet, TensorImageSet, batches
from adasap.errors import UserError
from adasap.robustness import corruptions as C
from adasap.robustness.corruptions import (
    BENCHMARK_CORRUPTIONS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
)
from adasap.robustness.evaluation import evaluate_corruptions
from adasap.robustness.official import (
    folder_set,
    load_cifar_c,
    load_imagenet_c,
    load_imagenet_v2,
    load_tiny_imagenet_c,
    official_sets,
)
from adasap.robustness.report import ALEXNET_ERRORS, SOURCE_RENDERED, CorruptionReport
from adasap.tasks.evaluate import evaluate_accuracy


class LevelClassifier(nn.Module):
    """Predicts class (mean pixel level in 0..255) mod ``classes``: accuracy is easy to script."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.classes = classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = (x.mean(dim=(1, 2, 3)) * 255 * self.scale).round().long()
        return F.one_hot(level % self.classes, self.classes).float()


def _tiny_cnn(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- loaders


def _write_cifar_c(root, corruptions=("fog", "snow"), n=4, repeat_labels=True):
    """Image i of severity s is flat at level 10 s + i (+100 per corruption), label i % 3."""
    root.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(corruptions):
        data = np.zeros((5 * n, 6, 6, 3), dtype=np.uint8)
        for s in SEVERITIES:
            for i in range(n):
                data[(s - 1) * n + i] = 10 * s + i + 100 * k
        np.save(root / f"{name}.npy", data)
    labels = np.arange(n, dtype=np.uint8) % 3
    np.save(root / "labels.npy", np.tile(labels, 5) if repeat_labels else labels)


@pytest.mark.parametrize("repeat_labels", (True, False))
def test_load_cifar_c_reads_one_severity_block(tmp_path, repeat_labels) -> None:
    _write_cifar_c(tmp_path, repeat_labels=repeat_labels)
    data = load_cifar_c(tmp_path, "snow", 3, name="CIFAR-100-C")
    assert data.images.shape == (4, 3, 6, 6) and data.images.dtype == torch.uint8
    assert data.images[:, :, 0, 0].tolist() == [[130 + i] * 3 for i in range(4)]
    assert data.labels.tolist() == [0, 1, 2, 0] and data.labels.dtype == torch.int64
    assert data.source == "CIFAR-100-C official files"
    assert isinstance(data, TensorImageSet)
    assert [len(y) for _, y in batches(data, 3, shuffle=False)] == [3, 1]


def test_load_cifar_c_errors(tmp_path) -> None:
    with pytest.raises(UserError, match=r"missing .*fog\.npy"):
        load_cifar_c(tmp_path, "fog", 1)
    _write_cifar_c(tmp_path)
    with pytest.raises(UserError, match=r"missing .*frost\.npy"):
        load_cifar_c(tmp_path, "frost", 1)
    with pytest.raises(UserError, match="unknown corruption 'fogg'"):
        load_cifar_c(tmp_path, "fogg", 1)
    with pytest.raises(UserError, match="severity must be an integer from 1 to 5"):
        load_cifar_c(tmp_path, "fog", 6)
    np.save(tmp_path / "labels.npy", np.zeros(7, dtype=np.uint8))
    with pytest.raises(UserError, match="labels.npy has shape"):
        load_cifar_c(tmp_path, "fog", 1)
    np.save(tmp_path / "fog.npy", np.zeros((7, 6, 6, 3), dtype=np.uint8))
    with pytest.raises(UserError, match="is it a CIFAR-10-C file"):
        load_cifar_c(tmp_path, "fog", 1)
    (tmp_path / "labels.npy").unlink()
    with pytest.raises(UserError, match=r"missing .*labels\.npy"):
        load_cifar_c(tmp_path, "snow", 1)


def _png(path, level: int, size: int = 8, height: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((height or size, size, 3), level, dtype=np.uint8)
    Image.fromarray(image).save(path, format="PNG")


def _write_folder_c(root, classes=("n02", "n01"), per_class=2, size=8) -> None:
    for s in (1, 2):
        for c, wnid in enumerate(classes):
            for i in range(per_class):
                _png(root / "fog" / str(s) / wnid / f"img{i}.png", 50 * s + 10 * c + i, size)


def test_imagenet_c_tree(tmp_path) -> None:
    _write_folder_c(tmp_path, size=12)
    data = load_imagenet_c(tmp_path, "fog", 2, crop=8)
    assert isinstance(data, FolderImageSet) and len(data) == 4
    assert data.classes == ["n01", "n02"] and data.source == "ImageNet-C official files"
    images, labels = next(batches(data, 8, shuffle=False))
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
    # n01 (label 0) holds levels 110, 111; n02 (label 1) holds 100, 101.
    assert labels.tolist() == [0, 0, 1, 1]
    assert (images[:, 0, 0, 0] * 255).round().tolist() == [110, 111, 100, 101]
    tiny = load_tiny_imagenet_c(tmp_path, "fog", 1)
    assert tiny.source == "Tiny-ImageNet-C official files"
    assert next(batches(tiny, 8, shuffle=False))[0].shape == (4, 3, 12, 12)
    with pytest.raises(UserError, match=r"missing .*fog[/\\]3"):
        load_imagenet_c(tmp_path, "fog", 3)
    with pytest.raises(UserError, match=r"missing .*snow"):
        load_tiny_imagenet_c(tmp_path, "snow", 1)


def test_imagenet_v2_numeric_classes_and_sizes(tmp_path) -> None:
    for name, height in (("10", 40), ("2", 30), ("0", 36)):
        _png(tmp_path / name / "a.jpeg.png", int(name), size=32, height=height)
    (tmp_path / "2" / "notes.txt").write_text("not an image")
    data = load_imagenet_v2(tmp_path, resize=16, crop=16)
    assert data.classes == ["0", "2", "10"]
    assert data.labels.tolist() == [0, 2, 10]
    images, labels = next(batches(data, 4, shuffle=False))
    assert images.shape == (3, 3, 16, 16) and labels.tolist() == [0, 2, 10]
    uncropped = folder_set(tmp_path, source="x")
    with pytest.raises(UserError, match="differ in size: give the set an image_size"):
        list(batches(uncropped, 4, shuffle=False))
    with pytest.raises(UserError, match="missing image folder"):
        load_imagenet_v2(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        folder_set(tmp_path / "empty", source="x")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(UserError, match=r"lacks images \(none in cls\)"):
        folder_set(tmp_path / "empty", source="x")


def test_official_sets(tmp_path) -> None:
    _write_cifar_c(tmp_path)
    loader = official_sets(tmp_path, "cifar10-c")
    assert loader("fog", 2).images[0, 0, 0, 0] == 20
    with pytest.raises(UserError, match="unknown official dataset 'mnist-c'"):
        official_sets(tmp_path, "mnist-c")


# --------------------------------------------------------------------------- evaluation


def test_evaluate_accuracy_counts_exactly(tmp_path) -> None:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 1])  # the last two are wrong
    model = LevelClassifier()
    assert evaluate_accuracy(model, (images, labels), batch_size=3) == pytest.approx(0.8)
    assert evaluate_accuracy(model, (images.float() / 255, labels)) == pytest.approx(0.8)
    for name in ("0", "1"):
        _png(tmp_path / name / "x.png", 3 if name == "0" else 5)  # predicted 0 and 2
    assert evaluate_accuracy(model, load_imagenet_v2(tmp_path, resize=8, crop=8)) == 0.5


def test_evaluate_corruptions_renders_caches_and_reports(tmp_path, monkeypatch) -> None:
    images = _images(6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    model = _tiny_cnn()
    model.train()
    report = evaluate_corruptions(
        model, images, labels, dataset_key="tiny-set", cache_dir=tmp_path, progress=False
    )
    assert model.training, "the model's mode was not restored"
    assert set(report.accuracy) == set(CORRUPTIONS)
    values = [a for sev in report.accuracy.values() for a in sev.values()]
    assert len(values) == 95 and all(0 <= a <= 1 for a in values)
    assert all(a * 6 == pytest.approx(round(a * 6)) for a in values)
    bench = [report.accuracy[n][s] for n in BENCHMARK_CORRUPTIONS for s in SEVERITIES]
    extra = [report.accuracy[n][s] for n in EXTRA_CORRUPTIONS for s in SEVERITIES]
    assert report.corruption_accuracy == pytest.approx(sum(bench) / 75)
    assert report.extra_accuracy == pytest.approx(sum(extra) / 20)
    assert 0 <= report.clean_accuracy <= 1 and report.is_complete
    assert report.source == SOURCE_RENDERED and report.params_table == "cifar"
    assert report.mce is None, "mCE is for ImageNet only"
    noise = [report.accuracy[n][s] for n in C.CATEGORIES["noise"] for s in SEVERITIES]
    assert report.per_category["noise"] == pytest.approx(sum(noise) / 15)

    # A second evaluation reuses every rendered set.
    calls = []
    real = C.corrupt
    monkeypatch.setattr(C.render_cache, "corrupt", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = evaluate_corruptions(
        model, images, labels, dataset_key="tiny-set", cache_dir=tmp_path, progress=False
    )
    assert calls == [] and again.accuracy == report.accuracy

    paths = report.save(tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["corruption_accuracy"] == pytest.approx(report.corruption_accuracy)
    assert CorruptionReport.from_dict(data).to_dict() == report.to_dict()
    markdown = paths["markdown"].read_text()
    assert f"{100 * report.corruption_accuracy:.2f}" in markdown and "| glass_blur |" in markdown
    assert "not comparable with published numbers" in markdown
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(file=io.StringIO(), width=160)
    report.print_table(console)
    printed = console.file.getvalue()
    assert "elastic_transform" in printed and "spatter (extra)" in printed


def test_report_numbers_by_hand() -> None:
    accuracy = {n: {s: 0.5 for s in SEVERITIES} for n in CORRUPTIONS}
    accuracy["fog"] = {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.5}
    accuracy["saturate"] = {s: 0.1 for s in SEVERITIES}
    report = CorruptionReport("imagenet-val", "ImageNet-C official files", 0.8, accuracy, 100)
    assert report.corruption_accuracy == pytest.approx((14 * 0.5 + 0.7) / 15)
    assert report.extra_accuracy == pytest.approx((3 * 0.5 + 0.1) / 4)
    assert report.relative_robustness == pytest.approx(report.corruption_accuracy / 0.8)
    assert report.per_category["weather"] == pytest.approx((3 * 0.5 + 0.7) / 4)
    assert report.per_severity[1] == pytest.approx((14 * 0.5 + 0.9) / 15)
    assert report.mce is None
    report.imagenet = True
    ce = {n: 0.5 / ALEXNET_ERRORS[n] for n in BENCHMARK_CORRUPTIONS}
    ce["fog"] = 0.3 / ALEXNET_ERRORS["fog"]
    assert report.corruption_errors == pytest.approx(ce)
    assert report.mce == pytest.approx(sum(ce.values()) / 15)
    del report.accuracy["fog"][5]
    assert not report.is_complete and report.mce is None


def test_cbar_family_is_evaluated_on_request_and_reported_apart(tmp_path) -> None:
    images, labels = _images(6), torch.tensor([0, 1, 2, 0, 1, 2])
    kwargs = {"dataset_key": "cbar-set", "cache_dir": tmp_path, "progress": False}
    default = evaluate_corruptions(_tiny_cnn(), images, labels, severities=(1,), **kwargs)
    assert set(default.accuracy) == set(CORRUPTIONS) and default.cbar_accuracy is None
    assert "held-out" not in default.to_markdown()

    named = ("fog", "saturate", "ripple", "lines")
    report = evaluate_corruptions(
        _tiny_cnn(), images, labels, corruptions=named, severities=(1, 5), **kwargs
    )
    assert list(report.accuracy) == list(named)
    assert report.cbar_accuracy == pytest.approx(
        sum(report.accuracy[n][s] for n in ("ripple", "lines") for s in (1, 5)) / 4
    )

    # By hand: the family's mean stays out of the headline and the extras.
    accuracy = {n: {s: 0.5 for s in SEVERITIES} for n in CORRUPTIONS}
    accuracy |= {n: {s: 0.2 for s in SEVERITIES} for n in C.CBAR_CORRUPTIONS}
    accuracy["ripple"] = {s: 0.9 for s in SEVERITIES}
    by_hand = CorruptionReport("cifar10-val", SOURCE_RENDERED, 0.8, accuracy, 10)
    assert by_hand.cbar_accuracy == pytest.approx((14 * 0.2 + 0.9) / 15)
    assert by_hand.corruption_accuracy == pytest.approx(0.5)
    assert by_hand.extra_accuracy == pytest.approx(0.5)
    assert by_hand.is_complete and "cbar" not in by_hand.per_category
    data = by_hand.to_dict()
    assert data["cbar_accuracy"] == pytest.approx(by_hand.cbar_accuracy)
    assert CorruptionReport.from_dict(json.loads(json.dumps(data))).to_dict() == data
    markdown = by_hand.to_markdown()
    assert "| held-out cbar corruptions, mean of 75 (%) | 24.67 |" in markdown
    assert "| ripple (held out) | cbar | 90.00 |" in markdown
    rows = [line.split(" | ")[0][2:] for line in markdown.splitlines() if line.startswith("| ")]
    assert rows.index("saturate (extra)") < rows.index("blue_noise_sample (held out)")

    with pytest.raises(UserError, match="unknown corruption 'cbar'"):
        evaluate_corruptions(_tiny_cnn(), images, labels, corruptions=("cbar",), **kwargs)


def test_evaluate_with_official_sets(tmp_path) -> None:
    _write_cifar_c(tmp_path, corruptions=("fog", "frost"))
    # Level 10 s + i (+100 for frost) mod 3 against labels i % 3: right when 10 s (+100) = 0
    # mod 3, i.e. fog at severity 3, frost at 2 and 5.
    clean = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 6, 6)
    report = evaluate_corruptions(
        LevelClassifier(),
        clean,
        torch.arange(4) % 3,
        dataset_key="cifar10",
        corruptions=("fog", "frost"),
        corrupted=official_sets(tmp_path, "cifar10-c"),
        progress=False,
    )
    assert report.clean_accuracy == 1.0
    assert report.source == "CIFAR-10-C official files" and report.seed is None
    assert [report.accuracy["fog"][s] for s in SEVERITIES] == [0, 0, 1, 0, 0]
    assert [report.accuracy["frost"][s] for s in SEVERITIES] == [0, 1, 0, 0, 1]
    assert not report.is_complete
    assert report.corruption_accuracy == pytest.approx(3 / 10)


def test_evaluate_corruptions_bad_input(tmp_path) -> None:
    model = _tiny_cnn()
    images, labels = _images(4), torch.zeros(4, dtype=torch.int64)
    kwargs = {"dataset_key": "k", "cache_dir": tmp_path, "progress": False}
    with pytest.raises(UserError, match=r"labels must have shape \(4,\)"):
        evaluate_corruptions(model, images, labels[:3], **kwargs)
    with pytest.raises(UserError, match="unknown corruption 'rain'"):
        evaluate_corruptions(model, images, labels, corruptions=("rain",), **kwargs)
    with pytest.raises(UserError, match="severity must be an integer"):
        evaluate_corruptions(model, images, labels, severities=(0,), **kwargs)
    with pytest.raises(UserError, match="batch size 0"):
        evaluate_corruptions(model, images, labels, batch_size=0, **kwargs)
    with pytest.raises(UserError, match="do not fit labels"):
        TensorImageSet(C.to_uint8(images), labels[:2])
    with pytest.raises(UserError, match="normalize has 3 means but the images have 1 channels"):
        evaluate_corruptions(
            nn.Flatten(), images[:, :1], labels, normalize=((0.5,) * 3, (0.2,) * 3), **kwargs
        )


def test_evaluate_corruptions_takes_any_test_data_and_normalizes(tmp_path) -> None:
    from torch.utils.data import DataLoader

    images = _images(6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    model = _tiny_cnn()
    kwargs = {
        "dataset_key": "any-data",
        "corruptions": ("fog", "contrast"),
        "severities": (1, 3),
        "cache_dir": tmp_path,
        "progress": False,
    }
    u8 = C.to_uint8(images)
    reference = evaluate_corruptions(model, u8, labels, **kwargs).to_dict()
    as_set = evaluate_corruptions(model, TensorImageSet(u8, labels), **kwargs).to_dict()
    floats = list(zip(u8.float() / 255, labels, strict=True))
    as_loader = evaluate_corruptions(model, DataLoader(floats, batch_size=4), **kwargs).to_dict()
    assert as_set == reference and as_loader == reference and reference["num_images"] == 6

    # normalize=(mean, std) is applied after corrupting: equal to a model that normalises.
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

    class Normalizing(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
            return self.inner((x - m) / s)

    inside = evaluate_corruptions(Normalizing(model), images, labels, **kwargs).to_dict()
    outside = evaluate_corruptions(model, images, labels, normalize=(mean, std), **kwargs)
    assert outside.to_dict() == inside
