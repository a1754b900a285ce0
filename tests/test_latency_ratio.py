"""The pruned/dense latency ratio: interleaving, its interval, the noisy flag and the tables.

Every timing here is injected (a fake clock or fake per-round times): nothing asserts on a
real measurement, so these tests hold on a busy machine.
"""

import math

import pytest
from rich.console import Console
from torch import nn

from adasap.deploy import timing
from adasap.deploy.latency import LatencyRatio, compare_latency
from adasap.deploy.ratio import median_ranks
from adasap.experiments.bench_report import report_markdown
from adasap.experiments.bench_stats import summarize
from adasap.experiments.results import BenchRow


def binomial_below(n: int, k: int) -> float:
    """P(Binomial(n, 1/2) < k), in floats: an independent check of the exact integer sum."""
    return sum(math.comb(n, i) for i in range(k)) / 2**n


@pytest.mark.parametrize("n", [6, 7, 20, 50, 100, 333, 1000])
def test_median_ranks_are_the_widest_95_percent_binomial_bounds(n):
    k, top = median_ranks(n)
    assert top == n + 1 - k
    assert 2 * binomial_below(n, k) <= 0.05 < 2 * binomial_below(n, k + 1)


def test_median_ranks_known_values_and_too_few_rounds():
    assert median_ranks(20) == (6, 15)
    assert median_ranks(50) == (18, 33)
    assert median_ranks(100) == (40, 61)
    assert median_ranks(6) == (1, 6)  # 2 / 2**6 = 3.1% <= 5%
    assert median_ranks(5) is None  # even min..max covers the median only 94% of the time
    assert median_ranks(1) is None


def test_ratio_is_the_median_per_round_ratio_with_order_statistic_bounds():
    # 20 rounds: the machine's load changes the dense time tenfold between rounds, but each
    # pruned pass ran right after its dense one, so every per-round ratio is near 0.8.
    dense = [1.0 + 9.0 * (i % 2) for i in range(20)]
    offsets = [0.01 * (i - 10) for i in range(20)]  # ratios 0.70 .. 0.89, one each
    pruned = [d * (0.8 + o) for d, o in zip(dense, offsets, strict=True)]
    ratio = LatencyRatio.from_times(dense, pruned)
    assert ratio.rounds == 20
    assert ratio.ratio == pytest.approx(0.795)  # median of 0.70 .. 0.89
    # ranks 6 and 15 of the sorted ratios: 0.75 and 0.84
    assert (ratio.low, ratio.high) == (pytest.approx(0.75), pytest.approx(0.84))
    assert not ratio.noisy  # 0.09 wide, under NOISY_WIDTH of 0.795


def test_steady_ratio_is_trusted_and_printed():
    ratio = LatencyRatio.from_times([2.0] * 30, [1.7] * 29 + [9.0])  # one disturbed pass
    assert ratio.ratio == pytest.approx(0.85) and not ratio.noisy
    assert str(ratio) == "0.85x (0.85-0.85)"
    assert ratio.to_dict() == {
        "ratio": pytest.approx(0.85),
        "ratio_low": pytest.approx(0.85),
        "ratio_high": pytest.approx(0.85),
        "rounds": 30,
        "noisy": False,
    }


def test_wide_interval_is_noisy_and_hides_the_ratio():
    # Half the rounds disturbed on the dense side, half on the pruned side: no way to tell.
    dense = [2.0, 6.0] * 15
    pruned = [6.0, 2.0] * 15
    ratio = LatencyRatio.from_times(dense, pruned)
    assert ratio.noisy
    assert str(ratio) == f"noisy ({ratio.low:.2f}-{ratio.high:.2f}x)"
    assert ratio.to_dict()["noisy"] is True


def test_noisy_rule_boundary_and_too_few_rounds():
    # n = 6: the interval is min..max; width 0.125 of the ratio passes, 0.25 does not
    narrow = LatencyRatio.from_times([1.0] * 6, [0.9375, 1, 1, 1, 1, 1.0625])
    wide = LatencyRatio.from_times([1.0] * 6, [0.875, 1, 1, 1, 1, 1.125])
    assert not narrow.noisy and wide.noisy
    # five identical rounds are still too few for a 95% interval
    assert LatencyRatio.from_times([1.0] * 5, [0.5] * 5).noisy


@pytest.mark.parametrize(
    ("dense", "pruned"), [([1.0], [1.0, 2.0]), ([], []), ([0.0, 1.0], [1.0, 1.0])]
)
def test_ratio_needs_paired_positive_times(dense, pruned):
    with pytest.raises(ValueError):
        LatencyRatio.from_times(dense, pruned)


class FakeClock:
    """Seconds that move only when a fake run says it took time."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_interleaving_alternates_a_b_a_b_and_times_each_call():
    clock, calls = FakeClock(), []

    def run(name: str, seconds: float):
        def call() -> None:
            calls.append(name)
            clock.now += seconds

        return call

    times = timing.time_interleaved([run("A", 0.002), run("B", 0.001)], 2, 4, clock=clock)
    assert calls == ["A", "B"] * 6  # 2 warm-up rounds, then 4 timed ones, always in turn
    assert times[0] == pytest.approx([2.0] * 4) and times[1] == pytest.approx([1.0] * 4)


# Per-round times the fake timer hands out: the dense model, then two pruned ones.
FAKE_ROUNDS = [
    [2.0, 8.0, 2.0, 8.0, 2.0, 8.0, 2.0, 8.0],  # dense: load comes and goes between rounds
    [1.6, 6.4, 1.6, 6.4, 1.6, 6.4, 1.6, 6.4],  # steady 0.8x of the dense pass next to it
    [6.0, 2.0, 6.0, 2.0, 6.0, 2.0, 6.0, 2.0],  # the load hit dense and pruned unevenly
]


@pytest.fixture
def fake_timer(monkeypatch):
    calls = []

    def fake(runs, warmup, repeats, clock=None):
        calls.append(len(runs))
        return [list(t) for t in FAKE_ROUNDS[: len(runs)]]

    monkeypatch.setattr(timing, "time_interleaved", fake)
    return calls


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def test_compare_latency_times_all_models_in_one_session(fake_timer):
    comparison = compare_latency(
        tiny(), {"steady": tiny(), "uneven": tiny()}, (1, 6, 6), batch_sizes=(1,),
        runtimes=("torch",),
    )  # fmt: skip
    assert fake_timer == [3]  # dense and both pruned models take turns in the same rounds
    steady, uneven = comparison.rows
    assert steady["dense_ms"] == pytest.approx(5.0) and steady["pruned_ms"] == pytest.approx(4.0)
    assert steady["ratio"] == pytest.approx(0.8) and not steady["noisy"]
    assert steady["speedup"] == pytest.approx(1.25) and steady["rounds"] == 8
    assert uneven["noisy"] and uneven["ratio_low"] < 0.5 < 2 < uneven["ratio_high"]
    console = Console(record=True, width=200)
    console.print(comparison.table())
    text = console.export_text()
    assert "0.80x (0.80-0.80)" in text and "noisy (0.25-3.00x)" in text


def test_a_runtime_that_cannot_take_turns_times_one_model_after_the_other(fake_timer):
    # onnxruntime's threads spin on after a run: interleaved, its sessions would slow each other
    rows = compare_latency(tiny(), tiny(), (1, 6, 6), batch_sizes=(1, 2), runtimes=("ort",)).rows
    assert fake_timer == [1, 1, 1, 1]  # per batch size: the dense model, then the pruned one
    assert [(r["runtime"], r["batch_size"]) for r in rows] == [("ort", 1), ("ort", 2)]


def bench_row(seed: int, ratio: float, noisy: bool) -> BenchRow:
    return BenchRow(
        method="sgd",
        cell=f"sgd-seed{seed}",
        criterion="taylor",
        keep=0.5,
        seed=seed,
        latency_ms=1.0,
        latency_ratio=ratio,
        latency_noisy=noisy,
    )


def test_bench_report_leaves_noisy_ratios_out_and_counts_them():
    rows = [bench_row(0, 0.8, False), bench_row(1, 0.9, False), bench_row(2, 3.0, True)]
    (entry,) = summarize(rows)
    assert entry["latency_ratio"] == pytest.approx((0.85, 0.0707106781))
    assert entry["noisy_latency"] == 1
    assert "0.850 ± 0.071 (1 noisy)" in report_markdown(rows)
    (all_noisy,) = summarize([bench_row(0, 3.0, True)])
    assert all_noisy["latency_ratio"] == (None, None) and all_noisy["noisy_latency"] == 1
