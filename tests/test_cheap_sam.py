"""Cheaper sharpness-aware steps: RST, LookSAM, sub-batch ascent; and the compiled loop."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import adasap
from adasap.cli import build_parser, config_from_args
from adasap.data import training_source
from adasap.errors import UserError
from adasap.experiments.config import from_flat
from adasap.method.base_optimizer import parameter_groups
from adasap.method.cheap_sam import (
    DIRECTION,
    StepPlan,
    add_direction,
    store_direction,
    sub_batch,
)
from adasap.method.optim import SAM, AdaSAP, NeuronOwnership
from adasap.method.pruner import Pruner, PrunerSettings
from adasap.method.schedule import PhaseSchedule
from adasap.method.step import frozen_bn_statistics
from adasap.method.step import sharpness_aware_step as step_with
from adasap.tasks import ClassificationTask
from adasap.training.loop import EpochLoop
from adasap.training.progress import ProgressLog
from adasap.training.settings import PruneSettings, with_overrides
from test_pruner import DATA, Net, make, params

NEUTRAL = [
    dict(sam_probability=1.0, sam_probability_end=1.0),
    dict(sam_every=1, looksam_alpha=0.3),
    dict(ascent_fraction=1.0),
]
CHEAP = {
    "rst": dict(sam_probability=0.5),
    "rst-scheduled": dict(sam_probability=1.0, sam_probability_end=0.2),
    "looksam": dict(sam_every=3),
    "sub-batch": dict(ascent_fraction=0.5),
    "all": dict(sam_probability=0.7, sam_every=2, ascent_fraction=0.5),
}


class Counted:
    """A closure on one batch that counts its calls (with their fraction) and backward passes."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model, x, y
        self.rows: list[int] = []
        self.backwards = 0

    def __call__(self, fraction: float = 1.0) -> torch.Tensor:
        x, y = sub_batch(fraction, self.x, self.y)
        self.rows.append(len(x))
        loss = F.cross_entropy(self.model(x), y)
        loss.register_hook(self._count)
        return loss

    def _count(self, grad: torch.Tensor) -> None:
        self.backwards += 1


def run(pruner: Pruner, steps: range) -> list[Counted]:
    closures = []
    for i in steps:
        closure = Counted(pruner.model, *DATA[i % len(DATA)])
        pruner.step(closure)
        closures.append(closure)
    return closures


def assert_same_weights(model: nn.Module, other: nn.Module) -> None:
    for (name, a), (_, b) in zip(
        model.state_dict().items(), other.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def reference_step(model: nn.Module, opt: SAM, loss_fn) -> None:
    """A sharpness-aware step as davda54/sam writes it (the step before the cheaper options)."""
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    opt.first_step(zero_grad=True)
    with frozen_bn_statistics(model):
        loss_fn().backward()
    opt.second_step()


def owned_adasap(model: nn.Module) -> AdaSAP:
    opt = AdaSAP(parameter_groups(model, 0.0), torch.optim.SGD, 0.01, 0.2, lr=0.05, momentum=0.9)
    conv = model.features[0]
    owners = {conv.weight: (0, torch.arange(16)), conv.bias: (0, torch.arange(16))}
    opt.set_radii(NeuronOwnership(16, owners), torch.linspace(0.01, 0.2, 16))
    return opt


def test_the_step_without_cheaper_options_is_the_reference_adasap_step_bitwise():
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    opt, reference = owned_adasap(model), owned_adasap(twin)
    for i in range(4):
        x, y = DATA[i]
        step_with(model, opt, lambda x=x, y=y: F.cross_entropy(model(x), y))
        reference_step(twin, reference, lambda x=x, y=y: F.cross_entropy(twin(x), y))
    assert_same_weights(model, twin)


@pytest.mark.parametrize("options", [{}, *NEUTRAL], ids=["defaults", "p=1", "k=1", "fraction=1"])
def test_neutral_options_are_the_reference_sam_step_bitwise(options):
    schedule = PhaseSchedule(0, 0, 4, removals=0)  # phase 3 only: SAM there, not ASAM
    pruner = make(schedule, method="sam", keep=1.0, finetune_sharpness="sam", **options)
    twin = copy.deepcopy(pruner.model)
    reference = SAM(parameter_groups(twin, 0.0), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    for i in range(4):
        x, y = DATA[i]
        closure = Counted(pruner.model, x, y)
        pruner.step(closure)
        assert closure.rows == [8, 8] and closure.backwards == 2
        reference_step(twin, reference, lambda x=x, y=y: F.cross_entropy(twin(x), y))
    assert_same_weights(pruner.model, twin)


@pytest.mark.parametrize("options", NEUTRAL, ids=["p=1", "k=1", "fraction=1"])
def test_neutral_options_leave_an_adasap_pruning_run_bitwise_unchanged(options):
    schedule = PhaseSchedule(2, 2, 2, removals=1)
    plain, neutral = make(schedule, keep=0.6), make(schedule, keep=0.6, **options)
    for closures in zip(run(plain, range(6)), run(neutral, range(6)), strict=True):
        assert [c.rows for c in closures] == [[8, 8], [8, 8]]
    assert_same_weights(plain.model, neutral.model)


@pytest.mark.parametrize("method", ["sam", "adasap"])
def test_rst_steps_are_sharpness_aware_as_the_seeded_draws_say(method):
    schedule = PhaseSchedule(0, 0, 40, removals=0)
    draws = PrunerSettings(sam_probability=0.5, seed=3)  # make()'s own seed is the model's
    pruner = make(schedule, method=method, keep=1.0, settings=draws)
    closures = run(pruner, range(40))
    replay = StepPlan(pruner.settings, 40)
    expected = [2 if replay.kind(i, True) == "ascent" else 1 for i in range(40)]
    assert [len(c.rows) for c in closures] == expected
    assert [c.backwards for c in closures] == expected
    assert 10 <= expected.count(2) <= 30  # a fair coin over 40 steps
    other = run(make(schedule, method=method, keep=1.0, settings=replace(draws, seed=4)), range(40))
    assert [len(c.rows) for c in other] != expected  # the seed decides


def test_rst_probability_moves_linearly_and_never_draws_at_zero():
    plan = StepPlan(PrunerSettings(sam_probability=1.0, sam_probability_end=0.0), 11)
    assert [plan.probability(s) for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    never = StepPlan(PrunerSettings(sam_probability=0.0), 5)
    state = never.generator.get_state()
    assert [never.kind(s, True) for s in range(5)] == ["plain"] * 5
    assert torch.equal(never.generator.get_state(), state)
    pruner = make(PhaseSchedule(0, 0, 60, removals=0), keep=1.0, sam_probability=1.0,
                  sam_probability_end=0.0)  # fmt: skip
    passes = [len(c.rows) for c in run(pruner, range(60))]
    assert passes[0] == 2 and passes[-1] == 1
    assert passes[:20].count(2) > passes[40:].count(2)


@pytest.mark.parametrize("method", ["sam", "adasap"])
def test_looksam_ascends_every_k_steps_and_reuses_one_pass_between(method):
    pruner = make(PhaseSchedule(0, 0, 9, removals=0), method=method, keep=1.0, sam_every=3)
    closures = run(pruner, range(9))
    assert [len(c.rows) for c in closures] == [2, 1, 1] * 3
    assert [c.backwards for c in closures] == [2, 1, 1] * 3
    stored = [s[DIRECTION] for s in pruner.optimizer.state.values() if DIRECTION in s]
    assert len(stored) == len(list(pruner.model.parameters()))


def test_looksam_direction_survives_a_removal_sliced_and_an_optimizer_change():
    # removal before step 2 (a reuse step): the sliced direction is reused, no extra ascent;
    # at the change to fine-tuning's SAM (step 4) the direction is carried over too
    pruner = make(PhaseSchedule(2, 2, 2, removals=1), keep=0.6, sam_every=3)
    closures = run(pruner, range(6))
    assert [len(c.rows) for c in closures] == [2, 1, 1, 2, 1, 1]
    for p in pruner.model.parameters():
        assert pruner.optimizer.state[p][DIRECTION].shape == p.shape


def test_a_sharpness_aware_phase_after_sgd_starts_with_an_ascent():
    pruner = make(PhaseSchedule(2, 0, 4, removals=0), method="sgd-sam", keep=1.0, sam_every=3)
    assert [len(c.rows) for c in run(pruner, range(6))] == [1, 1, 2, 2, 1, 1]


def test_looksam_direction_and_reuse_match_hand_computation():
    w = nn.Parameter(torch.zeros(2))
    state: dict = {w: {}}
    w.grad = torch.tensor([1.0, 1.0])  # the gradient at the perturbed weights, g_s
    store_direction(state, {w: torch.tensor([1.0, 0.0])})  # the plain gradient g
    torch.testing.assert_close(state[w][DIRECTION], torch.tensor([0.0, 1.0]))
    w.grad = torch.tensor([2.0, 0.0])
    add_direction(state, [w], alpha=0.5)  # g + 0.5 * ||g|| / ||g_v|| * g_v
    torch.testing.assert_close(w.grad, torch.tensor([2.0, 1.0]))
    w.grad = torch.tensor([float("inf"), 0.0])  # an AMP overflow keeps the old direction
    store_direction(state, {w: torch.tensor([1.0, 0.0])})
    torch.testing.assert_close(state[w][DIRECTION], torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("fraction, rows", [(0.5, 4), (0.3, 3), (0.01, 1)])
def test_sub_batch_ascent_takes_the_first_rows_then_the_whole_batch(fraction, rows):
    pruner = make(PhaseSchedule(1, 1, 1, removals=1), keep=0.7, ascent_fraction=fraction)
    closures = run(pruner, range(3))
    assert [c.rows for c in closures] == [[rows, 8]] * 3
    assert [c.backwards for c in closures] == [2, 2, 2]
    assert sub_batch(fraction, torch.arange(8))[0].tolist() == list(range(rows))


def test_sub_batch_ascent_needs_a_closure_that_takes_the_fraction():
    pruner = make(PhaseSchedule(1, 0, 0, removals=0), ascent_fraction=0.5)
    x, y = DATA[0]
    with pytest.raises(UserError, match="ascent_fraction=0.5 needs a closure that takes"):
        pruner.step(lambda: F.cross_entropy(pruner.model(x), y))
    assert pruner.steps_done == 0
    pruner.step(lambda **kwargs: F.cross_entropy(pruner.model(x), y))  # **kwargs will do


@pytest.mark.parametrize("method", ["sam", "adasap"])
@pytest.mark.parametrize("name", list(CHEAP))
def test_loss_falls_on_a_toy_problem(method, name):
    torch.manual_seed(0)
    x = torch.rand(32, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long() + 2 * (x[:, 2, :4].mean((1, 2)) > 0.5)
    pruner = make(PhaseSchedule(0, 0, 60, removals=0), method=method, keep=1.0, **CHEAP[name])
    loss = lambda: F.cross_entropy(pruner.model(x), y).item()  # noqa: E731
    pruner.model.eval()
    first = loss()
    for _ in range(60):
        pruner.model.train()
        pruner.step(Counted(pruner.model, x, y))
    pruner.model.eval()
    assert loss() < 0.5 * first


@pytest.mark.parametrize("name", list(CHEAP))
def test_resume_is_exact_with_each_option(name):
    schedule = PhaseSchedule(2, 4, 3, removals=2)
    options = dict(criterion="taylor", keep=0.5, **CHEAP[name])
    reference = make(schedule, **options)
    run(reference, range(9))
    first = make(schedule, **options)
    run(first, range(5))
    saved = copy.deepcopy({"pruner": first.state_dict(), "model": first.model.state_dict()})
    resumed = make(schedule, **options)
    resumed.load_state_dict(saved["pruner"])
    resumed.model.load_state_dict(saved["model"])
    run(resumed, range(5, 9))
    assert resumed.pruning_history == reference.pruning_history
    assert_same_weights(resumed.model, reference.model)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sam_probability=1.5), "sam_probability must be in \\[0, 1\\], got 1.5"),
        (dict(sam_probability_end=-0.1), "sam_probability_end must be in \\[0, 1\\]"),
        (dict(sam_probability="half"), "sam_probability must be a number"),
        (dict(sam_every=0), "sam_every must be an integer >= 1"),
        (dict(sam_every=2.5), "sam_every must be an integer, got 2.5 \\(float\\)"),
        (dict(looksam_alpha=-1), "looksam_alpha must be >= 0"),
        (dict(ascent_fraction=0), "ascent_fraction must be in \\(0, 1\\]"),
        (dict(ascent_fraction=True), "ascent_fraction must be a number"),
    ],
)
def test_bad_cheap_settings_are_one_clear_error(options, message):
    with pytest.raises(UserError, match=message):
        make(PhaseSchedule(1, 0, 0, removals=0), **options)
    name = next(iter(options))
    with pytest.raises(UserError, match=name):  # the run settings say the same (or its type)
        with_overrides(PruneSettings(), options).validate()


def test_options_are_yaml_keys_and_flags_and_reach_the_pruner(capsys):
    flags = ["run", "--sam-probability", "0.5", "--sam-probability-end", "0.1", "--sam-every",
             "4", "--looksam-alpha", "0.3", "--ascent-fraction", "0.25", "--compile"]  # fmt: skip
    config, _ = config_from_args(build_parser().parse_args(flags))
    s = config.prune.pruner
    assert (s.sam_probability, s.sam_probability_end, s.sam_every) == (0.5, 0.1, 4)
    assert (s.looksam_alpha, s.ascent_fraction, s.seed) == (0.3, 0.25, config.prune.seed)
    assert config.prune.compile and from_flat({"sam_every": 2}).prune.pruner.sam_every == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for text in ("--sam-probability SAM_PROBABILITY cheaper SAM (RST)", "--sam-every SAM_EVERY",
                 "--ascent-fraction ASCENT_FRACTION cheaper SAM: the first (ascent) pass",
                 "--compile torch.compile"):  # fmt: skip
        assert text in shown


def test_the_built_in_loop_gives_the_ascent_a_sub_batch():
    seen: list[int] = []
    model = Net()
    model.register_forward_pre_hook(
        lambda m, inputs: seen.append(len(inputs[0])) if m.training else None
    )
    images, labels = torch.rand(32, 3, 8, 8), torch.randint(0, 4, (32,))
    result = adasap.prune(model, TensorDataset(images, labels), (images, labels), method="sam",
                          keep=0.6, warmup_epochs=0, prune_epochs=1, finetune_epochs=1,
                          prune_steps=1, batch_size=16, ascent_fraction=0.25,
                          criterion="magnitude", progress=False)  # fmt: skip
    # 4 sharpness-aware steps: 4 + 16 rows (magnitude scores: no gradient pass before removal)
    assert seen.count(4) == 4 and seen.count(16) == 4
    assert all(0 <= r["train_accuracy"] <= 1 and math.isfinite(r["train_loss"])
               for r in result.history)  # fmt: skip


def compiled_run(compile: bool) -> tuple[EpochLoop, list[int]]:
    torch.manual_seed(0)
    model = Net()
    images, labels = torch.rand(48, 3, 8, 8), torch.randint(0, 4, (48,))
    source = training_source(TensorDataset(images, labels), batch_size=16, seed=0)
    pruner = Pruner(model, images[:2], PhaseSchedule(3, 3, 3, removals=2), keep=0.5,
                    optimizer_kwargs=dict(lr=0.05, momentum=0.9))  # fmt: skip
    loop = EpochLoop(pruner, source, (images, labels), torch.device("cpu"), False, None,
                     ClassificationTask(), compile=compile)  # fmt: skip
    compiled = []  # after each removal: is the compiled model gone?
    pruner.register_removal_hook(lambda p: compiled.append(loop._compiled is None))
    with ProgressLog(enabled=False) as progress:
        loop.run(progress, "all", 9, lambda record: None, "test")
    return loop, compiled


@pytest.mark.slow
def test_compiled_training_prunes_like_eager_training():
    eager, _ = compiled_run(False)
    compiled, removals = compiled_run(True)
    assert removals == [True, True]
    assert compiled.model is not compiled.pruner.model  # a compiled wrapper
    assert params(compiled.pruner.model) == params(eager.pruner.model) < params(Net())
    for (key, a), (_, b) in zip(
        compiled.pruner.model.state_dict().items(),
        eager.pruner.model.state_dict().items(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=key)
    assert [r["val_accuracy"] for r in compiled.history] == pytest.approx(
        [r["val_accuracy"] for r in eager.history], abs=1 / 48
    )
