"""The planned sweeps of the long runs: their grids, and their time estimates by hand."""

from __future__ import annotations

import pytest

from adasap.experiments.config import from_flat
from adasap.experiments.presets import SMALL_BASE
from adasap.experiments.sweep_presets import (
    SWEEP_PRESETS,
    SweepPreset,
    estimate_sweep_seconds,
    sweep_settings,
)


def runs(name: str) -> list[tuple[str, dict]]:
    """(method, the run's whole flat config) for every run of a preset, validated."""
    preset = SWEEP_PRESETS[name]
    base = from_flat(preset.base)
    out = []
    for settings in sweep_settings(preset.grid):
        config = from_flat(settings, base).validate()
        out += [(method, config.to_flat()) for method in config.methods]
    return out


def test_every_sweep_preset_validates():
    for name in SWEEP_PRESETS:
        assert runs(name), name


def test_radii_are_tuned_per_criterion_with_both_baselines_at_each():
    planned = runs("radii")
    assert len(planned) == 24
    for criterion in ("magnitude", "taylor"):
        radii = {(c["rho_min"], c["rho_max"]) for m, c in planned
                 if m == "adasap" and c["criterion"] == criterion}  # fmt: skip
        assert len(radii) == 8 and (0.05, 0.05) in radii  # uniform SAM in phases 1-2 included
        assert {m for m, c in planned if c["criterion"] == criterion} == {"sgd", "sam", "adasap"}


def test_finetune_sweeps_asam_radii_beside_sam_for_adasap_and_sam():
    planned = runs("finetune")
    assert len(planned) == 30
    for method in ("adasap", "sam"):
        for criterion in ("magnitude", "taylor"):
            mine = [c for m, c in planned if m == method and c["criterion"] == criterion]
            asam = sorted(c["finetune_rho"] for c in mine if c["finetune_sharpness"] == "asam")
            sam = sorted(c["finetune_rho"] for c in mine if c["finetune_sharpness"] == "sam")
            assert asam == [0.2, 0.5, 1.0, 2.0] and sam == [0.02, 0.05, 0.1]
            assert all(c["rho"] == planned[0][1]["rho"] for c in mine)  # phases 1-2 unchanged


def test_long_sweep_has_three_times_the_fine_tuning_at_the_chosen_phase_3():
    planned = runs("long")
    assert len(planned) == 12
    pairs = {(m, c) for m in ("sgd", "sam", "adasap") for c in ("magnitude", "taylor")}
    for epochs in (SMALL_BASE["finetune_epochs"], 3 * SMALL_BASE["finetune_epochs"]):
        assert {(m, c["criterion"]) for m, c in planned if c["finetune_epochs"] == epochs} == pairs
    assert {c["finetune_sharpness"] for _, c in planned} == {"asam"}


def test_sweeps_run_before_phase_3_was_chosen_keep_their_phase_3():
    for name in ("small", "small-schedule", "radii"):
        assert {c["finetune_sharpness"] for _, c in runs(name)} == {None}, name


def test_sweep_estimate_by_hand():
    preset = SweepPreset(
        name="hand",
        description="",
        base={
            **SMALL_BASE,
            "train_limit": 1000,
            "dense_epochs": 1.0,
            "warmup_epochs": 1.0,
            "prune_epochs": 1.0,
            "finetune_epochs": 2.0,
        },  # fmt: skip
        grid=({"methods": [["sgd", "adasap"]]},),
    )
    rates = dict(sgd_rate=900.0, sam_rate=450.0, eval_rate=1000.0)
    # 900 training and 100 validation images; an epoch is 1 s (sgd) or 2 s (sam) + 0.1 s
    dense = 1.1
    sgd = 4 * 1.1
    adasap = 4 * 2.1
    scoring = 100 * (1 + 5 * 19) / 1000  # clean + (15 cbar + 4 extras) x 5 severities
    expected = dense + sgd + adasap + 2 * scoring
    assert estimate_sweep_seconds(preset, **rates) == pytest.approx(expected)


def reference_runs(planned: list[tuple[str, dict]]) -> list[dict]:
    return [c for m, c in planned if m == "sgd"]


@pytest.mark.parametrize("name", ["distill", "finetune-clean", "neuron-scaled"])
def test_issue_30_sweeps_build_on_the_chosen_defaults_with_their_sgd_reference(name):
    base = from_flat(SWEEP_PRESETS[name].base).to_flat()
    small = from_flat(SWEEP_PRESETS["small"].base).to_flat()
    assert all(base[k] == small[k] for k in ("keep", "seed", "train_limit", "finetune_epochs"))
    assert (base["criterion"], base["finetune_sharpness"], base["finetune_rho"]) == (
        "taylor", "asam", 2.0
    )  # fmt: skip
    planned = runs(name)
    assert {c["criterion"] for _, c in planned} == {"taylor"}
    # plain sgd at the base, the same run in each of these sweeps
    references = [{k: v for k, v in c.items() if k != "methods"} for c in reference_runs(planned)]
    assert {k: v for k, v in base.items() if k != "methods"} in references


def test_distill_sweep_distils_adasap_and_sgd_alike():
    planned = runs("distill")
    assert len(planned) == 10
    for method in ("sgd", "adasap"):
        settings = {(c["distill_weight"], c["distill_temperature"])
                    for m, c in planned if m == method}  # fmt: skip
        default_temperature = from_flat(SWEEP_PRESETS["distill"].base).to_flat()
        assert settings == {(0.0, default_temperature["distill_temperature"]),
                            (0.5, 2.0), (0.5, 4.0), (0.9, 2.0), (0.9, 4.0)}  # fmt: skip


def test_finetune_clean_sweep_goes_down_to_plain_fine_tuning():
    planned = runs("finetune-clean")
    assert len(planned) == 8
    radii = sorted(c["finetune_rho"] for m, c in planned if m == "adasap")
    assert radii == [0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
    assert {m for m, _ in planned} == {"adasap", "adasap-sgd", "sgd"}


def test_neuron_scaled_sweep_crosses_the_normalisation_with_rho_max():
    planned = runs("neuron-scaled")
    assert len(planned) == 7
    crossed = {(c["normalization"], c["rho_max"]) for m, c in planned if m == "adasap"}
    assert crossed == {(n, r) for n in ("global", "neuron-scaled") for r in (0.1, 0.2, 0.5)}
    assert len(reference_runs(planned)) == 1
