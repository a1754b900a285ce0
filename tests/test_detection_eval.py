"""Detection metrics and the corrupted-detection protocol (P, mPC, rPC) with stub models."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn

from adasap.data.detection import DetectionSet, DetectionSpec, make_target
from adasap.errors import UserError
from adasap.robustness import corruptions as C
from adasap.robustness.detection import evaluate_detection_corruptions
from adasap.robustness.detection_report import DetectionCorruptionReport
from adasap.tasks.detection import evaluate_detection

SPEC = DetectionSpec("toy", ("a", "b"))


def prediction(boxes, scores, labels) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


class Fixed(nn.Module):
    """Returns the same predictions whatever the images (one dict per image, in turn)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.weight = outputs, nn.Parameter(torch.zeros(1))

    def forward(self, images):
        assert not self.training
        return [self.outputs[i % len(self.outputs)] for i in range(len(images))]


def one_image(target) -> DetectionSet:
    return DetectionSet(torch.zeros(1, 3, 20, 20, dtype=torch.uint8), [target], SPEC)


def test_map_matches_a_hand_computed_case():
    # Two ground-truth boxes of class 1: A = [0, 0, 10, 10], B = [12, 12, 18, 18].
    # p1 (score 0.9) = [0, 0, 10, 7.2] overlaps A with IoU 72/100 = 0.72: a true positive;
    # p2 (score 0.8) lies on no box: a false positive; B is missed.
    # Ranked: p1 -> precision 1, recall 1/2; p2 -> precision 1/2, recall 1/2.
    # COCO's 101-point interpolation: precision 1 at the recall points 0, 0.01, ..., 0.50
    # (51 points), 0 above (recall 1/2 is never exceeded): AP@0.5 = 51/101.
    # At IoU thresholds 0.50..0.70 (5 of 10) p1 matches, at 0.75..0.95 it does not (AP 0):
    # mAP@[.5:.95] = (5 * 51/101 + 5 * 0) / 10.
    data = one_image(make_target([[0, 0, 10, 10], [12, 12, 18, 18]], [1, 1]))
    model = Fixed([prediction([[0, 0, 10, 7.2], [0, 14, 4, 18]], [0.9, 0.8], [1, 1])])
    result = evaluate_detection(model, data)
    assert result["map_50"] == pytest.approx(51 / 101, abs=1e-6)
    assert result["map"] == pytest.approx(5 * 51 / 101 / 10, abs=1e-6)
    assert result["map_75"] == pytest.approx(0.0, abs=1e-6)
    assert model.training  # the mode is restored

    # The false positive ranked first: precision 1/2 at recall 1/2, so AP@0.5 = 0.5 * 51/101.
    model = Fixed([prediction([[0, 0, 10, 7.2], [0, 14, 4, 18]], [0.9, 0.95], [1, 1])])
    assert evaluate_detection(model, data)["map_50"] == pytest.approx(0.5 * 51 / 101, abs=1e-6)


def test_ignored_objects_are_neither_hits_nor_misses():
    # A is an ordinary object, B is ignored (VOC difficult / COCO crowd): finding A alone gives
    # AP 1, and a detection on B costs nothing.
    target = make_target([[0, 0, 10, 10], [12, 12, 18, 18]], [1, 1], iscrowd=[0, 1])
    data = one_image(target)
    alone = Fixed([prediction([[0, 0, 10, 10]], [0.9], [1])])
    both = Fixed([prediction([[0, 0, 10, 10], [12, 12, 18, 18]], [0.9, 0.95], [1, 1])])
    assert evaluate_detection(alone, data)["map_50"] == pytest.approx(1.0)
    assert evaluate_detection(both, data)["map_50"] == pytest.approx(1.0)
    plain = one_image(make_target([[0, 0, 10, 10], [12, 12, 18, 18]], [1, 1]))
    assert evaluate_detection(alone, plain)["map_50"] == pytest.approx(51 / 101, abs=1e-6)


def test_batches_are_accepted_and_bad_batches_rejected():
    target = make_target([[0, 0, 10, 10]], [2])
    batches = [([torch.zeros(3, 20, 20)], [target])]
    model = Fixed([prediction([[0, 0, 10, 10]], [0.5], [2])])
    assert evaluate_detection(model, batches)["map"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="a detection batch must be"):
        evaluate_detection(model, [(torch.zeros(1, 3, 20, 20), torch.zeros(1))])
    with pytest.raises(UserError, match="cannot evaluate int"):
        evaluate_detection(model, 3)


# Four images of two sizes (render groups), one class-1 object each.
BOXES = [[2, 2, 12, 12], [20, 4, 30, 14], [5, 10, 15, 20], [1, 1, 9, 9]]


def four_images() -> DetectionSet:
    gen = torch.Generator().manual_seed(0)
    sizes = [(40, 48), (48, 40), (40, 48), (48, 40)]
    images = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]
    return DetectionSet(images, [make_target([b], [1]) for b in BOXES], SPEC)


class Counting(nn.Module):
    """Finds the first ``found[p]`` objects (by position in the pass) on pass ``p`` (one batch
    per pass) and records the images it sees."""

    def __init__(self, found):
        super().__init__()
        self.found, self.passes, self.weight = found, [], nn.Parameter(torch.zeros(1))

    def forward(self, images):
        k = self.found[len(self.passes)]
        self.passes.append([x.clone() for x in images])
        return [
            prediction([BOXES[i]], [0.9], [1]) if i < k else prediction([], [], [])
            for i in range(len(images))
        ]


def ap(found: int) -> float:
    """AP@0.5 of finding ``found`` of 4 objects with no false positives: precision 1 up to
    recall found/4, i.e. at 25 * found + 1 of the 101 recall points (none when found = 0)."""
    return (25 * found + 1) / 101 if found else 0.0


def test_corruption_protocol_gives_p_mpc_and_rpc(tmp_path):
    data = four_images()
    # Passes: clean, fog s1, fog s2, snow s1, snow s2, then the extra speckle_noise s1, s2.
    found = [2, 4, 2, 1, 0, 3, 1]
    model = Counting(found)
    report = evaluate_detection_corruptions(
        model,
        data,
        dataset_key="toy",
        corruptions=["fog", "snow", "speckle_noise"],
        severities=[1, 2],
        batch_size=4,
        cache_dir=tmp_path,
        progress=False,
    )
    assert report.performance == pytest.approx(ap(2), abs=1e-6)
    mpc = (ap(4) + ap(2) + ap(1) + ap(0)) / 4
    assert report.mpc == pytest.approx(mpc, abs=1e-6)
    assert report.rpc == pytest.approx(mpc / ap(2), abs=1e-6)
    assert report.extra_mpc == pytest.approx((ap(3) + ap(1)) / 2, abs=1e-6)
    assert report.per_corruption["fog"] == pytest.approx((ap(4) + ap(2)) / 2, abs=1e-6)
    assert report.values("map")["fog"][1] == pytest.approx(1.0)  # unchanged boxes: all hit
    assert not report.is_complete and report.params_table == "cifar"

    clean = model.passes[0]
    assert [tuple(x.shape) for x in clean] == [tuple(data[i][0].shape) for i in range(4)]
    for corrupted in model.passes[1:]:
        assert [x.shape for x in corrupted] == [x.shape for x in clean]
        assert all((x - y).abs().mean() > 0.01 for x, y in zip(corrupted, clean, strict=True))
    assert [t["boxes"].tolist() for t in data.targets] == [[b] for b in BOXES]

    # The same renders are read back from the cache: a second model sees identical images.
    again = Counting(found)
    evaluate_detection_corruptions(
        again,
        data,
        dataset_key="toy",
        corruptions=["fog", "snow", "speckle_noise"],
        severities=[1, 2],
        batch_size=4,
        cache_dir=tmp_path,
        progress=False,
    )
    for ours, theirs in zip(model.passes, again.passes, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(ours, theirs, strict=True))


def test_report_round_trip_and_files(tmp_path):
    cell = {"map_50": 0.5, "map": 0.25, "map_75": 0.2}
    report = DetectionCorruptionReport(
        dataset_key="toy",
        source="test",
        metric="map",
        clean={"map_50": 0.8, "map": 0.5, "map_75": 0.4},
        results={
            "fog": {1: cell, 3: {**cell, "map": 0.15}},
            "spatter": {1: cell},
            C.CBAR_CORRUPTIONS[0]: {2: {**cell, "map": 0.1}},
        },
        num_images=4,
        params_table="cifar",
        seed=0,
    )
    assert report.mpc == pytest.approx(0.2) and report.rpc == pytest.approx(0.4)
    assert report.extra_mpc == pytest.approx(0.25) and report.cbar_mpc == pytest.approx(0.1)
    paths = report.save(tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["mPC"] == pytest.approx(0.2) and saved["rPC"] == pytest.approx(0.4)
    assert DetectionCorruptionReport.from_dict(saved) == report
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = paths["markdown"].read_text()
    assert "| rPC: mPC / P | 0.400 |" in markdown and "| spatter (extra) | weather |" in markdown
    console = Console(file=io.StringIO(), width=120)
    report.print_table(console)
    printed = console.file.getvalue()
    assert "rPC: mPC / P" in printed and "0.400" in printed and "mAP@[.5:.95] (%) on toy" in printed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"metric": "ap"}, "unknown metric 'ap'"),
        ({"corruptions": ["smog"]}, "smog"),
        ({"severities": [6]}, "severity"),
        ({"batch_size": 0}, "batch size 0 is invalid"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, match):
    model = Fixed([prediction([], [], [])])
    with pytest.raises(UserError, match=match):
        evaluate_detection_corruptions(model, four_images(), dataset_key="toy", **kwargs)


def test_render_parts_keep_the_order(tmp_path, monkeypatch):
    """A deterministic corruption gives the same images whether each size is rendered in one
    part or image by image (each part its own cache entry)."""
    from adasap.robustness import detection

    def seen(cache_dir):
        model = Counting([4, 4])
        evaluate_detection_corruptions(
            model,
            four_images(),
            dataset_key="toy",
            corruptions=["contrast"],
            severities=[3],
            batch_size=4,
            cache_dir=cache_dir,
            progress=False,
        )
        return model.passes[1]

    whole = seen(tmp_path / "whole")
    monkeypatch.setattr(detection, "_RENDER_GROUP", 1)
    single = seen(tmp_path / "single")
    assert len(list((tmp_path / "single").glob("toy-*"))) == 4
    assert all(torch.equal(x, y) for x, y in zip(whole, single, strict=True))


class RecordingBar:
    """Stands in for the cell progress bar: records what it shows and how far it gets."""

    def __init__(self, console, disable):
        self.shown, self.total, self.done = [], None, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description, total):
        self.shown.append(description)
        self.total = total

    def update(self, task, description):
        self.shown.append(description)

    def advance(self, task):
        self.done += 1


def test_classification_and_detection_run_through_one_cell_loop(tmp_path, monkeypatch):
    """Both evaluations are CorruptionEvaluator's loop: the same cells in the same order, the
    same progress, renders through the same render_cached call, read back from its cache."""
    from adasap.robustness import evaluate_corruptions, evaluation

    rendered, bars, corrupt_calls = [], [], []
    real_render, real_corrupt = evaluation.render_cached, C.corrupt

    def render(images, key, name, severity, *args, **kwargs):
        rendered.append((key, name, severity))
        return real_render(images, key, name, severity, *args, **kwargs)

    monkeypatch.setattr(evaluation, "render_cached", render)
    monkeypatch.setattr(
        evaluation, "cell_progress", lambda *a, **k: bars.append(RecordingBar(*a, **k)) or bars[-1]
    )
    monkeypatch.setattr(
        C.render_cache, "corrupt", lambda *a, **k: corrupt_calls.append(1) or real_corrupt(*a, **k)
    )
    cells = dict(corruptions=["fog", "contrast"], severities=[2, 1], cache_dir=tmp_path)
    detection = four_images()  # two sizes: two render parts a cell
    classification = (torch.stack([detection.uint8_image(i) for i in (0, 2)]), torch.tensor([0, 1]))
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * 40 * 48, 2))
    detector = Fixed([prediction([], [], [])])

    def both():
        rendered.clear()
        evaluate_corruptions(classifier, *classification, dataset_key="cls", **cells)
        evaluate_detection_corruptions(detector, detection, dataset_key="det", **cells)
        return list(rendered)

    order = [("fog", 2), ("fog", 1), ("contrast", 2), ("contrast", 1)]
    first = both()
    assert first == [("cls", n, s) for n, s in order] + [
        (f"det-{size}-0", n, s) for n, s in order for size in ("40x48", "48x40")
    ]
    rendering = len(corrupt_calls)
    assert rendering > 0 and both() == first and len(corrupt_calls) == rendering  # cached
    assert len(bars) == 4  # one bar an evaluation, each over the clean images and the 4 cells
    for bar in bars:
        assert bar.shown == ["clean", *(f"{n} s{s}" for n, s in order)]
        assert bar.total == bar.done == 5
