"""What a model needs to know about a dataset, and the specs of the built-in datasets."""

from __future__ import annotations

from dataclasses import dataclass

DIGIT_NAMES = tuple(str(d) for d in range(10))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset; ``hflip`` says if mirroring keeps the class."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None
    hflip: bool = True


FASHION_MNIST = DatasetSpec(
    "fashion-mnist",
    10,
    1,
    28,
    (0.2860,),
    (0.3530,),
    (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
)
# Mirrored handwritten digits are not digits (2, 3, 4, 5, 7), so no flips for either set.
MNIST = DatasetSpec("mnist", 10, 1, 28, (0.1307,), (0.3081,), DIGIT_NAMES, hflip=False)
CIFAR10 = DatasetSpec(
    "cifar10",
    10,
    3,
    32,
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
    (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
)
# CIFAR-100's class names are read from its files (see adasap.data.datasets).
CIFAR100 = DatasetSpec("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
DIGITS = DatasetSpec("digits", 10, 1, 8, (0.3053,), (0.3759,), DIGIT_NAMES, hflip=False)
