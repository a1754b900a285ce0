"""Detection sets on disk: Pascal VOC (torchvision's ``VOCDetection`` layout) and COCO folders.

Both keep the objects their protocols ignore, VOC's ``difficult`` ones and COCO's crowds, out of
training sets, and mark them ``iscrowd = 1`` in evaluation sets, where the metric ignores them
(a detection matching one is neither a true nor a false positive).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from adasap.data.coco_checks import FIX as COCO_FIX
from adasap.data.coco_checks import CocoObject, parse_coco, short
from adasap.data.detection import (
    DetectionBundle,
    DetectionSpec,
    FileDetectionSet,
    Target,
    check_target,
    make_target,
)
from adasap.errors import UserError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
VOC_SPEC = DetectionSpec("voc", VOC_CLASSES)
# COCO boxes are floats; some end a rounding error past the border. Within this many pixels
# they are clipped to the image, beyond it they are an error.
_BORDER_SLACK = 1.0

Record = tuple[Path, Target]  # an image file and its target, ignored objects marked iscrowd


def _for_training(target: Target) -> Target:
    """The target without the objects the protocol ignores, and without the ``iscrowd`` key."""
    keep = target["iscrowd"] == 0
    return make_target(target["boxes"][keep], target["labels"][keep])


def detection_set(
    records: Sequence[Record], spec: DetectionSpec, *, training: bool, source: str, fix: str
) -> FileDetectionSet:
    """A :class:`FileDetectionSet` of ``records``; ``training`` drops the ignored objects."""
    targets = [_for_training(t) if training else t for _, t in records]
    return FileDetectionSet([p for p, _ in records], targets, spec, source=source, fix=fix)


def inside(folder: Path, name: str, where: str) -> Path:
    """``folder / name``, when it stays inside ``folder``: names come from annotation files,
    and an absolute name, ``..`` or a link out of the folder would read any file on the disk."""
    path = folder / name
    if "\x00" in name or not path.resolve().is_relative_to(folder.resolve()):
        raise UserError(
            f"{where}: file name {short(name)} points outside {folder}: give a path inside "
            "that folder (relative, no '..', no link out of it)"
        )
    try:
        path.exists()  # a name the file system cannot hold (too long, say) fails here, once
    except OSError as exc:
        raise UserError(
            f"{where}: file name {short(name)} is not a usable path ({exc.strerror}): give the "
            "image's file name"
        ) from None
    return path


def check_image_size(path: Path, width: int, height: int, where: str) -> None:
    """A :class:`UserError` when the image at ``path`` is not ``width`` x ``height``: boxes are
    checked against the declared size, so a wrong one would let boxes outside the image pass.
    Pillow reads the header only; a missing image is left to :class:`FileDetectionSet`."""
    if not path.is_file():
        return
    try:
        with Image.open(path) as img:
            real = img.size
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot decode {path}: {exc}: replace or delete the file") from None
    if real != (width, height):
        raise UserError(
            f"{where}: declared size {short(width, 12)}x{short(height, 12)} differs from the "
            f"{real[0]}x{real[1]} of image {path}: fix the annotation's size"
        )


def _voc_folder(root: Path, year: str) -> Path:
    for folder in (root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}", root):
        if folder.name == f"VOC{year}" and (folder / "Annotations").is_dir():
            return folder
    raise UserError(
        f"no VOC{year} in {root}: expected {root}/VOCdevkit/VOC{year}/Annotations, JPEGImages "
        "and ImageSets/Main (torchvision's VOCDetection layout); extract the VOC archive there"
    )


def _voc_record(folder: Path, image_id: str, listing: Path) -> Record:
    xml_path = inside(folder / "Annotations", f"{image_id}.xml", str(listing))
    image_path = inside(folder / "JPEGImages", f"{image_id}.jpg", str(listing))
    fix = "restore it from the VOC archive"
    try:
        tree = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise UserError(f"annotation file {xml_path} is missing: {fix}") from None
    except OSError as exc:
        raise UserError(f"cannot read annotation file {xml_path} ({exc.strerror}): {fix}") from None
    except ET.ParseError as exc:
        raise UserError(f"annotation file {xml_path} is empty or not XML ({exc}): {fix}") from None
    try:
        width = int(float(tree.findtext("size/width", "")))
        height = int(float(tree.findtext("size/height", "")))
        boxes, labels, difficult = [], [], []
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in VOC_CLASSES:
                raise UserError(
                    f"{xml_path}: class {name!r} is not one of the 20 VOC classes: "
                    "fix the annotation's <name>"
                )
            box = [float(obj.findtext(f"bndbox/{k}", "")) for k in ("xmin", "ymin", "xmax", "ymax")]
            # VOC counts pixels from 1 and includes both ends: pixel columns xmin..xmax.
            boxes.append([box[0] - 1, box[1] - 1, box[2], box[3]])
            labels.append(VOC_CLASSES.index(name) + 1)
            difficult.append(int(obj.findtext("difficult") or 0))
    except (ValueError, OverflowError) as exc:  # int(float("inf")) overflows
        raise UserError(
            f"{xml_path} has a missing or non-numeric size or box ({str(exc)[:80]}): {fix}"
        ) from None
    check_image_size(image_path, width, height, str(xml_path))
    target = make_target(boxes, labels, difficult)
    check_target(target["boxes"], target["labels"], width, height, len(VOC_CLASSES), str(xml_path))
    return image_path, target


def voc_records(root: str | Path, year: str, image_set: str) -> list[Record]:
    """The images of ``ImageSets/Main/<image_set>.txt`` of VOC ``year`` and their targets."""
    folder = _voc_folder(Path(root).expanduser(), str(year))
    listing = folder / "ImageSets" / "Main" / f"{image_set}.txt"
    if not listing.is_file():
        raise UserError(
            f"{listing} is missing: choose an image set of {listing.parent} (train, val, "
            "trainval, test) or restore the file from the VOC archive"
        )
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise UserError(f"{listing} lists no images: restore it from the VOC archive")
    return [_voc_record(folder, image_id, listing) for image_id in ids]


def load_voc(
    root: str | Path,
    image_sets: Sequence[tuple[str, str]] = (("2007", "test"),),
    *,
    training: bool = False,
) -> FileDetectionSet:
    """VOC images of ``(year, image_set)`` pairs, e.g. ``(("2007", "trainval"), ("2012",
    "trainval"))``; ``root`` holds ``VOCdevkit/`` (as torchvision's ``VOCDetection``)."""
    records = [r for year, name in image_sets for r in voc_records(root, year, name)]
    label = " + ".join(f"VOC{year} {name}" for year, name in image_sets)
    return detection_set(
        records, VOC_SPEC, training=training, source=label, fix="restore it from the VOC archive"
    )


def _coco_box(bbox: tuple[float, ...], width: int, height: int) -> list[float]:
    """COCO's [x, y, w, h] as xyxy, clipped to the image when it is within the slack."""
    x1, y1, x2, y2 = bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]
    if (
        min(x1, y1) >= -_BORDER_SLACK
        and x2 <= width + _BORDER_SLACK
        and y2 <= height + _BORDER_SLACK
    ):
        return [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]
    return [x1, y1, x2, y2]  # check_target reports it


def coco_records(
    images_dir: str | Path, annotation_file: str | Path
) -> tuple[list[Record], tuple[str, ...]]:
    """The images of a COCO instances JSON and their targets, and the class names (labels
    1..K in the order of the category ids). Boxes without area are dropped, as torchvision's
    COCO reference does."""
    path, images_dir = Path(annotation_file).expanduser(), Path(images_dir).expanduser()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"annotation file {path} is missing: {COCO_FIX}") from None
    except OSError as exc:
        raise UserError(
            f"cannot read annotation file {path} ({exc.strerror}): {COCO_FIX}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = str(exc)[:80] if isinstance(exc, ValueError) else "nested too deeply"
        raise UserError(
            f"annotation file {path} is empty or not JSON ({reason}): {COCO_FIX}"
        ) from None
    images, categories, objects = parse_coco(data, path)
    label_of = {category_id: i + 1 for i, (category_id, _) in enumerate(sorted(categories))}
    found: dict[int, list[CocoObject]] = {image.id: [] for image in images}
    for obj in objects:
        if obj.category_id not in label_of:
            raise UserError(
                f"{path}: annotation {short(obj.id)} has class id {obj.category_id}, out of "
                f"range (not among the {len(label_of)} categories): fix its category_id"
            )
        if obj.bbox[2] > 0 and obj.bbox[3] > 0:
            found[obj.image_id].append(obj)
    records = []
    for image in images:
        where = f"{path} image {short(image.file_name)}"
        image_path = inside(images_dir, image.file_name, where)
        check_image_size(image_path, image.width, image.height, where)
        objs = found[image.id]
        target = make_target(
            [_coco_box(o.bbox, image.width, image.height) for o in objs],
            [label_of[o.category_id] for o in objs],
            [o.iscrowd for o in objs],
        )
        check_target(
            target["boxes"], target["labels"], image.width, image.height, len(label_of), where
        )
        records.append((image_path, target))
    return records, tuple(name for _, name in sorted(categories))


def load_coco(
    images_dir: str | Path, annotation_file: str | Path, *, training: bool = False
) -> FileDetectionSet:
    """A COCO-format set: ``images_dir`` holds the files named in ``annotation_file``."""
    records, names = coco_records(images_dir, annotation_file)
    spec = DetectionSpec(f"coco:{Path(annotation_file).stem}", names)
    fix = f"put it in {images_dir} or remove it from {annotation_file}"
    return detection_set(records, spec, training=training, source=str(annotation_file), fix=fix)


def _bundle(
    spec: DetectionSpec,
    pool: list[Record],
    test: list[Record],
    source: tuple[str, str],
    *,
    val_fraction: float,
    seed: int,
    fix: str,
) -> DetectionBundle:
    """Train/val carved from ``pool`` (seeded, val objects kept for evaluation), and test."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction} is out of range: use 0 < value < 1")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(val_fraction * len(pool)))
    val = [pool[i] for i in sorted(order[:n_val])]
    train = [pool[i] for i in sorted(order[n_val:])]
    return DetectionBundle(
        spec,
        detection_set(train, spec, training=True, source=source[0], fix=fix),
        detection_set(val, spec, training=False, source=source[0], fix=fix),
        detection_set(test, spec, training=False, source=source[1], fix=fix),
    )


def load_voc_detection(
    root: str | Path,
    *,
    years: Sequence[str] | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> DetectionBundle:
    """The usual VOC protocol: train on ``trainval`` of ``years`` (default: 2007 and, when
    present, 2012), less a seeded validation part; test on VOC2007 ``test``."""
    root = Path(root).expanduser()
    if years is None:
        years = ["2007"] + [y for y in ("2012",) if (root / "VOCdevkit" / f"VOC{y}").is_dir()]
    pool = [r for year in years for r in voc_records(root, year, "trainval")]
    names = ("+".join(f"VOC{y} trainval" for y in years), "VOC2007 test")
    fix = "restore it from the VOC archive"
    return _bundle(
        VOC_SPEC, pool, voc_records(root, "2007", "test"), names,
        val_fraction=val_fraction, seed=seed, fix=fix,
    )  # fmt: skip


def load_coco_detection(
    root: str | Path,
    *,
    train: str = "train2017",
    test: str = "val2017",
    val_fraction: float = 0.02,
    seed: int = 0,
) -> DetectionBundle:
    """COCO's layout: ``root/<split>/`` images and ``root/annotations/instances_<split>.json``;
    trains on ``train`` less a seeded validation part, tests on ``test``."""
    root = Path(root).expanduser()
    files = {s: root / "annotations" / f"instances_{s}.json" for s in (train, test)}
    pool, names = coco_records(root / train, files[train])
    test_records, test_names = coco_records(root / test, files[test])
    if test_names != names:
        raise UserError(
            f"{files[test]} has other categories than {files[train]}: use one data set's files"
        )
    spec = DetectionSpec(f"coco:{root}", names)
    fix = "put the image there or remove it from its annotation file"
    return _bundle(
        spec, pool, test_records, (str(files[train]), str(files[test])),
        val_fraction=val_fraction, seed=seed, fix=fix,
    )  # fmt: skip
