"""Detection data: the canvas set, VOC and COCO folders, checks, the flip and batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from adasap.data import detection_canvas
from adasap.data.detection import (
    DetectionBatches,
    DetectionSet,
    DetectionSource,
    DetectionSpec,
    detection_collate,
    flip_horizontal,
    make_target,
)
from adasap.data.detection_canvas import MAX_IOU, load_canvas_detection, render_canvases
from adasap.data.detection_files import VOC_CLASSES, load_coco, load_voc, load_voc_detection
from adasap.errors import UserError
from test_data import write_fashion

SPEC = DetectionSpec("toy", ("a", "b", "c"))


def block_garments(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """28x28 garments: a solid 8-row x 12-column block on an empty background."""
    garments = torch.zeros(n, 28, 28, dtype=torch.uint8)
    garments[:, 10:18, 8:20] = 255
    return garments, torch.arange(n) % 10


def render(seed: int, count: int = 12, **kwargs):
    garments, labels = block_garments()
    return render_canvases(garments, labels, count, torch.Generator().manual_seed(seed), **kwargs)


# --------------------------------------------------------------------------- canvas set


def test_canvases_are_deterministic_per_seed():
    images, targets = render(0)
    again, again_targets = render(0)
    other, other_targets = render(1)
    assert images.shape == (12, 3, 128, 128) and images.dtype == torch.uint8
    assert torch.equal(images, again)
    for t, u in zip(targets, again_targets, strict=True):
        assert torch.equal(t["boxes"], u["boxes"]) and torch.equal(t["labels"], u["labels"])
    assert not torch.equal(images, other)


def test_canvas_boxes_are_tight_inside_and_apart():
    images, targets = render(3, count=30, max_objects=4)
    counts = [len(t["labels"]) for t in targets]
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1
    for t in targets:
        boxes = t["boxes"]
        assert boxes.dtype == torch.float32 and t["labels"].dtype == torch.int64
        assert (boxes >= 0).all() and (boxes <= 128).all()
        assert ((t["labels"] >= 1) & (t["labels"] <= 10)).all()
        # Tight: the 12 x 8 block keeps its 3:2 aspect (a box around the whole 28 px garment
        # would be square); bilinear scaling adds at most a pixel per side.
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert ((w / h - 1.5).abs() < 0.3).all()
        iou = box_iou(boxes, boxes) - torch.eye(len(boxes))
        assert iou.max() <= MAX_IOU


@pytest.mark.parametrize("max_objects", [1, 4])
def test_canvas_boxes_hold_exactly_the_garment_pixels(monkeypatch, max_objects):
    """On a black background a pixel is lit iff a garment's alpha is > 0 there (tints are
    > 0.5): nothing is lit outside the boxes, and a lone garment lights every edge of its box."""
    monkeypatch.setattr(
        detection_canvas, "_background", lambda size, gen: torch.zeros(3, size, size)
    )
    garments = torch.zeros(4, 28, 28, dtype=torch.uint8)
    garments[:, 5:20, 9:14] = 200  # a tall block, plus a faint diagonal stroke beside it
    garments[:, torch.arange(3, 25), torch.arange(3, 25)] = 40
    images, targets = render_canvases(
        garments, torch.arange(4), 6, torch.Generator().manual_seed(2), max_objects=max_objects
    )
    for image, target in zip(images, targets, strict=True):
        lit = image.amax(0) > 0
        inside = torch.zeros_like(lit)
        for x1, y1, x2, y2 in target["boxes"].long().tolist():
            inside[y1:y2, x1:x2] = True
        assert lit[inside].any() and not lit[~inside].any()
        if max_objects == 1:
            x1, y1, x2, y2 = target["boxes"][0].long().tolist()
            box = lit[y1:y2, x1:x2]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()


def test_canvas_set_loads_from_tiny_files_and_is_cached(tmp_path, monkeypatch):
    data_dir = write_fashion(tmp_path / "fashion", 40, 20)
    kwargs = dict(data_dir=data_dir, cache_dir=tmp_path / "cache", num_train=6, num_val=3)
    bundle = load_canvas_detection(**kwargs, num_test=4)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 3, 4)
    assert bundle.spec.num_classes == 11 and bundle.spec.class_names[0] == "T-shirt/top"
    image, target = bundle.test[0]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32 and image.max() <= 1

    def no_render(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(detection_canvas, "render_canvases", no_render)
    again = load_canvas_detection(**kwargs, num_test=4)
    assert torch.equal(again.test.images, bundle.test.images)
    assert torch.equal(again.train.targets[2]["boxes"], bundle.train.targets[2]["boxes"])
    with pytest.raises(AssertionError, match="cache"):  # other arguments: another entry
        load_canvas_detection(**kwargs, num_test=5)


def test_damaged_canvas_cache_is_rebuilt(tmp_path):
    data_dir = write_fashion(tmp_path / "fashion", 30, 10)
    kwargs = dict(data_dir=data_dir, cache_dir=tmp_path / "cache", num_train=3, num_val=2)
    first = load_canvas_detection(**kwargs, num_test=2)
    (stored,) = (tmp_path / "cache" / "detection").glob("canvas-*/canvases.npz")
    stored.write_bytes(stored.read_bytes()[:-100])  # truncated: its checksum no longer matches
    second = load_canvas_detection(**kwargs, num_test=2)
    assert torch.equal(first.train.images, second.train.images)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_train": 0}, "num_train=0 is invalid"),
        ({"max_objects": 1.5}, "max_objects=1.5 is invalid"),
        ({"image_size": 16}, "image_size=16 is too small"),
    ],
)
def test_bad_canvas_options_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        load_canvas_detection(**kwargs)


def test_test_garments_are_never_trained_on(tmp_path):
    data_dir = write_fashion(tmp_path / "fashion", 50, 20)
    pools, _ = detection_canvas._garment_pools(data_dir, seed=0)
    train, val, test = (pools[k][0].flatten(1) for k in ("train", "val", "test"))
    assert len(train) + len(val) == 50 and len(test) == 20
    for pool in (val, test):  # random garments: equal rows mean the same garment
        assert not (train[:, None] == pool[None]).all(-1).any()


# --------------------------------------------------------------------------- checks, flip, batches


@pytest.mark.parametrize(
    "boxes, labels, match",
    [
        ([[0, 0, 40, 10]], [1], "outside the 32x24 image"),
        ([[-1, 0, 4, 10]], [1], "outside"),
        ([[0, 0, 4, 4]], [4], "class id 4 is out of range: use 1..3"),
        ([[0, 0, 4, 4]], [0], "class id 0 is out of range"),
        ([[5, 0, 5, 4]], [1], "has no area"),
    ],
)
def test_bad_targets_are_user_errors(boxes, labels, match):
    images = torch.zeros(1, 3, 24, 32, dtype=torch.uint8)
    with pytest.raises(UserError, match=match):
        DetectionSet(images, [make_target(boxes, labels)], SPEC)


def test_flip_mirrors_boxes():
    image = torch.arange(2 * 10, dtype=torch.float32).reshape(1, 2, 10)
    target = make_target([[1, 0, 4, 2]], [2])
    flipped, out = flip_horizontal(image, target)
    assert torch.equal(out["boxes"], torch.tensor([[6.0, 0, 9, 2]]))
    assert torch.equal(flipped[0, 0], image[0, 0].flip(0)) and torch.equal(
        out["labels"], target["labels"]
    )
    back, again = flip_horizontal(flipped, out)
    assert torch.equal(back, image) and torch.equal(again["boxes"], target["boxes"])


def toy_set(n: int = 6) -> DetectionSet:
    images = [torch.full((3, 16 + i, 20), i, dtype=torch.uint8) for i in range(n)]
    targets = [make_target([[i, 0, i + 4, 8]], [1 + i % 3]) for i in range(n)]
    return DetectionSet(images, targets, SPEC)


def test_batches_follow_the_contract_and_training_epochs_are_seeded():
    data = toy_set()
    batches = list(DetectionBatches(data, 4))
    assert [len(images) for images, _ in batches] == [4, 2]
    images, targets = batches[0]
    assert [x.shape for x in images] == [(3, 16 + i, 20) for i in range(4)]
    assert images[1].dtype == torch.float32 and targets[1]["labels"].tolist() == [2]

    def epoch(seed, index=0):
        source = DetectionSource(data, 3, seed=seed)
        return [t["boxes"] for _, ts in source.epoch(index) for t in ts]

    assert all(torch.equal(a, b) for a, b in zip(epoch(1), epoch(1), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(epoch(1), epoch(1, 1), strict=True))
    boxes = torch.cat(epoch(1))
    originals = torch.cat([t["boxes"] for t in data.targets])
    assert not torch.equal(boxes, originals)  # shuffled or flipped
    widths = boxes[:, 2] - boxes[:, 0]
    assert (widths == 4).all() and (boxes[:, 2] <= 20).all()
    assert len(DetectionSource(data, 4)) == 1  # the last short batch is dropped in training
    images, targets = detection_collate([data[0], data[1]])
    assert len(images) == len(targets) == 2


def test_every_rank_trains_on_its_rows_of_each_global_batch():
    data = toy_set(8)
    whole = [t["boxes"] for _, ts in DetectionSource(data, 4, seed=3).epoch(0) for t in ts]
    parts = [
        [t["boxes"] for _, ts in DetectionSource(data, 2, seed=3).sharded((r, 2)).epoch(0)
         for t in ts]
        for r in range(2)
    ]  # fmt: skip
    merged = [b for step in range(2) for r in range(2) for b in parts[r][2 * step : 2 * step + 2]]
    assert all(torch.equal(a, b) for a, b in zip(merged, whole, strict=True))  # flips too


# --------------------------------------------------------------------------- VOC


def voc_xml(objects: list[tuple[str, list[int], int]], width: int = 40, height: int = 30) -> str:
    parts = [
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
        f"<xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax>"
        "</bndbox></object>"
        for name, b, difficult in objects
    ]
    size = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    return f"<annotation>{size}{''.join(parts)}</annotation>"


def write_voc(root: Path, year: str = "2007", annotations: dict | None = None) -> Path:
    folder = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    annotations = annotations or {
        "000001": voc_xml([("dog", [1, 1, 20, 15], 0), ("person", [10, 5, 40, 30], 1)]),
        "000002": voc_xml([("car", [5, 6, 30, 28], 0)]),
        "000003": voc_xml([("cat", [2, 3, 12, 13], 0)]),
    }
    for image_id, xml in annotations.items():
        (folder / "Annotations" / f"{image_id}.xml").write_text(xml)
        Image.new("RGB", (40, 30), (128, 128, 128)).save(folder / "JPEGImages" / f"{image_id}.jpg")
    ids = "\n".join(annotations) + "\n"
    for name in ("test", "trainval"):
        (folder / "ImageSets" / "Main" / f"{name}.txt").write_text(ids)
    return folder


def test_voc_reads_torchvision_layout_and_handles_difficult(tmp_path):
    write_voc(tmp_path)
    test = load_voc(tmp_path)
    image, target = test[0]
    assert image.shape == (3, 30, 40) and abs(float(image.mean()) - 128 / 255) < 0.02
    # VOC's 1-based inclusive pixel boxes become 0-based xyxy.
    assert torch.equal(target["boxes"], torch.tensor([[0.0, 0, 20, 15], [9, 4, 40, 30]]))
    dog, person = VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1
    assert target["labels"].tolist() == [dog, person] and target["iscrowd"].tolist() == [0, 1]
    assert test.spec.num_classes == 21
    train = load_voc(tmp_path, (("2007", "trainval"),), training=True)
    assert train[0][1]["labels"].tolist() == [dog] and "iscrowd" not in train[0][1]
    bundle = load_voc_detection(tmp_path, val_fraction=0.34)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (2, 1, 3)


def test_voc_bad_inputs_are_user_errors(tmp_path):
    folder = write_voc(tmp_path / "missing")
    (folder / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(UserError, match=r"image .*000002\.jpg is missing: restore it"):
        load_voc(tmp_path / "missing")
    folder = write_voc(tmp_path / "empty")
    (folder / "Annotations" / "000003.xml").write_text("")
    with pytest.raises(UserError, match=r"000003\.xml is empty or not XML"):
        load_voc(tmp_path / "empty")
    write_voc(tmp_path / "class", annotations={"1": voc_xml([("unicorn", [1, 1, 5, 5], 0)])})
    with pytest.raises(UserError, match="'unicorn' is not one of the 20 VOC classes"):
        load_voc(tmp_path / "class")
    write_voc(tmp_path / "box", annotations={"1": voc_xml([("dog", [1, 1, 50, 5], 0)])})
    with pytest.raises(UserError, match=r"lies outside the 40x30 image"):
        load_voc(tmp_path / "box")
    with pytest.raises(UserError, match="no VOC2012"):
        load_voc(tmp_path / "box", (("2012", "test"),))


# --------------------------------------------------------------------------- COCO


def write_coco(root: Path, annotations: list[dict] | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (30, 20)).save(root / "images" / name)
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 30, "height": 20},
            {"id": 2, "file_name": "b.png", "width": 30, "height": 20},
        ],
        "categories": [{"id": 7, "name": "kite"}, {"id": 3, "name": "car"}],
        "annotations": annotations
        if annotations is not None
        else [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 20], "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [4, 4, 0, 6], "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [20.5, 10, 9.8, 10.4]},
        ],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_maps_categories_and_handles_crowds(tmp_path):
    annotations = write_coco(tmp_path)
    test = load_coco(tmp_path / "images", annotations)
    assert test.spec.class_names == ("car", "kite") and test.spec.num_classes == 3
    image, target = test[0]
    assert image.shape == (3, 20, 30)
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [0, 0, 30, 20]]))
    assert target["labels"].tolist() == [2, 1] and target["iscrowd"].tolist() == [0, 1]
    # The zero-width box is dropped; one ending 0.2 px past the border is clipped.
    assert torch.allclose(test[1][1]["boxes"], torch.tensor([[20.5, 10, 30, 20]]))
    train = load_coco(tmp_path / "images", annotations, training=True)
    assert train[0][1]["labels"].tolist() == [2]


@pytest.mark.parametrize(
    "annotation, match",
    [
        ({"id": 9, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2]}, "class id 5"),
        ({"id": 9, "image_id": 1, "category_id": 3, "bbox": [25, 1, 9, 2]}, "outside the 30x20"),
        ({"id": 9, "image_id": 4, "category_id": 3, "bbox": [1, 1, 2, 2]}, "unknown image id 4"),
    ],
)
def test_coco_bad_annotations_are_user_errors(tmp_path, annotation, match):
    path = write_coco(tmp_path, [annotation])
    with pytest.raises(UserError, match=match):
        load_coco(tmp_path / "images", path)


def test_coco_empty_file_and_missing_image(tmp_path):
    path = write_coco(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(UserError, match=r"image .*b\.png is missing: put it in"):
        load_coco(tmp_path / "images", path)
    path.write_text("")
    with pytest.raises(UserError, match="is empty or not JSON"):
        load_coco(tmp_path / "images", path)
    path.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(UserError, match="has no images or no categories"):
        load_coco(tmp_path / "images", path)
