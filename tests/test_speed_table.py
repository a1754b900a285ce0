"""The run's tables tell the truth about speed: MACs ratio, time ratios at batch 1 and 64 with
their intervals and the noisy rule, efficiency, in the deployment runtime; none of their
headers is cut in an 80-column terminal.

Every timing here is injected (a fake comparison): nothing asserts on a real measurement.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console
from torch import nn

from adasap.deploy.latency import LatencyComparison
from adasap.experiments import speed
from adasap.experiments.config import from_flat
from adasap.experiments.reporting import (
    ACCURACY_SCORES,
    DETECTION_SCORES,
    comparison_speed_tables,
    result_sections,
    results_markdown,
    results_tables,
)
from adasap.experiments.results import SPEED_BATCHES, ResultRow
from adasap.experiments.run import with_resolved_round_to

# per pruned model: (ratio, low, high, noisy) at batch 1 and at batch 64
RATIOS = {
    "sgd": {1: (1.3, 0.6, 2.2, True), 64: (0.55, 0.54, 0.56, False)},
    "adasap": {1: (0.8, 0.78, 0.83, False), 64: (0.5, 0.3, 0.9, True)},
}


def fake_comparison(runtime: str = "ort") -> LatencyComparison:
    rows = []
    for name, by_batch in RATIOS.items():
        for batch, (ratio, low, high, noisy) in by_batch.items():
            dense_ms = 2.0 * batch
            rows.append({
                "model": name, "runtime": runtime, "batch_size": batch, "dense_ms": dense_ms,
                "pruned_ms": dense_ms * ratio, "ratio": ratio, "ratio_low": low,
                "ratio_high": high, "rounds": 100, "noisy": noisy,
            })  # fmt: skip
    return LatencyComparison(rows, {})


def plain_rows() -> list[ResultRow]:
    return [
        ResultRow(method="dense", params=272_474, macs=40_000_000, clean_accuracy=0.8883,
                  corruption_accuracy=0.6119, extra_accuracy=0.8644, seconds=84.0),
        ResultRow(method="sgd", params=136_000, macs=20_000_000, clean_accuracy=0.8936,
                  corruption_accuracy=0.6349, extra_accuracy=0.8572, seconds=96.0),
        ResultRow(method="adasap", params=136_000, macs=16_000_000, clean_accuracy=0.8765,
                  corruption_accuracy=0.66, extra_accuracy=0.8624, seconds=174.0),
    ]  # fmt: skip


def timed() -> list[ResultRow]:
    return speed.with_speed(plain_rows(), fake_comparison().rows)


def test_timed_rows_time_every_model_in_the_runs_runtime_at_batch_1_and_64(monkeypatch):
    calls = []

    def fake_compare(dense, pruned, input_shape, **kwargs):
        calls.append({**kwargs, "models": list(pruned)})
        rows = fake_comparison(kwargs["runtimes"][0]).rows
        return LatencyComparison([r for r in rows if r["batch_size"] in kwargs["batch_sizes"]], {})

    monkeypatch.setattr(speed, "compare_latency", fake_compare)
    monkeypatch.setattr(speed, "load_model", lambda path: nn.Identity())
    rows = speed.timed_rows(plain_rows(), nn.Identity(), Path("run"), (1, 6, 6), runtime="torch")
    # all models together at each batch size: many rounds at batch 1, fewer at 64
    assert SPEED_BATCHES == (1, 64)
    assert [(c["batch_sizes"], c["repeats"]) for c in calls] == [
        ((1,), speed.LATENCY_ROUNDS), ((64,), speed.THROUGHPUT_ROUNDS)
    ]  # fmt: skip
    assert all(c["models"] == ["sgd", "adasap"] and c["runtimes"] == ("torch",) for c in calls)
    dense, sgd, adasap = rows
    assert {row.runtime for row in rows} == {"torch"}
    assert dense.macs_ratio == 1.0 and dense.time_b1 == {"ms": 2.0} and dense.efficiency_b1 is None
    assert sgd.macs_ratio == pytest.approx(0.5) and adasap.macs_ratio == pytest.approx(0.4)
    assert sgd.time_b1["ratio"] == 1.3 and sgd.time_b1["noisy"] is True
    assert sgd.time_b64 == {
        "ms": pytest.approx(128 * 0.55), "ratio": 0.55, "ratio_low": 0.54, "ratio_high": 0.56,
        "rounds": 100, "noisy": False,
    }  # fmt: skip
    # efficiency = MACs ratio / time ratio: the share of what the MACs promise
    assert sgd.efficiency_b64 == pytest.approx(0.5 / 0.55)
    assert adasap.efficiency_b1 == pytest.approx(0.4 / 0.8)


def test_results_json_keys_of_a_row():
    keys = timed()[1].to_dict()
    for key in ("runtime", "macs_ratio", "time_b1", "time_b64", "efficiency_b1",
                "efficiency_b64", "round_to", "file_bytes"):  # fmt: skip
        assert key in keys
    assert set(keys["time_b1"]) == {"ms", "ratio", "ratio_low", "ratio_high", "rounds", "noisy"}
    # the old single latency column is gone from run rows (the benchmark keeps its own)
    assert not {"latency_ms", "latency_ratio", "latency_noisy"} & set(keys)
    # rows written before the speed columns read back without them
    assert ResultRow.from_dict({"method": "sgd", "latency_ms": 1.2}).times == {}


def test_markdown_holds_the_accuracy_and_speed_tables():
    text = results_markdown(timed(), "Reduced setting: a test.", speed_title="Speed in ort")
    lines = text.splitlines()
    assert lines[0] == "Reduced setting: a test."
    accuracy = lines.index("| method | params | MACs | clean | corrupted | extra | wall time |")
    assert (
        lines[accuracy + 2] == "| dense | 0.272M | 40.000M | 88.83% | 61.19% | 86.44% | 1.4 min |"
    )
    assert lines.index("**Speed in ort**") > accuracy
    speed_lines = [line for line in lines if line.startswith("| ") and "x" in line]
    assert "| method | MACs | time b1 | time b64 | efficiency |" in lines
    assert "| dense | 1.00x | 2.00 ms | 128.00 ms | - |" in lines
    # a noisy ratio prints its interval alone, and no efficiency is claimed from it
    assert "| sgd | 0.50x | noisy (0.60-2.20x) | 0.55x (0.54-0.56) | 0.91 |" in speed_lines
    assert "| adasap | 0.40x | 0.80x (0.78-0.83) | noisy (0.30-0.90x) | - |" in speed_lines
    assert "too busy to tell" in text and "efficiency: MACs ratio / time ratio" in text


def test_rows_not_timed_give_the_accuracy_table_alone():
    (section,) = result_sections(plain_rows())
    assert section.header == ["method", "params", "MACs", "clean", "corrupted", "extra",
                              "wall time"]  # fmt: skip
    assert "corrupted: its mean over the benchmark corruptions" in section.note
    (clean_only,) = result_sections([ResultRow(method="sgd", clean_accuracy=0.5)])
    assert clean_only.header == ["method", "clean"] and "corrupted" not in clean_only.note


def int8_rows() -> list[ResultRow]:
    return [
        replace(row, runtime="ort-int8", file_bytes=size, time_b1=None, time_b64=None)
        for row, size in zip(timed(), (1_090_000, 285_000, 285_000), strict=True)
    ]


@pytest.mark.parametrize("scores", [ACCURACY_SCORES, DETECTION_SCORES], ids=["cls", "det"])
def test_no_header_is_cut_in_an_80_column_terminal(scores):
    rows = timed()
    int8 = [replace(r, time_b1=r.time_b1 or {"ms": 1.0}) for r in int8_rows()]
    int8 = speed.with_speed(int8, fake_comparison().rows)  # int8 lines of the speed table
    if scores is DETECTION_SCORES:
        rows = [replace(r, relative_robustness=0.66) for r in rows]
        int8 = [replace(r, relative_robustness=0.65) for r in int8]
    tables = results_tables(
        rows, title="adasap results", scores=scores, int8=int8,
        speed_title="Speed in ort, pruned/dense",
    )  # fmt: skip
    assert [t.title for t in tables] == [
        "adasap results", "Speed in ort, pruned/dense", "INT8 (ONNX Runtime, static quantization)"
    ]  # fmt: skip
    console = Console(record=True, width=80)
    for table in tables:
        console.print(table)
    text = console.export_text()
    assert "…" not in text
    width = max(len(line) for line in text.splitlines())
    assert width <= 80
    for table in tables:  # every header whole, on one line between its borders
        for column in table.columns:
            assert re.search(rf"┃ *{re.escape(str(column.header))} *┃", text), column.header
    assert "adasap int8" in text and "noisy (0.60-2.20x)" in text


def test_latency_command_speed_tables_one_per_runtime():
    comparison = fake_comparison("ort")
    rows = comparison.rows + fake_comparison("torch").rows
    tables = comparison_speed_tables(rows, {"sgd": 0.5, "adasap": 0.4}, (1, 64))
    assert [t.title for t in tables] == [
        "Speed in ort, pruned/dense",
        "Speed in torch, pruned/dense",
    ]
    assert tables[0].caption is None and "efficiency" in tables[1].caption  # one note, last
    console = Console(record=True, width=80)
    console.print(tables[0])
    text = console.export_text()
    assert "0.55x (0.54-0.56)" in text and "0.91" in text and "…" not in text


def test_the_resolved_round_to_replaces_auto_in_the_saved_config():
    config = from_flat({"round_to": "auto"})
    rows = [ResultRow(method="dense"), ResultRow(method="sgd", round_to=16),
            ResultRow(method="adasap", round_to=16)]  # fmt: skip
    resolved = with_resolved_round_to(config, rows)
    assert resolved.to_flat()["round_to"] == 16 and config.to_flat()["round_to"] == "auto"
    assert with_resolved_round_to(from_flat({"round_to": 8}), rows).to_flat()["round_to"] == 8


def test_detectors_are_timed_in_torch_and_the_title_says_so():
    config = from_flat({"task": "detection", "runtime": "ort"})
    assert speed.speed_runtime(config) == "torch"
    assert "(detection models time in PyTorch)" in speed.speed_title(config)
    classifier = from_flat({"runtime": "openvino"})
    assert speed.speed_runtime(classifier) == "openvino"
    assert speed.speed_title(classifier) == "Speed in openvino, pruned/dense"
