import json
from dataclasses import replace

import pytest
from rich.console import Console

import adasap.experiments.bench as bench
import adasap.experiments.run as experiment
import adasap.experiments.sweep as sweep
from adasap.errors import UserError
from adasap.experiments.bench import run_bench
from adasap.experiments.bench_report import report_markdown, write_report
from adasap.experiments.bench_stats import (
    differences,
    family_differences,
    paired_interval,
    resolved,
    summarize,
)
from adasap.experiments.config import SCHEMA, from_flat
from adasap.experiments.presets import PRESETS, VAL_FRACTION, estimate_seconds
from adasap.experiments.results import (
    RESULTS_FILE,
    BenchRow,
    ResultRow,
    append_jsonl,
    prepare_out,
    read_bench_rows,
    read_jsonl,
)
from adasap.experiments.sweep import run_sweep, sweep_report
from adasap.experiments.sweep_presets import SWEEP_PRESETS
from adasap.method.importance import criteria
from adasap.method.pruner import METHODS, PrunerSettings
from adasap.robustness.corruptions import BENCHMARK_CORRUPTIONS, CBAR_CORRUPTIONS, EXTRA_CORRUPTIONS
from adasap.training.checkpoint import RunInterrupted

TINY = dict(
    train_limit=300,
    corruption_limit=20,
    dense_epochs=1.0,
    batch_size=32,
    progress=False,
)


def tiny_smoke():
    """The smoke preset, reduced further: a few seconds end to end."""
    smoke = PRESETS["smoke"].with_base(**TINY)
    return replace(smoke, sharpness_batches=1, hessian_iterations=2, latency_repeats=3)


def quiet():
    return Console(quiet=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("ADASAP_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def smoke_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run_bench(tiny_smoke(), out, console=quiet())
    return out


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", ["smoke", "small", "medium"])
def test_presets_validate(name):
    preset = PRESETS[name]
    for cell in preset.cells():
        config = preset.config(cell)
        assert config.methods == (cell.method,) and config.prune.keep == cell.keep


def test_preset_shapes():
    for preset in PRESETS.values():
        assert set(preset.base) <= set(SCHEMA)
        for method, criterion in preset.pairs:
            assert method in METHODS and criterion in criteria()
    small = PRESETS["small"]
    assert small.keeps == (0.8, 0.5, 0.3) and len(small.seeds) == 2
    assert len(small.cells()) == 5 * 3 * 2
    assert estimate_seconds(small) <= 3 * 3600
    assert estimate_seconds(PRESETS["smoke"]) <= 90
    assert set(SWEEP_PRESETS["small"].base) <= set(SCHEMA)


def test_medium_preset_has_the_power_the_issue_asks_for():
    medium = PRESETS["medium"]
    config = medium.config(medium.cells()[0])
    assert round(config.train_limit * (1 - VAL_FRACTION)) >= 27000
    assert config.corruption_limit >= 2000 and config.test_limit is None  # all 10000 test images
    assert config.corruptions == "all"
    assert set(medium.keeps) == {0.5, 0.3, 0.2} and len(medium.seeds) >= 4
    every_pair = {(m, c) for m in ("sgd", "sam", "adasap") for c in ("magnitude", "taylor")}
    assert set(medium.pairs) == every_pair
    assert len(medium.cells()) == 6 * 3 * len(medium.seeds)
    assert 10 * 3600 < estimate_seconds(medium) < 20 * 3600  # the planning figure in the docs


def test_focused_preset_is_the_medium_setting_at_the_goals_cells():
    focused, medium = PRESETS["focused"], PRESETS["medium"]
    assert {k: v for k, v in focused.base.items() if k != "finetune_rho"} == medium.base
    assert focused.base["finetune_rho"] == 0.2 and "finetune_rho" not in medium.base
    assert set(focused.pairs) == {(m, "taylor") for m in ("sgd", "sam", "adasap")}
    assert focused.keeps == (0.5, 0.3) and focused.seeds == medium.seeds
    assert focused.config(focused.cells()[-1]).prune.pruner.finetune_rho == 0.2


def test_small_preset_uses_the_tuned_radii():
    pruner = PRESETS["small"].config(PRESETS["small"].cells()[0]).prune.pruner
    tuned = PrunerSettings()
    assert (pruner.rho, pruner.rho_min, pruner.rho_max) == (
        tuned.rho,
        tuned.rho_min,
        tuned.rho_max,
    )


def test_identity_records_every_resolved_setting():
    resolved = PRESETS["small"].identity()["resolved"]
    assert set(resolved) == set(SCHEMA) - {"progress"}
    assert resolved["rho_max"] == PrunerSettings().rho_max


def test_a_reworded_description_continues_the_folder_a_changed_setting_does_not(tmp_path):
    preset = PRESETS["smoke"]
    out = prepare_out(tmp_path / "out", preset.identity(), "preset")
    reworded = replace(preset, description="Ran in a minute.")
    assert prepare_out(out, reworded.identity(), "preset") == out
    with pytest.raises(UserError, match="holds results of another preset"):
        prepare_out(out, preset.with_base(lr=0.5).identity(), "preset")


def test_a_work_budget_is_no_part_of_a_folders_results(tmp_path):
    # a folder saved before the budget settings existed, and one that raises a budget, continue
    preset = PRESETS["smoke"]
    saved = preset.identity()
    for settings in ("base", "resolved"):
        for key in ("trace_seconds", "trace_memory_gib"):
            saved[settings].pop(key, None)
    out = prepare_out(tmp_path / "out", saved, "preset")
    assert prepare_out(out, preset.identity(), "preset") == out
    raised = preset.with_base(trace_seconds=600.0, trace_memory_gib=None).identity()
    assert prepare_out(out, raised, "preset") == out


def test_bad_presets_fail_before_any_work(tmp_path):
    with pytest.raises(UserError, match="smoke, small, medium, focused, paper"):
        run_bench("huge", tmp_path / "out", console=quiet())
    # without ImageNet on disk the paper preset stops at validation
    with pytest.raises(UserError, match="data/imagenet"):
        run_bench("paper", tmp_path / "out", console=quiet())
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- end to end


def test_results_structure(smoke_run):
    rows = read_jsonl(smoke_run / RESULTS_FILE)
    assert [r["cell"] for r in rows] == [
        "dense-seed0",
        "sgd-magnitude-keep0.5-seed0",
        "adasap-magnitude-keep0.5-seed0",
    ]
    dense = rows[0]
    for row in rows:
        for key in ("clean_accuracy", "corruption_accuracy", "extra_accuracy"):
            assert 0 <= row[key] <= 1, key
        assert set(row["per_corruption"]) == {"gaussian_noise", "gaussian_blur"}
        for key in ("loss_increase", "hessian_eigenvalue", "latency_ms", "macs", "seconds"):
            assert row[key] is not None, key
        assert row["dense_loss_increase"] == dense["loss_increase"]
    assert dense["latency_ratio"] is None
    for row in rows[1:]:
        assert row["latency_ratio_low"] <= row["latency_ratio"] <= row["latency_ratio_high"]
        assert row["latency_noisy"]  # 3 repeats: too few rounds to trust the ratio
        assert row["params"] < dense["params"] and row["macs"] < dense["macs"]
        assert abs(row["keep_achieved"] - 0.5) <= 0.02
        assert abs(row["params"] / dense["params"] - row["keep_achieved"]) < 1e-9
        assert (smoke_run / "runs" / row["cell"] / row["method"] / "model.json").is_file()


def test_report_files(smoke_run):
    report = smoke_run / "report"
    for name in ("corruption_vs_size.png", "clean_vs_corrupted.png", "per_corruption.png"):
        assert (report / name).read_bytes().startswith(b"\x89PNG")
    text = (report / "report.md").read_text()
    for column in (
        "clean acc (%)",
        "corruption acc (%)",
        "extra corruption acc (%)",
        "relative robustness",
        "params",
        "MACs",
        "CPU latency b1 (ms)",
        "latency / dense",
        "loss increase before",
        "loss increase after",
        "top eigenvalue before",
        "top eigenvalue after",
        "train time (min)",
        "corruption acc delta (pts)",
        "clean acc delta (pts)",
    ):
        assert f"| {column} |" in text, column
    assert "| adasap | magnitude | 0.5 | 1 |" in text


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_resume_skips_finished_cells(smoke_run, monkeypatch):
    prunes = count_calls(monkeypatch, experiment, "prune")
    dense = count_calls(monkeypatch, bench, "dense_model")
    before = (smoke_run / RESULTS_FILE).read_text()
    # progress bars do not change results, so they may differ from the first run
    run_bench(tiny_smoke().with_base(progress=True), smoke_run, console=quiet())
    assert prunes == [] and dense == []
    assert (smoke_run / RESULTS_FILE).read_text() == before

    # a line lost in a crash: the cell's own row.json (or else its saved model) gives it back
    measured = count_calls(monkeypatch, bench, "top_hessian_eigenvalue")
    lines = before.splitlines(keepends=True)
    (smoke_run / RESULTS_FILE).write_text("".join(lines[:-1]) + lines[-1][:20])
    run_bench(tiny_smoke(), smoke_run, console=quiet())
    assert prunes == [] and measured == []
    (smoke_run / RESULTS_FILE).write_text("".join(lines[:-1]))
    (smoke_run / "runs" / "adasap-magnitude-keep0.5-seed0" / "row.json").unlink()
    run_bench(tiny_smoke(), smoke_run, console=quiet())
    assert prunes == [] and len(measured) == 1
    rows = read_jsonl(smoke_run / RESULTS_FILE)
    assert [r["cell"] for r in rows][-1] == "adasap-magnitude-keep0.5-seed0"
    assert len(rows) == 3


def test_other_preset_in_same_dir_refused(smoke_run):
    with pytest.raises(UserError, match="another preset"):
        run_bench(tiny_smoke().with_base(lr=0.01), smoke_run, console=quiet())


def test_failed_cell_is_reported_and_bench_continues(cache, tmp_path, monkeypatch):
    original = bench.pruned_row

    def failing(method, *args, **kwargs):
        if method == "sgd":
            raise UserError("training diverged in phase warmup")
        return original(method, *args, **kwargs)

    monkeypatch.setattr(bench, "pruned_row", failing)
    run_bench(tiny_smoke(), tmp_path, console=quiet())
    cells = [r["cell"] for r in read_jsonl(tmp_path / RESULTS_FILE)]
    assert cells == ["dense-seed0", "adasap-magnitude-keep0.5-seed0"]
    failures = read_jsonl(tmp_path / "failures.jsonl")
    assert [f["run"] for f in failures] == ["sgd-magnitude-keep0.5-seed0"]
    assert (
        "sgd-magnitude-keep0.5-seed0: training diverged"
        in (tmp_path / "report" / "report.md").read_text()
    )

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(bench, "pruned_row", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_bench(tiny_smoke(), tmp_path, console=quiet())

    def interrupted(*args, **kwargs):
        raise RunInterrupted(None)

    monkeypatch.setattr(bench, "pruned_row", interrupted)
    with pytest.raises(RunInterrupted) as info:
        run_bench(tiny_smoke(), tmp_path, console=quiet())
    assert info.value.run_dir == tmp_path


# --------------------------------------------------------------------------- report


def row(method, criterion, keep, seed, clean, corrupted):
    return BenchRow(
        cell=f"{method}-{criterion}-keep{keep}-seed{seed}",
        method=method,
        criterion=criterion,
        keep=keep,
        seed=seed,
        clean_accuracy=clean,
        corruption_accuracy=corrupted,
        extra_accuracy=corrupted - 0.1,
        relative_robustness=corrupted / clean,
        keep_achieved=keep,
        params=1e6 * keep,
        macs=4e7 * keep,
        latency_ms=2.0 * keep,
        loss_increase=0.2,
        dense_loss_increase=0.1,
        hessian_eigenvalue=30.0,
        dense_hessian_eigenvalue=10.0,
        seconds=600.0,
        per_corruption={"gaussian_noise": corrupted, "speckle_noise": corrupted - 0.1},
    )


HAND_MADE = [
    row("dense", None, 1.0, 0, 0.90, 0.60),
    row("dense", None, 1.0, 1, 0.92, 0.62),
    row("sgd", "magnitude", 0.5, 0, 0.85, 0.50),
    row("sgd", "magnitude", 0.5, 1, 0.87, 0.52),
    row("adasap", "magnitude", 0.5, 0, 0.86, 0.55),
    row("adasap", "magnitude", 0.5, 1, 0.86, 0.59),
]


def test_mean_std_over_seeds():
    summary = {(e["method"], e["criterion"], e["keep"]): e for e in summarize(HAND_MADE)}
    assert list(summary)[0] == ("dense", None, 1.0)
    sgd = summary[("sgd", "magnitude", 0.5)]
    assert sgd["seeds"] == 2
    assert sgd["clean_accuracy"] == pytest.approx((0.86, 0.0141421356))
    adasap = summary[("adasap", "magnitude", 0.5)]
    assert adasap["corruption_accuracy"] == pytest.approx((0.57, 0.0282842712))
    assert adasap["clean_accuracy"] == pytest.approx((0.86, 0.0))
    (delta,) = differences(HAND_MADE)
    assert delta["method"] == "adasap" and delta["seeds"] == 2
    # per seed: +0.05 and +0.07 corrupted, +0.01 and -0.01 clean
    assert delta["corruption_accuracy"] == pytest.approx((0.06, 0.0141421356))
    assert delta["clean_accuracy"] == pytest.approx((0.0, 0.0141421356))
    # two seeds: mean ± t(1; 0.975) = 12.7062047 x 0.0141421356 / sqrt(2) = ± 0.127062
    assert delta["corruption_accuracy_interval"] == pytest.approx((0.06 - 0.127062, 0.187062))
    assert delta["clean_accuracy_interval"] == pytest.approx((-0.127062, 0.127062))


@pytest.mark.parametrize(
    "deltas, interval",
    [
        # mean 2, sd 1, t(2; 0.975) = 4.30265273: 2 ± 4.30265273 / sqrt(3) = 2 ± 2.48413
        ([1.0, 2.0, 3.0], (2 - 2.4841377, 2 + 2.4841377)),
        # mean 2, sd sqrt(0.08 / 3) = 0.1632993, t(3; 0.975) = 3.18244631: 2 ± 0.2598457
        ([2.0, 2.2, 1.8, 2.0], (2 - 0.2598457, 2 + 0.2598457)),
        ([0.5, 0.5], (0.5, 0.5)),  # no spread: the interval is the mean
        ([0.7], None),  # one seed: no interval
    ],
)
def test_paired_t_interval_by_hand(deltas, interval):
    found = paired_interval(deltas)
    assert found == (None if interval is None else pytest.approx(interval, abs=1e-6))
    assert resolved(found) == (interval is not None and (interval[0] > 0 or interval[1] < 0))


def test_report_marks_the_resolved_differences():
    rows = HAND_MADE + [
        row("sgd", "magnitude", 0.5, 2, 0.86, 0.51),
        row("adasap", "magnitude", 0.5, 2, 0.87, 0.57),
    ]
    (delta,) = differences(rows)
    # corrupted +0.05, +0.07, +0.06: 0.06 ± 4.30265 x 0.01 / sqrt(3) = [0.0352, 0.0848]
    assert delta["corruption_accuracy_interval"] == pytest.approx((0.0351586, 0.0848414))
    # clean +0.01, -0.01, +0.01: 0.0033 ± 4.30265 x 0.011547 / sqrt(3) = [-0.0254, 0.0320]
    section = report_markdown(rows).split("## Differences vs sgd")[1].split("\n## ")[0]
    line = [x for x in section.splitlines() if x.startswith("| adasap |")][-1]
    assert line.endswith(
        "| 6.00 ± 1.00 | [3.52, 8.48] | **yes** | 0.33 ± 1.15 | [-2.54, 3.20] | no |"
    )


def test_adasap_is_also_compared_with_sam_seed_by_seed():
    rows = HAND_MADE + [
        row("sam", "magnitude", 0.5, 0, 0.84, 0.56),
        row("sam", "magnitude", 0.5, 1, 0.88, 0.56),
    ]
    (delta,) = differences(rows, "sam", methods=("adasap",))
    assert (delta["method"], delta["seeds"]) == ("adasap", 2)
    # per seed: corrupted -0.01 and +0.03, clean +0.02 and -0.02
    assert delta["corruption_accuracy"] == pytest.approx((0.01, 0.0282842712))
    assert delta["clean_accuracy"] == pytest.approx((0.0, 0.0282842712))
    assert sorted(d["method"] for d in differences(rows)) == ["adasap", "sam"]
    text = report_markdown(rows)
    section = text.split("## adasap vs sam")[1].split("\n## ")[0]
    assert "| adasap | magnitude | 0.5 | 2 | 1.00 ± 2.83 |" in section
    assert "| sam |" not in section
    assert "## adasap vs sam" not in report_markdown(HAND_MADE)


def test_family_differences_show_where_a_difference_lies():
    def measured(r, noise, snow, spatter):
        per = {
            "gaussian_noise": noise,
            "shot_noise": noise + 0.02,
            "snow": snow,
            "spatter": spatter,
        }
        return replace(r, per_corruption=per)

    sgd = [measured(row("sgd", "taylor", 0.5, s, 0.9, 0.6), 0.50, 0.40, 0.80) for s in range(3)]
    adasap = [
        measured(row("adasap", "taylor", 0.5, seed, 0.9, 0.6), *values)
        for seed, values in enumerate(
            [(0.60, 0.39, 0.82), (0.58, 0.37, 0.80), (0.59, 0.41, 0.81), (0.9, 0.9, 0.9)]
        )
    ]  # seed 3 has no sgd run to pair with
    (entry,) = family_differences(sgd + adasap)
    assert (entry["method"], entry["seeds"]) == ("adasap", 3)
    families = entry["families"]
    assert list(families) == ["noise", "weather", "extra"]  # no blur or digital measured
    # noise: the family mean moves +0.10, +0.08, +0.09; sd 0.01, t(2) 4.30265: ± 0.0248414
    assert families["noise"]["delta"] == pytest.approx((0.09, 0.01))
    assert families["noise"]["interval"] == pytest.approx((0.0651586, 0.1148414))
    # weather (snow): -0.01, -0.03, +0.01; extra (spatter): +0.02, 0, +0.01
    assert families["weather"]["delta"] == pytest.approx((-0.01, 0.02))
    assert families["extra"]["delta"] == pytest.approx((0.01, 0.01))
    section = report_markdown(sgd + adasap).split("by family")[1]
    assert "| method | criterion | keep | seeds | noise | weather | extra |" in section
    assert (
        "| adasap | taylor | 0.5 | 3 | **9.00 [6.52, 11.48]** | -1.00 [-5.97, 3.97] | "
        "1.00 [-1.48, 3.48] |" in section
    )


def test_report_from_hand_made_results(tmp_path):
    for record in HAND_MADE:
        append_jsonl(tmp_path / RESULTS_FILE, record.to_dict())
    assert read_bench_rows(tmp_path) == HAND_MADE
    text = (write_report(tmp_path) / "report.md").read_text()
    assert "| sgd | magnitude | 0.5 | 2 | 0.500 ± 0.000 | 86.00 ± 1.41 | 51.00 ± 1.41 |" in text
    assert (
        "| adasap | magnitude | 0.5 | 2 | 6.00 ± 1.41 | [-6.71, 18.71] | no | 0.00 ± 1.41 | "
        "[-12.71, 12.71] | no |" in text
    )
    assert "| dense | - | 1 | 2 | 1.000M ± 0.000M |" in text
    assert (tmp_path / "report" / "per_corruption.png").is_file()


def test_report_reads_results_of_earlier_versions(tmp_path):
    """Lines written before the rows were dataclasses: fewer keys, and keys no longer used."""
    old = {k: v for k, v in HAND_MADE[2].to_dict().items() if v is not None}
    assert "latency_p10_ms" not in old
    for record in (old, {**old, "seed": 1, "cell": "sgd-magnitude-keep0.5-seed1", "gone": 1}):
        append_jsonl(tmp_path / RESULTS_FILE, record)
    rows = read_bench_rows(tmp_path)
    assert [r.seed for r in rows] == [0, 1] and rows[0].latency_p10_ms is None
    text = (write_report(tmp_path) / "report.md").read_text()
    assert "| sgd | magnitude | 0.5 | 2 | 0.500 ± 0.000 | 85.00 ± 0.00 | 50.00 ± 0.00 |" in text


def test_result_row_json_round_trip():
    row = ResultRow(method="sgd", clean_accuracy=0.9, params=1000, latency={"ms": 1.5})
    data = row.to_dict()
    assert data["method"] == "sgd" and data["corruption_accuracy"] is None
    assert ResultRow.from_dict({**data, "history": [{"epoch": 1}]}) == row


def test_report_needs_results(tmp_path):
    with pytest.raises(UserError, match="run the benchmark first"):
        write_report(tmp_path)


def test_jsonl_survives_a_cut_line(tmp_path):
    path = tmp_path / "x.jsonl"
    append_jsonl(path, {"a": 1})
    with open(path, "a") as handle:
        handle.write('{"a": ')
    assert read_jsonl(path) == [{"a": 1}]
    append_jsonl(path, {"a": 2})
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


# --------------------------------------------------------------------------- sweep


class Forbidden:
    """Stands in for the test set: any use fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the sweep used the test set ({name})")

    def __len__(self):
        raise AssertionError("the sweep used the test set (len)")


def test_sweep_scores_on_validation_cbar_and_extras_only(cache, tmp_path, monkeypatch):
    original_load = sweep.load_data
    monkeypatch.setattr(
        sweep, "load_data", lambda config: replace(original_load(config), test=Forbidden())
    )
    scored = []
    original_eval = sweep.evaluate_corruptions

    def recording(model, test_data, **kwargs):
        scored.append((tuple(kwargs["corruptions"]), len(test_data)))
        return original_eval(model, test_data, severities=(1, 5), **kwargs)

    monkeypatch.setattr(sweep, "evaluate_corruptions", recording)
    base = {**tiny_smoke().base, "corruption_limit": None, "seed": 0}
    grid = {"methods": [["adasap"]], "rho_max": [0.1, 0.5]}
    run_sweep(base, grid, tmp_path, console=quiet())

    val_images = round(TINY["train_limit"] * 0.1)
    tuning = CBAR_CORRUPTIONS + EXTRA_CORRUPTIONS
    assert len(CBAR_CORRUPTIONS) == 15 and not set(tuning) & set(BENCHMARK_CORRUPTIONS)
    assert scored == [(tuning, val_images)] * 2
    rows = read_jsonl(tmp_path / "sweep.jsonl")
    assert sorted(r["settings"]["rho_max"] for r in rows) == [0.1, 0.5]
    for r in rows:
        assert set(r["per_corruption"]) == set(tuning)
        assert 0 <= r["val_accuracy"] <= 1
        cbar = [r["per_corruption"][n] for n in CBAR_CORRUPTIONS]
        extra = [r["per_corruption"][n] for n in EXTRA_CORRUPTIONS]
        assert r["val_cbar_accuracy"] == pytest.approx(sum(cbar) / 15)
        assert r["val_extra_accuracy"] == pytest.approx(sum(extra) / 4)
    table = (tmp_path / "sweep.md").read_text()
    ranked = [line for line in table.splitlines() if line.startswith("| 1 ")]
    best = max(rows, key=lambda r: r["val_cbar_accuracy"] + r["val_extra_accuracy"])
    assert ranked and f"| {best['settings']['rho_max']} |" in ranked[0]
    score = (best["val_cbar_accuracy"] + best["val_extra_accuracy"]) / 2
    assert f"| {100 * score:.2f} | {100 * best['val_cbar_accuracy']:.2f} |" in ranked[0]
    assert "never used" in table and "caustic_refraction" in table

    prunes = count_calls(monkeypatch, sweep, "prune")
    run_sweep(base, grid, tmp_path, console=quiet())
    assert prunes == []
    assert sweep_report(tmp_path).name == "sweep.md"


def test_sweep_adopts_rows_that_missed_sweep_jsonl_and_retries_failures(tmp_path, monkeypatch):
    """A run whose row.json exists but whose line never reached sweep.jsonl (the sweep stopped
    in between) is taken from there, not run again; a failed run is logged to failures.jsonl,
    and the next sweep tries it again."""
    ran, failing = [], {"adasap-rho_max=0.2"}

    def cell(run, out, console=None):  # no training: a finished run's row
        ran.append(run.id)
        if run.id in failing:
            raise UserError("training diverged")
        scores = dict(val_accuracy=0.9, val_extra_accuracy=0.5, val_images=1, per_corruption={},
                      params=1, keep_achieved=0.5, seconds=1.0)  # fmt: skip
        row = sweep.SweepRow(run=run.id, method=run.method, settings=run.settings, **scores)
        return sweep.SWEEP_FILES.save(out, row)

    monkeypatch.setattr(sweep, "sweep_cell", cell)
    grid = {"methods": [["adasap"]], "rho_max": [0.1, 0.2, 0.5]}
    ids = ["adasap-rho_max=0.1", "adasap-rho_max=0.2", "adasap-rho_max=0.5"]
    run_sweep(tiny_smoke().base, grid, tmp_path, console=quiet())
    assert ran == ids
    lines = (tmp_path / sweep.SWEEP_FILE).read_text().splitlines(keepends=True)
    assert [json.loads(line)["run"] for line in lines] == [ids[0], ids[2]]
    assert [f["run"] for f in read_jsonl(tmp_path / "failures.jsonl")] == [ids[1]]
    assert f"- {ids[1]}: training diverged" in (tmp_path / "sweep.md").read_text()

    (tmp_path / sweep.SWEEP_FILE).write_text(lines[0])  # the last line lost in a crash
    ran.clear()
    failing.clear()
    run_sweep(tiny_smoke().base, grid, tmp_path, console=quiet())
    assert ran == [ids[1]]
    rows = read_jsonl(tmp_path / sweep.SWEEP_FILE)
    assert [r["run"] for r in rows] == [ids[0], ids[2], ids[1]]  # adopted before the new run
    assert rows[1] == json.loads(lines[1])
    assert "Failed runs" not in (tmp_path / "sweep.md").read_text()


def test_sweep_report_ranks_by_the_mean_of_cbar_and_extras(tmp_path):
    common = {"method": "adasap", "val_accuracy": 0.9, "val_images": 10, "per_corruption": {},
              "params": 1, "keep_achieved": 0.5, "seconds": 60.0}  # fmt: skip
    # b has the best extras but the worst mean; a row from before cbar ranks by its extras.
    records = [
        {"run": "a", "settings": {"rho": "a"}, "val_extra_accuracy": 0.6,
         "val_cbar_accuracy": 0.8, **common},
        {"run": "b", "settings": {"rho": "b"}, "val_extra_accuracy": 0.9,
         "val_cbar_accuracy": 0.3, **common},
        {"run": "old", "settings": {"rho": "old"}, "val_extra_accuracy": 0.65, **common},
    ]  # fmt: skip
    for record in records:
        append_jsonl(tmp_path / sweep.SWEEP_FILE, record)
    table = sweep_report(tmp_path).read_text()
    order = [
        line.split(" | ")[2] for line in table.splitlines() if line[:3] in ("| 1", "| 2", "| 3")
    ]
    assert order == ["a", "old", "b"]
    assert "| old | 65.00 | - | 65.00 |" in table


def test_sweep_preset_grid():
    preset = SWEEP_PRESETS["small"]
    runs = sweep.sweep_settings(preset.grid)
    assert len(runs) == 4 * 2 + 3
    for settings in runs:
        config = from_flat(settings, from_flat(preset.base))
        assert config.methods in (("adasap",), ("sam",))


def test_schedule_sweep_varies_one_choice_at_a_time():
    preset = SWEEP_PRESETS["small-schedule"]
    base = from_flat(preset.base).to_flat()
    runs = sweep.sweep_settings(preset.grid)
    assert len(runs) == 9
    changed = []
    for settings in runs:
        flat = from_flat(settings, from_flat(preset.base)).to_flat()
        changed.append(sorted(k for k in flat if flat[k] != base[k] and k != "methods"))
    assert changed[0] == [] and all(changed[1:])
    assert ["finetune_epochs", "prune_epochs", "warmup_epochs"] in changed


@pytest.mark.slow
def test_full_smoke_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    out = run_bench(PRESETS["smoke"], tmp_path / "bench", console=quiet())
    rows = read_jsonl(out / RESULTS_FILE)
    assert len(rows) == 3
    assert (out / "report" / "report.md").is_file()
    assert json.loads((out / "bench.json").read_text())["preset"]["name"] == "smoke"
