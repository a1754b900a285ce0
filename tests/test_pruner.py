"""The composable Pruner inside a plain loop: schedule, removal, optimizers, state, bad input."""

from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import adasap
from adasap import alignment
from adasap.errors import UserError
from adasap.method import pruner as pruner_module
from adasap.method.base_optimizer import phase_sharpness
from adasap.method.optim import SAM, AdaSAP
from adasap.method.pruner import Pruner, PrunerSettings
from adasap.method.schedule import PhaseSchedule
from adasap.models.builders import build_model


class Net(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.features(x))


def batches(count: int = 8, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(size, 3, 8, 8, generator=g), torch.randint(0, 4, (size,), generator=g))
        for _ in range(count)
    ]


DATA = batches()
SGD = dict(optimizer=torch.optim.SGD, optimizer_kwargs=dict(lr=0.05, momentum=0.9))
# The net's first layer has 16 channels: rounded to a runtime's 16 it could not be pruned.
ANY_COUNT = dict(round_to=1)


def make(schedule: PhaseSchedule, seed: int = 0, **kwargs) -> Pruner:
    torch.manual_seed(seed)
    model = Net()
    return Pruner(model, DATA[0][0][:2], schedule, **{**SGD, **ANY_COUNT, **kwargs})


def step(pruner: Pruner, index: int) -> torch.Tensor:
    x, y = DATA[index % len(DATA)]
    return pruner.step(lambda: F.cross_entropy(pruner.model(x), y))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_schedule_places_removals_evenly_in_the_pruning_phase():
    assert PhaseSchedule(2, 8, 3, removals=4).removal_steps() == {2: 1, 4: 2, 6: 3, 8: 4}
    assert PhaseSchedule(2, 3, 3, removals=4).removal_steps() == {2: 1}  # shorter: once
    assert PhaseSchedule(0, 0, 5, removals=0).removal_steps() == {}
    assert PhaseSchedule.from_epochs(1, 0.5, 1, steps_per_epoch=10) == PhaseSchedule(10, 5, 10)
    schedule = PhaseSchedule(2, 4, 3)
    assert [schedule.phase_at(s) for s in (0, 1, 2, 5, 6, 8)] == [
        "warmup", "warmup", "prune", "prune", "finetune", "finetune",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(warmup=-1, prune=1, finetune=1), "warmup must be an integer >= 0"),
        (dict(warmup=0, prune=0, finetune=0), "all phases have 0 steps"),
        (dict(warmup=1.5, prune=1, finetune=1), "warmup must be an integer"),
    ],
)
def test_bad_schedules_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        PhaseSchedule(**kwargs)


def test_adasap_phases_optimizers_and_exact_removal_steps():
    pruner = make(PhaseSchedule(2, 4, 2, removals=2), keep=0.5, keep_kind="params")
    dense = params(pruner.model)
    kinds, sizes = [], []
    for i in range(8):
        step(pruner, i)
        kinds.append(type(pruner.optimizer))
        sizes.append(params(pruner.model))
    assert kinds == [AdaSAP] * 6 + [SAM] * 2
    # removals happen before steps 2 and 4; the size changes exactly there
    assert sizes[0] == sizes[1] == dense
    assert sizes[1] > sizes[2] == sizes[3] > sizes[4] == sizes[7]
    assert 0.48 <= sizes[-1] / dense <= 0.505
    assert pruner.model(DATA[0][0]).shape == (8, 4)  # the classifier keeps its 4 outputs


@pytest.mark.parametrize("method, passes", [("adasap", [2, 2, 2]), ("sgd", [1, 1, 1]),
                                            ("adasap-sgd", [2, 2, 1])])  # fmt: skip
def test_forward_passes_per_step_follow_the_method(method, passes):
    pruner = make(PhaseSchedule(1, 1, 1, removals=1), method=method, keep=0.7)
    counted = []
    for i in range(3):
        calls = []
        x, y = DATA[i]
        pruner.step(lambda x=x, y=y, calls=calls: calls.append(1) or F.cross_entropy(
            pruner.model(x), y))  # fmt: skip
        counted.append(len(calls))
    assert counted == passes


def test_state_dict_resumes_exactly_on_a_fresh_dense_model():
    schedule = PhaseSchedule(2, 4, 3, removals=2)
    reference = make(schedule, criterion="taylor", keep=0.5)
    for i in range(9):
        step(reference, i)

    first = make(schedule, criterion="taylor", keep=0.5)
    for i in range(5):  # past the first removal, inside the pruning phase
        step(first, i)
    saved = copy.deepcopy({"pruner": first.state_dict(), "model": first.model.state_dict()})

    resumed = make(schedule, criterion="taylor", keep=0.5)  # a fresh dense model
    resumed.load_state_dict(saved["pruner"])
    resumed.model.load_state_dict(saved["model"])
    for i in range(5, 9):
        step(resumed, i)
    assert resumed.pruning_history == reference.pruning_history
    for (name, a), (_, b) in zip(
        resumed.model.state_dict().items(), reference.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_state_numbering_neurons_otherwise_is_refused():
    schedule = PhaseSchedule(2, 4, 3, removals=2)
    first = make(schedule, criterion="taylor", keep=0.5)
    for i in range(3):
        step(first, i)
    state = first.state_dict()
    assert state["neurons"] == [["features.0", 13], ["features.3", 28]]  # after a removal
    state["neurons"] = state["neurons"][::-1]  # another version ordering the groups otherwise
    with pytest.raises(UserError, match="numbers the model's neurons differently"):
        make(schedule, criterion="taylor", keep=0.5).load_state_dict(state)


def test_the_sam_baseline_takes_taylor_scores():
    pruner = make(
        PhaseSchedule(1, 2, 1, removals=2), method="sam", criterion="taylor", keep=0.6,
        keep_kind="params",
    )  # fmt: skip
    dense = params(pruner.model)
    for i in range(4):
        step(pruner, i)
    assert type(pruner.optimizer) is SAM and 0.55 <= params(pruner.model) / dense <= 0.605


def test_lr_scheduler_is_rebuilt_with_its_state_after_removals():
    total = 8
    pruner = make(
        PhaseSchedule(2, 4, 2, removals=2),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total),
    )
    seen = []
    for i in range(total):
        step(pruner, i)
        seen.append(pruner.optimizer.param_groups[0]["lr"])
    torch.testing.assert_close(torch.tensor(seen), 0.05 * (1 - torch.arange(1, 9) / total))


def test_adamw_moments_of_surviving_channels_are_carried_over():
    pruner = make(
        PhaseSchedule(2, 1, 1, removals=1),
        method="sgd",
        keep=0.6,
        optimizer=torch.optim.AdamW,
        optimizer_kwargs=dict(lr=1e-3, weight_decay=0.01),
    )
    for i in range(2):
        step(pruner, i)
    conv = pruner.model.features[0]  # its inputs are the image channels: rows stay whole
    old_weight = conv.weight.detach().flatten(1).clone()
    state = pruner.optimizer.state[conv.weight]
    old_moments = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    pruner.remove(1.0)
    assert isinstance(pruner.optimizer, torch.optim.AdamW)
    new_weight = conv.weight.detach().flatten(1)
    kept = [int((old_weight == row).all(1).nonzero()[0]) for row in new_weight]
    assert 0 < len(kept) < len(old_weight)
    for key, old in old_moments.items():
        assert torch.equal(pruner.optimizer.state[conv.weight][key], old[kept]), key


def test_a_built_optimizer_keeps_its_groups_through_removals():
    torch.manual_seed(0)
    model = Net()
    head = list(model.head.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("head")]
    built = torch.optim.SGD([{"params": rest}, {"params": head, "lr": 0.5}], lr=0.01)
    pruner = Pruner(model, DATA[0][0][:2], PhaseSchedule(1, 1, 1, removals=1), optimizer=built,
                    keep=0.6)  # fmt: skip
    for i in range(3):
        step(pruner, i)
    groups = pruner.optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.01, 0.5]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.head.parameters()}


def test_a_dict_of_losses_is_summed():
    pruner = make(PhaseSchedule(0, 0, 1, removals=0), method="sgd", keep=1.0)
    x, y = DATA[0]
    expected = F.cross_entropy(pruner.model(x), y) * 3
    loss = pruner.step(lambda: {"a": F.cross_entropy(pruner.model(x), y),
                                "b": 2 * F.cross_entropy(pruner.model(x), y)})  # fmt: skip
    torch.testing.assert_close(loss, expected.detach())


def test_a_user_criterion_decides_what_goes():
    pruner = make(PhaseSchedule(0, 1, 0, removals=1), method="sgd", keep=0.7,
                  criterion=lambda layout: torch.arange(layout.num_neurons, dtype=torch.float),
                  score_normalization="none")  # fmt: skip
    layout = pruner.layout
    chosen = pruner.remove(1.0)
    # the lowest-scored neurons go first: a prefix of the ids, less each group's protected top
    assert sorted(chosen.tolist()) == list(range(len(chosen)))
    assert len(chosen) < layout.groups[0].size  # the first layer was not emptied


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="adam"), "unknown method 'adam'"),
        (dict(rho_maxx=0.1), "unknown pruner setting"),
        (dict(optimizer=SAM), "not SAM"),
        (dict(optimizer_kwargs=dict(lr=0.1, betas=(0.9, 0.99))), "SGD does not take betas"),
        (dict(criterion="entropy"), "unknown criterion 'entropy'"),
        (dict(keep=0.0001), "without emptying a layer"),
        (dict(keep=1.5), "keep fraction must be in"),
        (dict(criterion=lambda layout: torch.ones(3)), "one score per neuron"),
        (dict(runtime="tensorrt"), "unknown runtime 'tensorrt': choose one of torch, ort, "),
        (dict(round_to=0), "round_to must be >= 1 or auto, got 0"),
        (dict(round_to="16"), "round_to must be an integer or 'auto', got '16'"),
        (dict(round_to=16, keep=0.3), "multiples of 16 .*--round-to 1"),
    ],
)
def test_bad_pruner_input_is_one_clear_error(monkeypatch, kwargs, message):
    monkeypatch.setattr(alignment, "cpu_instruction_set", lambda: "avx512")
    with pytest.raises(UserError, match=message) as caught:
        pruner = make(PhaseSchedule(0, 1, 1, removals=1), **kwargs)
        step(pruner, 0)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "instructions, runtime, multiple",
    [("avx512", "ort", 16), ("avx2", "ort", 8), ("avx512", "openvino", 16),
     ("avx512", "torch", 8)],
)  # fmt: skip
def test_auto_round_to_keeps_the_runtimes_channel_multiples(
    monkeypatch, instructions, runtime, multiple
):
    monkeypatch.setattr(alignment, "cpu_instruction_set", lambda: instructions)
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=4, in_channels=3, image_size=16,
                        mean=(0.5,) * 3, std=(0.5,) * 3)  # fmt: skip
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    dense_widths = [m.out_channels for m in convs]
    pruner = Pruner(model, torch.rand(2, 3, 16, 16), PhaseSchedule(0, 1, 0, removals=1),
                    method="sgd", criterion="magnitude", keep=0.5, runtime=runtime)  # fmt: skip
    assert (pruner.settings.round_to, pruner.round_to) == ("auto", multiple)
    pruner.remove(1.0)
    widths = [m.out_channels for m in convs]
    assert sum(widths) < sum(dense_widths)
    for width, dense in zip(widths, dense_widths, strict=True):
        assert width % multiple == 0 or width == dense
    # the MACs target is met, and the rounding gives back what it need not take
    assert 0.46 <= pruner.target.fraction() <= 0.5


def test_auto_takes_smaller_blocks_where_the_runtimes_cannot_reach_the_target(monkeypatch):
    # blocks of 16 cannot take this net to 30%: auto halves the block until they can, while a
    # block the user chose stays an error (the case above)
    monkeypatch.setattr(alignment, "cpu_instruction_set", lambda: "avx512")
    pruner = make(PhaseSchedule(0, 1, 1, removals=1), keep=0.3, round_to="auto")
    assert pruner.round_to == 8
    with pytest.raises(UserError, match="multiples of 16"):
        make(PhaseSchedule(0, 1, 1, removals=1), keep=0.3, round_to=16)
    assert make(PhaseSchedule(0, 1, 1, removals=1), keep=0.7, round_to="auto").round_to == 16


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_a_removal_that_misses_its_predicted_size_says_so(monkeypatch, kind):
    pruner = make(PhaseSchedule(0, 1, 1, removals=1), keep=0.5, keep_kind=kind,
                  criterion="magnitude")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a removal that lands as predicted says nothing
        pruner.remove(0.5)
    reached = pruner.size
    # as if Torch-Pruning's count did not shrink as the prediction said
    monkeypatch.setattr(pruner_module, "measure_size", lambda model, example: reached)
    with pytest.warns(UserWarning, match=f"of the dense model's {kind}, not the 50.0% predicted"):
        pruner.remove(1.0)
    assert pruner.target.fraction() > 0.6  # the result records what was reached


def test_a_resumed_pruner_keeps_the_channel_multiple_it_started_with(monkeypatch):
    monkeypatch.setattr(alignment, "cpu_instruction_set", lambda: "avx512")
    started = make(PhaseSchedule(0, 1, 1, removals=1), keep=0.7, round_to="auto")
    assert started.round_to == 16
    monkeypatch.setattr(alignment, "cpu_instruction_set", lambda: "avx2")
    resumed = make(PhaseSchedule(0, 1, 1, removals=1), keep=0.7, round_to="auto")
    assert resumed.round_to == 8
    resumed.load_state_dict(started.state_dict())
    assert resumed.round_to == 16


def test_a_closure_that_returns_no_scalar_is_a_user_error():
    pruner = make(PhaseSchedule(1, 0, 0, removals=0))
    with pytest.raises(UserError, match="not a scalar loss"):
        pruner.step(lambda: pruner.model(DATA[0][0]))


def test_taylor_removal_at_the_first_step_takes_a_gradient_pass():
    pruner = make(PhaseSchedule(0, 1, 1, removals=1), criterion="taylor", keep=0.6)
    dense = params(pruner.model)
    removed = []
    pruner.register_removal_hook(lambda p: removed.append(params(p.model)))
    calls = []
    x, y = DATA[0]
    pruner.step(lambda: calls.append(1) or F.cross_entropy(pruner.model(x), y))
    assert len(calls) == 3  # one gradient pass for the scores, then the two SAM passes
    assert removed == [params(pruner.model)] and removed[0] < dense


def test_prune_takes_a_users_dataloader_and_dataset():
    torch.manual_seed(0)
    images, labels = torch.rand(64, 3, 8, 8), torch.randint(0, 4, (64,))
    dataset = TensorDataset(images, labels)
    loader = DataLoader(dataset, batch_size=16, shuffle=True, drop_last=True)
    common = dict(keep=0.6, keep_kind="params", warmup_epochs=1, prune_epochs=1,
                  finetune_epochs=1, prune_steps=1, batch_size=16, progress=False,
                  **ANY_COUNT)  # fmt: skip
    for train in (loader, dataset):
        result = adasap.prune(Net(), train, dataset, **common)
        assert 0.55 <= result.keep_fraction("params") <= 0.605
        assert result.model.head.out_features == 4  # found without a dataset spec
        assert len(result.history) == 3 and 0 <= result.val_accuracy <= 1


@pytest.mark.parametrize(
    "data, message",
    [
        ("images/", "cannot read batches from a str"),
        ([torch.rand(8, 3, 8, 8)], "not .*pair|pairs"),
        (DataLoader(TensorDataset(torch.rand(0, 3, 8, 8), torch.zeros(0).long()), batch_size=4),
         "empty|no batch"),
        ([(torch.rand(8, 3, 8, 8), torch.full((8,), 7))], "labels run from 7 to 7"),
    ],
    ids=["a-string", "no-labels", "empty-loader", "labels-out-of-range"],
)  # fmt: skip
def test_bad_user_data_is_one_clear_error(data, message):
    with pytest.raises(UserError, match=message):
        adasap.prune(Net(), data, keep=0.6, warmup_epochs=1, prune_epochs=0, finetune_epochs=0,
                     batch_size=8, progress=False)  # fmt: skip


def test_a_model_that_cannot_be_copied_is_a_clear_error():
    pruner = make(PhaseSchedule(0, 1, 1, removals=1), keep=0.6)
    pruner.model.lock = threading.Lock()  # size counting deep-copies the model
    with pytest.raises(UserError, match="cannot copy the model.*outside the pruned module"):
        step(pruner, 0)


# ------------------------------------------------------------- phase 3's own sharpness (ASAM)

PHASES = PhaseSchedule(2, 2, 3, removals=1)  # phase 3 starts at step 4
ASAM3 = dict(finetune_sharpness="asam", finetune_rho=0.5)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method", ["adasap", "sam"])
def test_phase3_settings_equal_to_phases_1_2_change_nothing(method):
    default = make(PHASES, method=method, finetune_sharpness=None)  # as phases 1-2
    explicit = make(PHASES, method=method, finetune_sharpness="sam", finetune_rho=0.05)
    optimizers = []
    for i in range(7):
        step(default, i), step(explicit, i)
        optimizers.append(explicit.optimizer)
    assert_same(weights(default.model), weights(explicit.model))
    if method == "sam":  # after the removal (step 2) nothing changes: no rebuild at phase 3
        assert all(o is optimizers[2] for o in optimizers[2:])


@pytest.mark.parametrize("method", ["adasap", "sam"])
def test_phase3_asam_perturbs_by_its_own_radius_and_leaves_phases_1_2_alone(method):
    plain = make(PHASES, method=method, finetune_sharpness=None)
    asam = make(PHASES, method=method, **ASAM3)
    for i in range(PHASES.finetune_start):
        step(plain, i), step(asam, i)
        assert not asam.finetuning and not asam.optimizer.param_groups[0]["adaptive"]
    assert_same(weights(plain.model), weights(asam.model))  # phases 1-2 bit-identical

    # the first phase-3 step: the gradient at w, taken on a copy, and the perturbed weights
    # the second forward pass sees
    model = asam.model
    x, y = DATA[PHASES.finetune_start % len(DATA)]
    twin = copy.deepcopy(model)
    F.cross_entropy(twin(x), y).backward()
    grads = {n: p.grad for n, p in twin.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def closure():
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return F.cross_entropy(model(x), y)

    asam.step(closure)
    assert type(asam.optimizer) is SAM and asam.finetuning
    assert {(g["rho"], g["adaptive"]) for g in asam.optimizer.param_groups} == {(0.5, True)}
    eta = asam.optimizer.param_groups[0]["eta"]
    t = {n: before[n].abs() + eta for n in before}
    norm = torch.stack([(t[n] * grads[n]).norm() for n in before]).norm()
    for n in before:
        expected = 0.5 * t[n] ** 2 * grads[n] / norm  # e = rho T^2 g / ||T g||
        torch.testing.assert_close(seen[1][n] - before[n], expected, rtol=1e-4, atol=1e-6)
    assert not torch.equal(model.features[0].weight, plain.model.features[0].weight)


@pytest.mark.parametrize(
    "overrides, phases_1_2, phase_3",
    [
        ({}, (0.05, False), (2.0, True)),  # the defaults: SAM, then ASAM at its own radius
        (dict(rho=0.1), (0.1, False), (2.0, True)),  # SAM's radius is not ASAM's
        (dict(finetune_sharpness=None, rho=0.1), (0.1, False), (0.1, False)),
        (dict(finetune_sharpness="sam", rho=0.1), (0.1, False), (0.1, False)),
        (dict(asam=True, rho=0.5), (0.5, True), (0.5, True)),  # ASAM throughout: one radius
        (dict(asam=True, rho=0.5, finetune_sharpness="sam"), (0.5, True), (0.05, False)),
        (dict(finetune_rho=0.7), (0.05, False), (0.7, True)),
        (dict(finetune_sharpness="sam", finetune_rho=0.0), (0.05, False), (0.0, False)),
    ],
)
def test_phase3_radius_is_rho_only_when_it_perturbs_as_phases_1_2(overrides, phases_1_2, phase_3):
    settings = replace(PrunerSettings(), **overrides)
    assert phase_sharpness(settings, finetuning=False) == phases_1_2
    assert phase_sharpness(settings, finetuning=True) == phase_3


@pytest.mark.parametrize("stop", [3, 4, 5])  # before, at and after the start of phase 3
def test_phase3_asam_resumes_exactly(stop):
    reference = make(PHASES, criterion="taylor", **ASAM3)
    for i in range(7):
        step(reference, i)
    first = make(PHASES, criterion="taylor", **ASAM3)
    for i in range(stop):
        step(first, i)
    saved = copy.deepcopy({"pruner": first.state_dict(), "model": first.model.state_dict()})
    resumed = make(PHASES, criterion="taylor", **ASAM3)
    resumed.load_state_dict(saved["pruner"])
    resumed.model.load_state_dict(saved["model"])
    for i in range(stop, 7):
        step(resumed, i)
    assert resumed.optimizer.param_groups[0]["adaptive"] and resumed.finetuning
    assert_same(weights(resumed.model), weights(reference.model))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(finetune_sharpness="ASAM"),
            "finetune_sharpness must be one of 'sam', 'asam' or None, got 'ASAM'",
        ),
        (dict(finetune_rho=-0.1), "finetune_rho must be a number >= 0"),
        (dict(finetune_rho="0.5"), "finetune_rho must be a number or None, got '0.5' \\(str\\)"),
    ],
)
def test_bad_phase3_settings_are_one_line_user_errors(overrides, message):
    with pytest.raises(UserError, match=message) as caught:
        make(PHASES, **overrides)
    assert "\n" not in str(caught.value)
