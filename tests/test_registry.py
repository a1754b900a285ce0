"""The one registry class and every registry built on it: duplicates refused, unknown names
answered on one line with the known ones."""

from collections.abc import Callable
from typing import TypeVar

import pytest

from adasap.data.datasets import get_spec, register_dataset
from adasap.data.specs import MNIST
from adasap.errors import UserError
from adasap.experiments.job import JOBS
from adasap.method.importance import l2_scores, make_importance, register_criterion
from adasap.models.detection import build_detector, register_detector
from adasap.models.registry import register_family, resolve
from adasap.registry import Registry
from adasap.robustness.corruptions.cbar import register_cbar
from adasap.robustness.corruptions.registry import get_corruption, register_corruption
from adasap.tasks.base import TASKS, make_task

T = TypeVar("T")
ROWS = (0.1, 0.2, 0.3, 0.4, 0.5)


def scratch_copy(registry: Registry[T], **replaced: T) -> Registry[T]:
    """A copy of ``registry``, some entries ``replaced``: a test monkeypatches a module's registry
    with it to register into (or swap entries) without changing the real one."""
    copy: Registry[T] = Registry(registry.kind)
    for name in registry:
        copy.add(name, replaced.get(name, registry.get(name)))
    return copy


def _identity(*args: object) -> object:
    return args[0]


# name: (register a name taken already, look up an unknown name, the start of its message)
REGISTRIES: dict[str, tuple[Callable[[], object], Callable[[], object], str]] = {
    "criterion": (
        lambda: register_criterion("magnitude")(_identity),
        lambda: make_importance("hessian"),
        "unknown criterion 'hessian': choose one of magnitude, ",
    ),
    "corruption": (
        lambda: register_corruption(
            "fog",
            family="weather",
            deterministic=True,
            params={"imagenet": ROWS, "tinyimagenet": ROWS, "cifar": ROWS},
        )(_identity),
        lambda: get_corruption("fogg"),
        "unknown corruption 'fogg': choose one of gaussian_noise, ",
    ),
    "cbar corruption": (
        lambda: register_cbar("lines", cifar=ROWS)(_identity),
        lambda: get_corruption("line"),
        "unknown corruption 'line': choose one of ",
    ),
    "model family": (
        lambda: register_family("timm", names=list)(_identity),
        lambda: resolve("hf:resnet18"),
        "unknown model family 'hf' in 'hf:resnet18': use one of ",
    ),
    "detector": (
        lambda: register_detector("tiny_ssd")(_identity),
        lambda: build_detector("yolo", num_classes=3),
        "unknown detector 'yolo': choose one of ",
    ),
    "dataset": (
        lambda: register_dataset("mnist", MNIST)(_identity),
        lambda: get_spec("fmnist"),
        "unknown dataset 'fmnist': choose one of ",
    ),
    "task": (
        lambda: TASKS.add("classification", TASKS.get("detection")),
        lambda: make_task("segmentation"),
        "unknown task 'segmentation': choose one of classification, detection",
    ),
    "job": (
        lambda: JOBS.add("detection", JOBS.get("classification")),
        lambda: JOBS.get("segmentation"),
        "unknown task 'segmentation': choose one of classification, detection",
    ),
}


@pytest.mark.parametrize("kind", REGISTRIES)
def test_every_registry_refuses_a_name_it_holds(kind: str) -> None:
    register_taken, _, _ = REGISTRIES[kind]
    # A user's corruption clashing is the user's to fix (UserError); elsewhere it is a bug.
    with pytest.raises((ValueError, UserError), match="registered already|already registered"):
        register_taken()


@pytest.mark.parametrize("kind", REGISTRIES)
def test_every_registry_answers_an_unknown_name_on_one_line(kind: str) -> None:
    _, look_up, message = REGISTRIES[kind]
    with pytest.raises(UserError) as info:
        look_up()
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_refused_duplicate_keeps_the_first_entry() -> None:
    fog = get_corruption("fog")
    with pytest.raises(UserError):
        REGISTRIES["corruption"][0]()
    assert get_corruption("fog") is fog
    with pytest.raises(ValueError):
        REGISTRIES["criterion"][0]()
    assert make_importance("magnitude") is l2_scores


def test_registry_holds_entries_in_registration_order() -> None:
    colours: Registry[int] = Registry("colour")
    assert colours.add("red", 1) == 1

    @colours.register("green")
    def green() -> int:
        return 2

    assert colours.get("green") is green and colours.get("red") == 1
    assert colours.names() == ("red", "green") and list(colours) == ["red", "green"]
    assert len(colours) == 2 and "red" in colours and "blue" not in colours


def test_registry_refuses_a_duplicate_and_keeps_the_first() -> None:
    colours: Registry[int] = Registry("colour")
    colours.add("red", 1)
    with pytest.raises(ValueError, match="colour 'red' is registered already"):
        colours.add("red", 2)
    with pytest.raises(ValueError, match="colour 'red' is registered already"):
        colours.register("red")(3)
    assert colours.get("red") == 1 and len(colours) == 1


@pytest.mark.parametrize("name", ("blue", ["red"], None))
def test_registry_answers_an_unknown_name_with_the_known_ones(name: object) -> None:
    colours: Registry[int] = Registry("colour")
    colours.add("red", 1)
    colours.add("green", 2)
    with pytest.raises(UserError) as info:
        colours.get(name)  # type: ignore[arg-type]
    assert str(info.value) == f"unknown colour {name!r}: choose one of red, green"


def test_a_scratch_copy_leaves_the_registry_alone() -> None:
    colours: Registry[int] = Registry("colour")
    colours.add("red", 1)
    copy = scratch_copy(colours, red=2)
    copy.add("green", 3)
    assert (copy.get("red"), copy.names(), copy.kind) == (2, ("red", "green"), "colour")
    assert colours.names() == ("red",) and colours.get("red") == 1
