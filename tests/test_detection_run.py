"""``adasap run --task detection``, eval and export on its directory, the detection API."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import adasap
from adasap import cli
from adasap.data.detection import DetectionSet, make_target
from adasap.deploy.comparison import run_latency
from adasap.deploy.serialization import detection_architecture, load_model, save_model
from adasap.errors import UserError
from adasap.experiments import run as run_driver
from adasap.experiments import speed
from adasap.experiments.config import from_flat
from adasap.models.detection import build_detector
from adasap.robustness.detection_report import DetectionCorruptionReport
from test_data import write_fashion
from test_detection import synthetic_batch

TINY_RUN = [
    "run", "--task", "detection", "--train-limit", "8", "--test-limit", "4",
    "--corruption-limit", "2", "--corruptions", "quick", "--image-size", "48",
    "--dense-epochs", "1", "--batch-size", "4", "--warmup-epochs", "0.5",
    "--prune-epochs", "0.5", "--finetune-epochs", "0.5", "--prune-steps", "1",
    "--name", "det", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    """One tiny detection run (its stdout and directory), shared by the tests that read it."""
    root = tmp_path_factory.mktemp("detection-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADASAP_CACHE", str(root / "cache"))
        fashion = write_fashion(root / "fashion", 60, 30)
        # a few latency rounds: the test checks the columns, not the timing
        patch.setattr(speed, "LATENCY_ROUNDS", 3)
        patch.setattr(speed, "LATENCY_WARMUP", 1)
        patch.setattr(speed, "THROUGHPUT_ROUNDS", 3)
        import io
        from contextlib import redirect_stdout

        out = io.StringIO()
        with redirect_stdout(out):
            code = cli.main([*TINY_RUN, "--out", str(root / "runs"), "--data-dir", str(fashion)])
        yield code, out.getvalue(), root / "runs" / "det", root


def test_detection_run_writes_its_table_and_files(detection_run):
    code, out, run_dir, _ = detection_run
    assert code == 0
    for column in ("P (mAP@0.5)", "mPC", "rPC", "wall time", "Reduced setting", "time b64"):
        assert column in out
    assert "Speed in torch, pruned/dense (detection models time in PyTorch)" in out
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["task"] == "detection" and config["model"] == "tiny_ssd"
    results = json.loads((run_dir / "results.json").read_text())
    rows = {row["method"]: row for row in results["rows"]}
    assert list(rows) == ["dense", "sgd", "adasap"]
    for method in ("sgd", "adasap"):
        kept = rows[method]["params"] / rows["dense"]["params"]
        assert 0.45 <= kept <= 0.55  # keep 0.5 of the parameters, within 5 points
        assert rows[method]["runtime"] == "torch" and rows[method]["time_b1"]["ratio"] > 0
        assert (run_dir / method / "model.json").is_file()
        report = json.loads((run_dir / method / "detection-corruptions.json").read_text())
        assert report["num_images"] == 2 and set(report["results"]) == {
            "gaussian_noise",
            "gaussian_blur",
        }
        assert rows[method]["clean_accuracy"] == report["P"]
    table = (run_dir / "results.md").read_text()
    assert "| method | params | MACs | P (mAP@0.5) | mPC | rPC | wall time |" in table
    assert "| method | MACs | time b1 | time b64 | efficiency |" in table


def test_eval_recomputes_the_runs_numbers(detection_run, capsys, monkeypatch):
    _, _, run_dir, root = detection_run
    monkeypatch.setenv("ADASAP_CACHE", str(root / "cache"))
    expected = {r["method"]: r for r in json.loads((run_dir / "results.json").read_text())["rows"]}
    assert cli.main(["eval", str(run_dir), "--no-progress"]) == 0
    assert "(mAP@0.5)" in capsys.readouterr().out
    for method in ("sgd", "adasap"):  # the saved model and the same canvases: the same mAP
        report = json.loads((run_dir / method / "detection-corruptions.json").read_text())
        assert report["P"] == pytest.approx(expected[method]["clean_accuracy"], abs=1e-9)


def test_export_writes_a_checked_onnx_detector(detection_run, tmp_path, capsys):
    _, _, run_dir, _ = detection_run
    target = tmp_path / "sgd.onnx"
    code = cli.main(["export", str(run_dir), "--method", "sgd", "--onnx", str(target)])
    assert code == 0, capsys.readouterr().err
    assert target.stat().st_size > 0 and "passed" in capsys.readouterr().out


def test_latency_times_the_runs_detectors_beside_its_trained_dense_one(
    detection_run, capsys, monkeypatch, tmp_path
):
    _, _, run_dir, root = detection_run
    monkeypatch.setenv("ADASAP_CACHE", str(root / "cache"))
    args = ["latency", str(run_dir), "--batch-sizes", "1", "--repeats", "2"]
    assert cli.main(args) == 0, capsys.readouterr().err
    rows = json.loads((run_dir / "latency.json").read_text())["rows"]
    assert [(r["model"], r["runtime"], r["batch_size"]) for r in rows] == [
        ("adasap", "torch", 1),
        ("sgd", "torch", 1),
    ]
    # the run's own dense detector: the cache is not needed, and adasap.load reads it
    assert isinstance(adasap.load(run_dir / "dense"), torch.nn.Module)
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "empty"))
    assert cli.main(args) == 0, capsys.readouterr().err
    older = tmp_path / "older-run"  # written before runs kept their dense model
    shutil.copytree(run_dir, older, ignore=shutil.ignore_patterns("dense"))
    with pytest.raises(UserError, match="holds detection models.*no dense model.*--resume"):
        run_latency(older, batch_sizes=(1,), repeats=2)  # fresh weights would not be fair


TIMINGS = ("seconds", "time_b1", "time_b64", "efficiency_b1", "efficiency_b64")


def test_resume_finishes_an_interrupted_run_with_the_same_rows(detection_run, monkeypatch, capsys):
    _, _, run_dir, root = detection_run
    monkeypatch.setenv("ADASAP_CACHE", str(root / "cache"))
    monkeypatch.setattr(speed, "LATENCY_ROUNDS", 3)
    monkeypatch.setattr(speed, "LATENCY_WARMUP", 1)
    monkeypatch.setattr(speed, "THROUGHPUT_ROUNDS", 3)
    prune, pruned = run_driver.prune, []

    def prune_until_adasap(model, data, *, settings, **kwargs):
        pruned.append(settings.method)
        if settings.method == "adasap" and len(pruned) == 2:  # stops in its second method
            raise KeyboardInterrupt
        return prune(model, data, settings=settings, **kwargs)

    monkeypatch.setattr(run_driver, "prune", prune_until_adasap)
    args = [*TINY_RUN, "--out", str(root / "runs"), "--data-dir", str(root / "fashion")]
    args[args.index("det")] = "det-resumed"
    resumed = root / "runs" / "det-resumed"
    assert cli.main(args) == 130
    assert f"continue with: adasap run --resume {resumed}" in capsys.readouterr().err
    assert (resumed / "sgd" / "summary.json").is_file() and not (resumed / "results.json").exists()
    assert cli.main(["run", "--resume", str(resumed), "--no-progress"]) == 0
    assert "finished earlier" in capsys.readouterr().out
    assert pruned == ["sgd", "adasap", "adasap"]  # sgd was not pruned again

    def rows(directory):
        rows = json.loads((directory / "results.json").read_text())["rows"]
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]

    assert rows(resumed) == rows(run_dir)  # as the uninterrupted run, but for the timings


def test_resume_of_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {tmp_path / 'nothing'} holds no config.json")
        and err.count("\n") == 1
    )


def pruned_tiny_detector():
    model = build_detector("tiny_ssd", num_classes=3, image_size=64)
    batch = synthetic_batch(2, 64)
    result = adasap.prune(model, [batch], task="detection", warmup_epochs=1, prune_epochs=2,
                          finetune_epochs=1, prune_steps=2, keep=0.5, progress=False)  # fmt: skip
    return model, result.model, result


def test_prune_takes_the_detection_task_and_the_saved_model_round_trips(tmp_path):
    dense, pruned, result = pruned_tiny_detector()
    assert isinstance(result, adasap.PruneResult) and result.pruning_history
    assert sum(p.numel() for p in dense.parameters()) == result.dense_size.params  # a copy
    save_model(tmp_path, pruned, detection_architecture("tiny_ssd", 3, 64), result.pruning_history)
    loaded = load_model(tmp_path)
    images = synthetic_batch(2, 64, seed=1)[0]
    with torch.no_grad():
        want, got = pruned.eval()(images), loaded(images)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_an_unknown_task_is_a_one_line_error():
    model = build_detector("tiny_ssd", num_classes=3, image_size=64)
    with pytest.raises(UserError, match="unknown task 'segmentation': choose one of") as info:
        adasap.prune(model, [synthetic_batch(2, 64)], task="segmentation", keep=0.5)
    assert "classification, detection" in str(info.value) and "\n" not in str(info.value)


def test_a_detection_set_is_evaluated_by_evaluate_detection_corruptions(tmp_path):
    from adasap.robustness import evaluate_detection_corruptions

    model = build_detector("tiny_ssd", num_classes=3, image_size=64).eval()
    images, targets = synthetic_batch(2, 64)
    uint8 = [(x * 255).round().to(torch.uint8) for x in images]
    data = DetectionSet(uint8, [make_target(t["boxes"], t["labels"]) for t in targets],
                        adasap_spec())  # fmt: skip
    kwargs = dict(dataset_key="two", corruptions=["gaussian_noise"], severities=[1])
    report = evaluate_detection_corruptions(
        model, data, **kwargs, cache_dir=tmp_path, progress=False
    )
    assert isinstance(report, DetectionCorruptionReport)
    assert set(report.results) == {"gaussian_noise"} and report.num_images == 2
    # evaluate_corruptions scores classifiers: a detection set is refused with the fix
    with pytest.raises(UserError, match=r"^evaluate_corruptions scores classifiers: .*"
                       r"evaluate_detection_corruptions\(model, data"):  # fmt: skip
        adasap.evaluate_corruptions(model, data, **kwargs, cache_dir=tmp_path)


def adasap_spec():
    from adasap.data.detection import DetectionSpec

    return DetectionSpec("two-squares", ("small", "large"), 64)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"task": "detection", "model": "resnet20"}, "resnet20 is not a detector"),
        ({"model": "tiny_ssd"}, "tiny_ssd is a detector: pass --task detection"),
        (
            {"task": "segmentation"},
            "unknown task .segmentation.: choose one of classification, detection",
        ),
        ({"task": "detection", "dataset": "fashion-mnist"}, "runs on canvas, voc"),
        ({"task": "detection", "dataset": "voc:07"}, "VOC years as four digits"),
        ({"task": "detection", "dataset": "coco:train2017"}, "name the COCO training and test"),
        ({"task": "detection", "dataset": "voc", "test_limit": 0}, "number of voc images"),
        ({"task": "detection", "keep_kind": "latency"}, "latency is not supported"),
        ({"task": "detection", "train_limit": None}, "number of canvases"),
        ({"image_size": 64}, "image_size is a detection setting"),
        ({"dataset": "voc"}, "voc is a detection data set: pass --task detection"),
    ],
)
def test_bad_combinations_are_one_line_errors(values, match):
    with pytest.raises(UserError, match=match) as info:
        from_flat(values).validate()
    assert "\n" not in str(info.value)


def test_cli_refuses_bad_detection_commands(capsys, monkeypatch):
    assert cli.main(["run", "--task", "detection", "--model", "resnet20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model resnet20 is not a detector") and err.count("\n") == 1


def test_detection_defaults_are_the_documented_job():
    config = from_flat({"task": "detection"}).validate()
    assert (config.model, config.dataset, config.methods) == (
        "tiny_ssd",
        "canvas",
        ("sgd", "adasap"),
    )
    assert config.prune.keep == 0.5
    assert from_flat({}).model == "resnet20"  # the classification defaults are untouched


@pytest.mark.slow
def test_default_detection_job_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    code = cli.main(["run", "--task", "detection", "--out", str(tmp_path), "--name", "d",
                     "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out  # the console's table may shorten its headers
    assert code == 0 and "mPC" in out and "total time" in out
    assert "| P (mAP@0.5) | mPC | rPC |" in (tmp_path / "d" / "results.md").read_text()
    rows = json.loads((tmp_path / "d" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "sgd", "adasap"]
    assert rows[0]["clean_accuracy"] > 0.1  # the dense detector has learnt something


def test_bench_smoke_reports_means_and_deltas_vs_sgd(tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    from adasap.experiments import detection_bench

    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    fashion = write_fashion(tmp_path / "fashion", 60, 30)
    smoke = detection_bench.DETECTION_PRESETS["smoke"]
    patched = replace(smoke, base={**smoke.base, "data_dir": str(fashion)})
    monkeypatch.setitem(detection_bench.DETECTION_PRESETS, "smoke", patched)
    out = tmp_path / "bench"
    args = ["bench", "--task", "detection", "--preset", "smoke", "--out", str(out)]
    assert cli.main(args) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["cell"] for r in rows) == [
        "adasap-keep0.5-seed0", "adasap-keep0.5-seed1", "sgd-keep0.5-seed0", "sgd-keep0.5-seed1",
    ]  # fmt: skip
    report = (out / "report.md").read_text()
    assert "adasap bench --task detection --preset smoke" in report
    differences = report.split("## Differences vs sgd")[1].splitlines()
    adasap_line = next(line for line in differences if line.startswith("| adasap |"))
    by = {(r["method"], r["seed"]): r for r in rows}
    deltas = [by["adasap", s]["clean_accuracy"] - by["sgd", s]["clean_accuracy"] for s in (0, 1)]
    mean = 100 * sum(deltas) / 2
    assert adasap_line.split(" | ")[4].startswith(f"{mean:.2f} ± ")  # P - sgd: the paired mean
    # a second call finds every cell done and only rewrites the report
    monkeypatch.setattr(detection_bench, "pruned_row", None)
    assert cli.main(args) == 0


def test_bench_refuses_a_classification_preset_for_detection(capsys):
    assert cli.main(["bench", "--task", "detection", "--preset", "paper"]) == 2
    assert "no detection bench preset 'paper'" in capsys.readouterr().err
