"""Field-by-field checks of a COCO instances JSON, so a malformed file is one :class:`UserError`
line naming the file, the entry and the fix, never a ``KeyError`` or ``TypeError`` from deep
inside the loader. Only the fields the loader reads are checked; others are left alone."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adasap.errors import UserError

FIX = "give the instances JSON of a COCO-format data set"


@dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class CocoObject:
    id: object  # only named in messages; labelling tools sometimes leave it out
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # COCO's [x, y, w, h], finite
    iscrowd: int


def short(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: a hostile file may hold megabyte strings."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not an id


def _int_field(entry: dict, key: str, where: str) -> int:
    value = entry.get(key)
    if not _is_int(value):
        got = "is missing" if key not in entry else f"is {short(value)}"
        raise UserError(f"{where}: {key!r} {got}, not an integer: fix the annotation file")
    return value


def _size_field(entry: dict, key: str, where: str) -> int:
    value = entry.get(key)
    # Some tools write sizes as floats (640.0); anything else, or a fraction, is an error.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not _is_int(value) or value < 1:
        got = "is missing" if key not in entry else f"is {short(value)}"
        raise UserError(
            f"{where}: {key!r} {got}, not a positive integer: give the image's size in pixels"
        )
    return value


def _list_field(data: dict, key: str, path: Path, *, required: bool) -> list:
    value = data.get(key)
    if value is None and not required and key not in data:
        return []
    if required and (value is None or value == []):
        raise UserError(f"annotation file {path} has no images or no categories: {FIX}")
    if not isinstance(value, list):
        raise UserError(
            f"{path}: {key!r} is {type(value).__name__} {short(value)}, not a list: {FIX}"
        )
    return value


def _entries(data: dict, key: str, path: Path, *, required: bool) -> list[dict]:
    entries = _list_field(data, key, path, required=required)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserError(
                f"{path}: {key}[{i}] is {short(entry)}, not an object: fix the annotation file"
            )
    return entries


def _bbox(ann: dict, where: str) -> tuple[float, float, float, float]:
    bbox = ann.get("bbox")
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
    ):
        got = "is missing" if "bbox" not in ann else f"is {short(bbox)}"
        raise UserError(f"{where}: 'bbox' {got}: give [x, y, width, height], four numbers")
    # Python's json reads NaN and Infinity; such a box would pass every comparison unnoticed
    # (NaN compares false) and surface only as a diverged training run.
    if not all(math.isfinite(v) for v in bbox):
        raise UserError(
            f"{where}: 'bbox' {short(bbox)} has a NaN or infinite number: "
            "give finite [x, y, width, height]"
        )
    return float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3])


def parse_coco(
    data: Any, path: Path
) -> tuple[list[CocoImage], list[tuple[int, str]], list[CocoObject]]:
    """The images, the ``(id, name)`` categories and the annotations of a loaded instances
    JSON, each field checked; ids are unique and every annotation names a known image."""
    if not isinstance(data, dict):
        raise UserError(f"annotation file {path} has no images or no categories: {FIX}")
    images, categories, seen = [], {}, set()
    for i, entry in enumerate(_entries(data, "images", path, required=True)):
        where = f"{path} images[{i}]"
        image_id = _int_field(entry, "id", where)
        name = entry.get("file_name")
        if not isinstance(name, str) or not name or "\x00" in name:
            raise UserError(
                f"{where}: 'file_name' is {short(name)}: give the image's name in the image folder"
            )
        if image_id in seen:
            raise UserError(f"{where}: image id {image_id} appears twice: give each image one id")
        seen.add(image_id)
        width = _size_field(entry, "width", where)
        images.append(CocoImage(image_id, name, width, _size_field(entry, "height", where)))
    for i, entry in enumerate(_entries(data, "categories", path, required=True)):
        where = f"{path} categories[{i}]"
        category_id = _int_field(entry, "id", where)
        if not isinstance(entry.get("name"), str):
            raise UserError(f"{where}: 'name' is {short(entry.get('name'))}, not a string: {FIX}")
        if category_id in categories:
            raise UserError(f"{where}: category id {category_id} appears twice: {FIX}")
        categories[category_id] = entry["name"]
    objects = []
    for i, ann in enumerate(_entries(data, "annotations", path, required=False)):
        where = f"{path}: annotation {short(ann['id']) if 'id' in ann else f'[{i}]'}"
        image_id = _int_field(ann, "image_id", where)
        if image_id not in seen:
            raise UserError(f"{where} names unknown image id {image_id}: fix the annotation file")
        category_id = _int_field(ann, "category_id", where)
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1) or isinstance(iscrowd, bool | float):
            raise UserError(f"{where}: 'iscrowd' is {short(iscrowd)}: use 0 or 1")
        objects.append(CocoObject(ann.get("id"), image_id, category_id, _bbox(ann, where), iscrowd))
    return images, list(categories.items()), objects
