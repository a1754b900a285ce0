"""Distillation from the dense model: the loss, the Pruner's step with it, the pipeline."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adasap.errors import UserError
from adasap.method.distillation import Distillation, distillation_loss
from adasap.method.pruner import Pruner, PrunerSettings
from adasap.method.schedule import PhaseSchedule
from adasap.tasks import DetectionTask
from adasap.training.loop import EpochLoop
from adasap.training.pipeline import prune, train
from test_pruner import Net

# --------------------------------------------------------------------------- the loss


def test_distillation_loss_is_hintons_term_by_hand():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    t = 2.0

    def softmax(row):
        exps = [math.exp(v / t) for v in row]
        return [e / sum(exps) for e in exps]

    kl = [
        sum(p * math.log(p / q) for p, q in zip(softmax(tr), softmax(sr), strict=True))
        for sr, tr in zip(student.tolist(), teacher.tolist(), strict=True)
    ]
    expected = t * t * sum(kl) / len(kl)  # T^2 times the batch mean of KL(teacher || student)
    assert distillation_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(UserError, match=r"^the student's logits \(2, 3\) and the teacher's"):
        distillation_loss(student, teacher[:, :2], t)


# --------------------------------------------------------------------------- the Pruner


g = torch.Generator().manual_seed(0)
DATA = [(torch.rand(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
        for _ in range(6)]  # fmt: skip
SGD = dict(optimizer=torch.optim.SGD, optimizer_kwargs=dict(lr=0.05, momentum=0.9), round_to=1)
# a removal at step 2, phase 3 from step 4
SCHEDULE = PhaseSchedule(1, 3, 2, removals=1)


def make(schedule=SCHEDULE, **kwargs) -> Pruner:
    torch.manual_seed(0)
    return Pruner(Net(), DATA[0][0][:2], schedule, **{**SGD, **kwargs})


def train_steps(pruner: Pruner, distilled: bool, fraction: bool = False) -> list[float]:
    losses = []
    for x, y in DATA:

        def closure(fraction: float = 1.0, x=x, y=y):
            rows = math.ceil(fraction * len(x))
            logits = pruner.model(x[:rows])
            loss = F.cross_entropy(logits, y[:rows])
            return pruner.distill_loss(logits, x, loss) if distilled else loss

        losses.append(pruner.step(closure if fraction else lambda c=closure: c()).item())
    return losses


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.state_dict().items(), b.state_dict().items(), strict=True)
    return all(n == m and torch.equal(x, y) for (n, x), (m, y) in pairs)


@pytest.mark.parametrize("method", ["adasap", "sgd"])
def test_weight_0_is_exactly_the_step_without_distillation(method):
    plain = make(method=method)
    train_steps(plain, distilled=False)
    off = make(method=method, distill_weight=0.0, teacher=Net())
    assert off.distillation is None  # the teacher is never copied, never run
    train_steps(off, distilled=True)
    assert same_weights(plain.model, off.model)


def test_phases_before_distill_from_are_exactly_undistilled():
    plain = make(PhaseSchedule(2, 4, 0, removals=1))
    train_steps(plain, distilled=False)
    later = make(PhaseSchedule(2, 4, 0, removals=1), distill_weight=0.5, distill_from="finetune")
    calls = count_calls(later.distillation.teacher)
    train_steps(later, distilled=True)
    assert calls == [0] and same_weights(plain.model, later.model)


def test_the_loss_mixes_in_the_teacher_and_the_step_differs():
    weight, temperature = 0.3, 2.0
    pruner = make(PhaseSchedule(0, 0, 6, removals=0), distill_weight=weight,
                  distill_temperature=temperature)  # fmt: skip
    dense = copy.deepcopy(pruner.model)
    x, y = DATA[0]
    student = copy.deepcopy(pruner.model).train()(x)  # the first pass, unperturbed weights
    teacher = dense.eval()(x)
    expected = (1 - weight) * F.cross_entropy(student, y) + weight * distillation_loss(
        student, teacher, temperature
    )
    (loss, *_) = train_steps(pruner, distilled=True)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(student, teacher, temperature).item() > 1e-3  # a term to add
    plain = make(PhaseSchedule(0, 0, 6, removals=0))
    assert train_steps(plain, distilled=False)[0] != loss
    assert not same_weights(plain.model, pruner.model)


@pytest.mark.parametrize("ascent_fraction", [1.0, 0.5])
def test_the_teacher_runs_once_per_batch_and_is_never_trained(ascent_fraction):
    pruner = make(method="adasap", distill_weight=0.5, distill_from="warmup",
                  ascent_fraction=ascent_fraction)  # fmt: skip
    teacher = pruner.distillation.teacher
    dense = copy.deepcopy(teacher.state_dict())
    student_calls, teacher_calls = count_calls(pruner.model), count_calls(teacher)
    train_steps(pruner, distilled=True, fraction=ascent_fraction < 1)
    # two passes per SAM step (and a scoring pass at the removal), one teacher pass per batch
    assert student_calls[0] > len(DATA) and teacher_calls == [len(DATA)]
    assert pruner.size.params < sum(p.numel() for p in teacher.parameters())  # pruned: not it
    state = teacher.state_dict()
    assert state.keys() == dense.keys() and all(torch.equal(state[k], dense[k]) for k in dense)
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    trained = {id(p) for group in pruner.optimizer.param_groups for p in group["params"]}
    assert trained.isdisjoint(id(p) for p in teacher.parameters())


def test_a_closure_that_forgets_the_teacher_is_one_line():
    pruner = make(distill_weight=0.5, distill_from="warmup")
    with pytest.raises(UserError) as info:
        train_steps(pruner, distilled=False)
    assert "\n" not in str(info.value) and "call pruner.distill_loss" in str(info.value)


def test_outside_a_step_the_label_loss_is_as_it_is():
    pruner = make(distill_weight=0.5, distill_from="warmup")
    loss = torch.tensor(1.5)
    x = DATA[0][0]
    assert pruner.distill_loss(pruner.model(x), x, loss) is loss


def test_a_state_resumes_only_with_its_teacher():
    distilled = make(distill_weight=0.5)
    state = distilled.state_dict()
    make(distill_weight=0.5).load_state_dict(state)  # a fresh copy of the same dense model
    for other in (make(), make(distill_weight=0.5, teacher=Net())):
        with pytest.raises(UserError, match="^the saved run was distilled from another teacher"):
            other.load_state_dict(state)
    with pytest.raises(UserError, match="another teacher, or none"):
        distilled.load_state_dict(make().state_dict())


@pytest.mark.parametrize(
    "values, message",
    [
        ({"distill_weight": 1.5}, "distill_weight must be in [0, 1], got 1.5"),
        ({"distill_weight": -0.1}, "distill_weight must be in [0, 1], got -0.1"),
        ({"distill_weight": math.nan}, "distill_weight must be in [0, 1], got nan"),
        ({"distill_temperature": 0.0}, "distill_temperature must be a finite number > 0, got 0.0"),
        ({"distill_temperature": math.inf}, "distill_temperature must be a finite number > 0"),
        ({"distill_from": "dense"}, "distill_from must be one of 'warmup', 'prune', 'finetune'"),
    ],
)
def test_bad_settings_are_one_line(values, message):
    with pytest.raises(UserError) as info:
        PrunerSettings(**values)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_bad_phases_are_one_line():
    with pytest.raises(UserError, match="^unknown phase.s. dense to distil in: choose from warm"):
        Distillation(Net(), 0.5, 4.0, phases=("dense",))


# --------------------------------------------------------------------------- the pipeline

FAST = dict(warmup_epochs=1, prune_epochs=1, finetune_epochs=1, prune_steps=2, batch_size=20,
            progress=False)  # fmt: skip
STEPS = 4  # per epoch: 80 training images, 20 for validation


@pytest.fixture
def teachers(monkeypatch):
    """The distillations the pipeline makes, each with its teacher's forward passes counted."""
    made: list[tuple[Distillation, list[int], dict]] = []
    original = Distillation.of.__func__

    def recording(cls, settings, teacher):
        distillation = original(cls, settings, teacher)
        if distillation is not None:
            state = copy.deepcopy(distillation.teacher.state_dict())
            made.append((distillation, count_calls(distillation.teacher), state))
        return distillation

    monkeypatch.setattr(Distillation, "of", classmethod(recording))
    return made


def test_the_pipeline_with_weight_0_is_the_pipeline_without(
    tiny_classification, tiny_resnet, teachers
):
    plain = prune(tiny_resnet, tiny_classification, method="sgd", **FAST)
    unused = prune(
        tiny_resnet,
        tiny_classification,
        method="sgd",
        distill_weight=0.0,
        distill_temperature=2.0,
        distill_from="warmup",
        **FAST,
    )
    assert teachers == [] and same_weights(plain.model, unused.model)


@pytest.mark.parametrize("method", ["sgd", "sam", "adasap", "adasap-sgd", "sgd-sam"])
def test_every_method_distils_phases_2_and_3_from_the_dense_model(
    tiny_classification, tiny_resnet, teachers, method
):
    plain = prune(tiny_resnet, tiny_classification, method=method, **FAST)
    distilled = prune(tiny_resnet, tiny_classification, method=method, distill_weight=0.5, **FAST)
    ((distillation, calls, at_start),) = teachers
    assert calls == [2 * STEPS]  # once per batch of phases 2 and 3, whatever the passes
    after = distillation.teacher.state_dict()
    assert all(torch.equal(after[k], at_start[k]) for k in at_start)  # never trained
    assert same_weights(distillation.teacher, tiny_resnet)  # the dense model the run began from
    assert not same_weights(plain.model, distilled.model)
    # phase 1 is not distilled: its record is the undistilled run's
    assert plain.history[0]["train_loss"] == distilled.history[0]["train_loss"]


def test_dense_training_ignores_distillation(tiny_classification, tiny_resnet, teachers):
    plain = train(copy.deepcopy(tiny_resnet), tiny_classification, epochs=1, **FAST)
    distilled = train(
        copy.deepcopy(tiny_resnet), tiny_classification, epochs=1, distill_weight=0.5, **FAST
    )
    assert teachers == [] and same_weights(plain.model, distilled.model)


def test_a_detector_is_not_distilled():
    pruner = SimpleNamespace(distillation=object())
    with pytest.raises(UserError, match="^distillation .* is not defined for the detection task"):
        EpochLoop(pruner, None, None, torch.device("cpu"), False, None, DetectionTask())


def test_the_cost_benchmark_times_steps_with_and_without_the_teacher(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distillation.py"
    spec = importlib.util.spec_from_file_location("bench_distillation", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_distillation"] = bench  # its dataclass looks its module up
    spec.loader.exec_module(bench)
    out = tmp_path / "cost.json"
    argv = ["--methods", "sgd", "sam", "--steps", "1", "--rounds", "1", "--batch-size", "4"]
    rows = bench.main([*argv, "--json", str(out)])
    assert [r.method for r in rows] == ["sgd", "sam"]
    assert all(r.plain_ms > 0 and r.distilled_ms > 0 and r.teacher_ms > 0 for r in rows)
    assert [r["method"] for r in json.loads(out.read_text())] == ["sgd", "sam"]
