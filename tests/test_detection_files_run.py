"""``adasap run --task detection`` on Pascal VOC and COCO-format folders, and eval on its run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from adasap import cli
from adasap.data.detection import FileDetectionSet
from adasap.errors import UserError
from adasap.experiments import speed
from adasap.experiments.config import from_flat
from adasap.experiments.detection_data import load_detection_data
from test_detection_data import voc_xml, write_voc

TINY = [
    "run", "--task", "detection", "--image-size", "48", "--dense-epochs", "1",
    "--batch-size", "4", "--warmup-epochs", "1", "--prune-epochs", "1",
    "--finetune-epochs", "1", "--prune-steps", "1", "--methods", "sgd", "--no-progress",
]  # fmt: skip


def write_tiny_voc(root: Path, count: int = 8) -> Path:
    """VOC2007 with ``count`` 40x30 images (a dog and a car each), in trainval and test."""
    objects = [("dog", [2, 2, 18, 14], 0), ("car", [20, 10, 38, 28], 0)]
    write_voc(root, annotations={f"{i:06d}": voc_xml(objects) for i in range(count)})
    return root


def write_coco_split(root: Path, split: str, count: int) -> None:
    """``root/<split>/`` with ``count`` images of two sizes and ``root/annotations/
    instances_<split>.json``: a kite and a car on each."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        width, height = (40, 30) if i % 2 else (32, 48)
        name = f"{i}.png"
        Image.new("RGB", (width, height), (40 * (i % 5), 90, 160)).save(root / split / name)
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        for k, (category, bbox) in enumerate(((7, [2, 3, 12, 10]), (3, [16, 12, 14, 16]))):
            annotations.append(
                {"id": 10 * i + k, "image_id": i, "category_id": category, "bbox": bbox}
            )
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "kite"}, {"id": 3, "name": "car"}],
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def detection_config(**values):
    return from_flat({"task": "detection", **values}).validate()


def test_voc_and_coco_configs_load_their_folders_limited_and_seeded(tmp_path):
    voc = write_tiny_voc(tmp_path / "voc")
    config = detection_config(dataset="voc", data_dir=str(voc), train_limit=3, test_limit=2)
    data = load_detection_data(config)
    assert data.spec.num_classes == 21 and isinstance(data.train, FileDetectionSet)
    assert (len(data.train), len(data.test)) == (3, 2)
    again = load_detection_data(config)
    assert again.train.paths == data.train.paths  # the same seed draws the same images
    other = load_detection_data(detection_config(**{**config.to_flat(), "seed": 1}))
    assert len(other.train) == 3 and other.train.paths != data.train.paths
    whole = detection_config(dataset="voc:2007", data_dir=str(voc), train_limit=None,
                             test_limit=None)  # fmt: skip
    everything = load_detection_data(whole)
    assert (len(everything.train), len(everything.test)) == (7, 8)  # one trainval image is val
    coco = tmp_path / "coco"
    write_coco_split(coco, "fit", 4)
    write_coco_split(coco, "check", 3)
    data = load_detection_data(detection_config(dataset="coco:fit,check", data_dir=str(coco)))
    assert data.spec.class_names == ("car", "kite") and len(data.test) == 3


def test_missing_folders_are_one_line_errors_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = cli.main([*TINY, "--dataset", "voc", "--data-dir", str(missing), "--out",
                     str(tmp_path / "runs")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {missing} is not a folder: pass --data-dir")
    assert not (tmp_path / "runs").exists()  # nothing is left behind
    voc = write_tiny_voc(tmp_path / "voc", 2)
    with pytest.raises(UserError, match=f"no VOC2012 in {voc}"):
        load_detection_data(detection_config(dataset="voc:2012", data_dir=str(voc)))
    with pytest.raises(UserError, match=r"instances_train2017\.json is missing"):
        load_detection_data(detection_config(dataset="coco", data_dir=str(voc)))


@pytest.fixture
def few_latency_rounds(monkeypatch, tmp_path):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    # a few latency rounds: the tests check the rows, not the timing
    monkeypatch.setattr(speed, "LATENCY_ROUNDS", 3)
    monkeypatch.setattr(speed, "LATENCY_WARMUP", 1)


def rows_of(run_dir: Path) -> dict[str, dict]:
    return {r["method"]: r for r in json.loads((run_dir / "results.json").read_text())["rows"]}


def test_voc_run_trains_prunes_evaluates_and_eval_agrees(tmp_path, few_latency_rounds, capsys):
    voc = write_tiny_voc(tmp_path / "voc")
    args = [*TINY, "--dataset", "voc", "--data-dir", str(voc), "--corruptions", "quick",
            "--corruption-limit", "2", "--workers", "0", "--out", str(tmp_path),
            "--name", "v"]  # fmt: skip
    assert cli.main(args) == 0, capsys.readouterr().err
    run_dir = tmp_path / "v"
    rows = rows_of(run_dir)
    assert list(rows) == ["dense", "sgd"] and rows["sgd"]["params"] < rows["dense"]["params"]
    report = json.loads((run_dir / "sgd" / "detection-corruptions.json").read_text())
    assert report["num_images"] == 2 and rows["sgd"]["clean_accuracy"] == report["P"]
    note = (run_dir / "results.md").read_text()
    assert (
        "7 training and 8 test voc images, resized by the detector to 48 px (2 corrupted)," in note
    )
    model = json.loads((run_dir / "sgd" / "model.json").read_text())["architecture"]
    assert (model["num_classes"], model["image_size"]) == (21, 48)
    capsys.readouterr()
    assert cli.main(["eval", str(run_dir), "--no-progress"]) == 0, capsys.readouterr().err
    again = json.loads((run_dir / "sgd" / "detection-corruptions.json").read_text())
    assert again["P"] == pytest.approx(report["P"], abs=1e-9)
    assert again["mPC"] == pytest.approx(report["mPC"], abs=1e-9)


def test_coco_run_on_images_of_two_sizes(tmp_path, few_latency_rounds, capsys):
    coco = tmp_path / "coco"
    write_coco_split(coco, "train", 6)
    write_coco_split(coco, "val", 3)
    args = [*TINY, "--dataset", "coco:train,val", "--data-dir", str(coco), "--corruptions",
            "none", "--workers", "1", "--out", str(tmp_path), "--name", "c"]  # fmt: skip
    assert cli.main(args) == 0, capsys.readouterr().err
    rows = rows_of(tmp_path / "c")
    assert list(rows) == ["dense", "sgd"] and rows["sgd"]["corruption_accuracy"] is None
    assert 0 <= rows["sgd"]["clean_accuracy"] <= 1
    cached = [p.name for p in (tmp_path / "cache" / "dense").iterdir() if p.is_dir()]
    assert (
        "3 test coco:train,val images, resized by the detector to 48 px, 1 dense"
        in (tmp_path / "c" / "results.md").read_text()
    )
    assert len(cached) == 1 and cached[0].startswith("coco-train-val-tiny_ssd-")
