"""Malformed or hostile VOC / COCO annotation files: each is one UserError line naming the file
and the fix (the CLI: ``error: ...``, exit 2), never a traceback or a file read from outside."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from adasap import cli
from adasap.data.detection import check_target
from adasap.data.detection_files import load_coco, load_voc
from adasap.errors import UserError
from test_detection_data import voc_xml, write_voc
from test_detection_files_run import TINY, write_coco_split


def coco_data() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 30, "height": 20},
            {"id": 2, "file_name": "b.png", "width": 30, "height": 20},
        ],
        "categories": [{"id": 7, "name": "kite"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [4, 4, 6, 6]},
        ],
    }


def write_coco(root: Path, change: Callable[[dict], object]) -> Path:
    """Two 30x20 images and an instances JSON, changed by ``change`` before it is written."""
    (root / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (30, 20)).save(root / "images" / name)
    data = coco_data()
    change(data)
    path = root / "instances.json"
    path.write_text(json.dumps(data))  # json writes NaN and Infinity, as Python reads them
    return path


def one_line(exc: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and len(message) < 400, message
    for part in parts:
        assert part in message, message
    return message


def ann(data: dict, **fields: object) -> None:
    data["annotations"][0].update(fields)


def drop(entry: dict, key: str) -> None:
    del entry[key]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: drop(d["annotations"][0], "bbox"), "'bbox' is missing"),
        (lambda d: ann(d, bbox="2, 3, 10, 5"), "give [x, y, width, height]"),
        (lambda d: ann(d, bbox=[2, 3, 10]), "four numbers"),
        (lambda d: ann(d, bbox=[2, "3", 10, 5]), "four numbers"),
        (lambda d: ann(d, bbox=[2, 3, True, 5]), "four numbers"),
        (lambda d: d.update(annotations=None), "'annotations' is NoneType None, not a list"),
        (lambda d: d.update(images={"1": d["images"][0]}), "'images' is dict"),
        (lambda d: d.update(images=["a.png"]), "images[0] is 'a.png', not an object"),
        (lambda d: d.update(annotations=[7]), "annotations[0] is 7, not an object"),
        (lambda d: ann(d, category_id=[7]), "'category_id' is [7], not an integer"),
        (lambda d: ann(d, iscrowd="yes"), "'iscrowd' is 'yes': use 0 or 1"),
        (lambda d: ann(d, iscrowd=0.5), "'iscrowd' is 0.5"),
        (lambda d: drop(d["images"][0], "id"), "images[0]: 'id' is missing, not an integer"),
        (lambda d: drop(d["annotations"][0], "image_id"), "annotation 1: 'image_id' is missing"),
        (lambda d: d["images"][0].update(width="wide"), "'width' is 'wide', not a positive"),
        (lambda d: d["images"][0].update(height=-20), "'height' is -20, not a positive"),
        (lambda d: d["images"][0].update(file_name=None), "'file_name' is None"),
        (lambda d: d["images"][1].update(id=1), "image id 1 appears twice"),
        (lambda d: d["categories"].append({"id": 7, "name": "x"}), "category id 7 appears"),
        (lambda d: d["categories"][0].update(name=None), "'name' is None, not a string"),
        (lambda d: drop(d, "categories"), "has no images or no categories"),
        (lambda d: d.update(categories="kite"), "'categories' is str"),
    ],
)
def test_malformed_coco_fields_are_one_line_errors(tmp_path, change, match):
    path = write_coco(tmp_path, change)
    with pytest.raises(UserError) as exc:
        load_coco(tmp_path / "images", path)
    one_line(exc, str(path), match)


def test_coco_messages_quote_only_a_prefix_of_a_bad_value(tmp_path):
    path = write_coco(tmp_path, lambda d: ann(d, bbox="x" * 100_000))
    with pytest.raises(UserError) as exc:
        load_coco(tmp_path / "images", path)
    one_line(exc, "'xxxx", "...")


def test_unreadable_coco_files_are_one_line_errors(tmp_path):
    path = write_coco(tmp_path, lambda d: None)
    path.write_text("[" * 100_000 + "]" * 100_000)  # deep enough to exhaust the recursion
    with pytest.raises(UserError) as exc:
        load_coco(tmp_path / "images", path)
    one_line(exc, "is empty or not JSON")
    with pytest.raises(UserError) as exc:
        load_coco(tmp_path / "images", tmp_path / "images")  # a folder, not a file
    one_line(exc, "cannot read annotation file")


@pytest.mark.parametrize("name", ["/etc/passwd", "../../x.png", "../outside.png", "sub/../../x"])
def test_coco_file_names_must_stay_in_the_image_folder(tmp_path, name):
    Image.new("RGB", (30, 20)).save(tmp_path / "outside.png")
    path = write_coco(tmp_path, lambda d: d["images"][0].update(file_name=name))
    with pytest.raises(UserError) as exc:
        load_coco(tmp_path / "images", path)
    one_line(exc, str(path), "points outside", "give a path inside")


def test_coco_links_are_followed_but_must_stay_in_the_image_folder(tmp_path):
    Image.new("RGB", (30, 20)).save(tmp_path / "outside.png")
    path = write_coco(tmp_path, lambda d: d["images"][0].update(file_name="sub/link.png"))
    (tmp_path / "images" / "sub").mkdir()
    os.symlink(tmp_path / "outside.png", tmp_path / "images" / "sub" / "link.png")
    with pytest.raises(UserError) as exc:
        load_coco(tmp_path / "images", path)
    one_line(exc, "points outside")
    # A link to another image of the folder, and a folder that is itself a link, are fine.
    (tmp_path / "images" / "sub" / "link.png").unlink()
    os.symlink(tmp_path / "images" / "b.png", tmp_path / "images" / "sub" / "link.png")
    os.symlink(tmp_path / "images", tmp_path / "linked")
    assert len(load_coco(tmp_path / "linked", path)) == 2


def test_voc_image_ids_must_stay_in_the_voc_folder(tmp_path):
    folder = write_voc(tmp_path)
    (folder / "ImageSets" / "Main" / "test.txt").write_text("000001\n../../../../x\n")
    with pytest.raises(UserError) as exc:
        load_voc(tmp_path)
    one_line(exc, "test.txt", "points outside")


@pytest.mark.parametrize("width, height", [(10**9, 30), (41, 30), (40, 31), (30, 40)])
def test_voc_size_must_match_the_image(tmp_path, width, height):
    objects = [("dog", [1, 1, 20, 15], 0)]
    write_voc(tmp_path, annotations={"1": voc_xml(objects, width, height)})
    with pytest.raises(UserError) as exc:
        load_voc(tmp_path)
    one_line(exc, "1.xml", f"declared size {width}x{height} differs from the 40x30 of image")


def test_coco_size_must_match_the_image(tmp_path):
    path = write_coco(tmp_path, lambda d: d["images"][1].update(width=10**9))
    with pytest.raises(UserError) as exc:
        load_coco(tmp_path / "images", path)
    one_line(exc, "'b.png'", "differs from the 30x20 of image", "fix the annotation's size")
    (tmp_path / "images" / "b.png").write_text("not an image")
    with pytest.raises(UserError) as exc:
        load_coco(tmp_path / "images", path)
    one_line(exc, "cannot decode", "b.png")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("index", range(4))
def test_non_finite_coco_boxes_are_rejected(tmp_path, value, index):
    path = write_coco(tmp_path, lambda d: d["annotations"][0]["bbox"].__setitem__(index, value))
    with pytest.raises(UserError) as exc:
        load_coco(tmp_path / "images", path)
    one_line(exc, str(path), "NaN or infinite")


@pytest.mark.parametrize("coordinate", ["nan", "inf", "-inf", "1e39"])
def test_non_finite_voc_boxes_are_rejected(tmp_path, coordinate):
    xml = voc_xml([("dog", [1, 1, 20, 15], 0)]).replace(
        "<xmax>20</xmax>", f"<xmax>{coordinate}</xmax>"
    )
    write_voc(tmp_path, annotations={"1": xml})
    with pytest.raises(UserError) as exc:
        load_voc(tmp_path)
    one_line(exc, "1.xml", "NaN or infinite coordinate")


@pytest.mark.parametrize("size", ["inf", "nan", "1e9999"])
def test_non_finite_voc_sizes_are_rejected(tmp_path, size):
    write_voc(tmp_path, annotations={"1": voc_xml([("dog", [1, 1, 20, 15], 0)], size, 30)})
    with pytest.raises(UserError) as exc:
        load_voc(tmp_path)
    one_line(exc, "1.xml", "missing or non-numeric size or box")


def test_check_target_rejects_non_finite_boxes():
    boxes = torch.tensor([[0.0, 0, 5, 5], [1, float("nan"), 4, 4]])
    with pytest.raises(UserError, match=r"x\.json: box \[1\.0, nan, 4\.0, 4\.0\] has a NaN"):
        check_target(boxes, torch.tensor([1, 1]), 10, 10, 3, "x.json")


def test_cli_reports_a_hostile_coco_file_in_one_line(tmp_path, capsys):
    coco = tmp_path / "coco"
    write_coco_split(coco, "fit", 4)
    write_coco_split(coco, "check", 3)
    instances = coco / "annotations" / "instances_fit.json"
    data = json.loads(instances.read_text())
    data["images"][0]["file_name"] = "/etc/passwd"
    instances.write_text(json.dumps(data))
    args = [*TINY, "--dataset", "coco:fit,check", "--data-dir", str(coco), "--out",
            str(tmp_path / "runs")]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {instances} image '/etc/passwd': file name '/etc/passwd'")
    assert not (tmp_path / "runs").exists()


def test_a_file_name_too_long_for_the_file_system_is_one_line(tmp_path):
    # found by test_fuzz.py: the file system refuses the name itself (ENAMETOOLONG)
    from adasap.data.detection_files import inside

    with pytest.raises(UserError, match="is not a usable path") as info:
        inside(tmp_path, "x" * 1000, "instances.json: images[0]")
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
