"""Batch sources over every kind of data, and the one accuracy evaluator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from adasap.data import (
    TensorImageSet,
    batches,
    evaluation_source,
    load_dataset,
    training_source,
)
from adasap.errors import UserError
from adasap.tasks.evaluate import evaluate_accuracy


def indexed_images(n: int = 10, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with level i (uint8) and has label i % 3."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size)
    return images.contiguous(), torch.arange(n) % 3


class Items(Dataset):
    """A map-style dataset of (float CHW image, int label) items built from indexed_images."""

    def __init__(self, n: int = 10) -> None:
        self.images, self.labels = indexed_images(n)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i].float() / 255, int(self.labels[i])


class LevelClassifier(nn.Module):
    """Predicts (mean pixel level in 0..255) mod 3."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = (x.mean(dim=(1, 2, 3)) * 255 * self.scale).round().long()
        return F.one_hot(level % 3, 3).float()


def levels(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


# --------------------------------------------------------------------------- adasap sets


@pytest.mark.parametrize("augment", [False, True])
def test_training_source_on_adasap_sets_is_exactly_batches(augment):
    bundle = load_dataset("synthetic", num_train=90, num_test=20, image_size=8)
    source = training_source(bundle.train, batch_size=16, seed=3, augment=augment)
    assert len(source) == len(bundle.train) // 16 == 5
    assert source.num_classes == 10 and source.owns_augmentation is augment
    for epoch in (0, 4):
        expected = batches(
            bundle.train,
            16,
            shuffle=True,
            generator=torch.Generator().manual_seed(3 * 100_003 + epoch),
            augment=augment,
            device=torch.device("cpu"),
            drop_last=True,
        )
        got = list(source.epoch(epoch, torch.device("cpu")))
        want = list(expected)
        assert len(got) == len(want) == 5
        for (xa, ya), (xb, yb) in zip(got, want, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    example = source.example(3)
    assert torch.equal(example, bundle.train.float_images()[:3])
    source.check()


def test_evaluation_source_on_adasap_sets_keeps_order_and_last_batch():
    images, labels = indexed_images(10)
    source = evaluation_source(TensorImageSet(images, labels), batch_size=4)
    got = list(source.epoch(0))
    assert len(source) == 3 and [len(y) for _, y in got] == [4, 4, 2]
    assert levels(torch.cat([x for x, _ in got])) == list(range(10))
    assert source.num_classes is None and not source.owns_augmentation


# --------------------------------------------------------------------------- other kinds


def test_tensor_pair_and_map_style_dataset():
    images, labels = indexed_images(10)
    pair = evaluation_source((images, labels), batch_size=4)
    x, y = next(pair.epoch(0))
    assert x.dtype == torch.float32 and levels(x) == [0, 1, 2, 3] and y.tolist() == [0, 1, 2, 0]
    assert len(pair) == 3

    dataset = training_source(Items(10), batch_size=4, seed=1)
    assert len(dataset) == 2 and not dataset.owns_augmentation and dataset.num_classes is None
    first = list(dataset.epoch(0))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(1 * 100_003 + 0))
    assert levels(torch.cat([x for x, _ in first])) == order[:8].tolist()
    assert levels(torch.cat([x for x, _ in dataset.epoch(1)])) != levels(
        torch.cat([x for x, _ in first])
    )
    assert levels(evaluation_source(Items(10), batch_size=3).example(2)) == [0, 1]


def test_torchvision_dataset_without_transform_gives_float_images():
    from torchvision.datasets import FakeData

    fake = FakeData(size=6, image_size=(3, 8, 8), num_classes=4)  # PIL images, int labels
    source = evaluation_source(fake, batch_size=4)
    source.check()
    x, y = next(source.epoch(0))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64
    assert [len(y) for _, y in source.epoch(0)] == [4, 2]


def test_dataloader_with_a_user_transform_is_used_as_given():
    class Inverted(Items):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return 1 - x, y

    loader = DataLoader(Inverted(10), batch_size=5, shuffle=False)
    source = training_source(loader, batch_size=999, seed=7)
    assert len(source) == 2 and not source.owns_augmentation
    x, y = next(source.epoch(0))
    assert levels(1 - x) == [0, 1, 2, 3, 4] and y.tolist() == [0, 1, 2, 0, 1]
    assert levels(1 - source.example(7)) == list(range(7))


def test_list_of_batches_and_uint8_conversion():
    images, labels = indexed_images(6)
    data = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    source = training_source(data, batch_size=2)
    assert len(source) == 2
    got = list(source.epoch(5))
    assert [x.dtype for x, _ in got] == [torch.float32] * 2
    assert levels(torch.cat([x for x, _ in got])) == list(range(6))


def test_set_epoch_is_called_on_a_distributed_style_sampler():
    class Sampler(torch.utils.data.Sampler):
        def __init__(self):
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            return iter(range(4))

        def __len__(self):
            return 4

    sampler = Sampler()
    loader = DataLoader(Items(4), batch_size=2, sampler=sampler)
    source = training_source(loader, batch_size=2)
    for epoch in (0, 1, 2):
        list(source.epoch(epoch))
    assert sampler.epochs == [0, 1, 2]


# --------------------------------------------------------------------------- bad data


class Raw(Dataset):
    def __init__(self, item, n: int = 3):
        self.item, self.n = item, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.item


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(3, 4, 4), 0


IMAGE = torch.zeros(3, 4, 4)
BAD_DATA = {
    "bundle": (lambda: load_dataset("synthetic", num_train=20, num_test=10), "pass its .train"),
    "tensor-alone": (lambda: torch.zeros(2, 3, 4, 4), "has no labels"),
    "int": (lambda: 42, "cannot read batches from a int"),
    "generator": (lambda: (b for b in []), "can be iterated only once"),
    "iterable-dataset": (lambda: Stream(), "wrap it in a DataLoader"),
    "empty-dataset": (lambda: Raw((IMAGE, 0), n=0), "the dataset is empty"),
    "empty-list": (lambda: [], "the loader or list of batches is empty"),
    "item-not-pair": (lambda: Raw(IMAGE), "not an \\(image, label\\) pair"),
    "item-image-2d": (lambda: Raw((torch.zeros(4, 4), 0)), r"shape \(4, 4\), not \(C, H, W\)"),
    "item-image-str": (lambda: Raw(("x.png", 0)), "str image"),
    "item-float-label": (lambda: Raw((IMAGE, 0.5)), "not an integer class index"),
    "item-one-hot": (lambda: Raw((IMAGE, torch.ones(3))), "not an integer class index"),
    "batch-not-pair": (lambda: [torch.zeros(2, 3, 4, 4)], "not an \\(images, labels\\) pair"),
    "batch-3d": (lambda: [(torch.zeros(3, 4, 4), torch.zeros(3))], "4-D tensor"),
    "batch-float-labels": (
        lambda: [(torch.zeros(2, 3, 4, 4), torch.zeros(2))],
        "float32, not integer class indices",
    ),
    "batch-label-count": (
        lambda: [(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.int64))],
        r"labels of shape \(3,\)",
    ),
    "pair-label-count": (
        lambda: (torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.int64)),
        r"labels of shape \(3,\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_user_error(case):
    make, message = BAD_DATA[case]
    with pytest.raises(UserError, match=message) as info:
        training_source(make(), batch_size=2).check()
    assert "\n" not in str(info.value)


def test_no_full_batch_and_unknown_length():
    images, labels = indexed_images(3)
    with pytest.raises(UserError, match="makes no full batch"):
        training_source(TensorImageSet(images, labels), batch_size=4).check()
    evaluation_source(TensorImageSet(images, labels), batch_size=4).check()

    class Endless:
        def __iter__(self):
            yield images, labels

    with pytest.raises(UserError, match="no len\\(\\)"):
        len(training_source(Endless(), batch_size=2))
    with pytest.raises(UserError, match="batch size 0"):
        evaluation_source(Items(), batch_size=0)


# --------------------------------------------------------------------------- evaluator


def test_evaluate_accuracy_on_every_kind_of_data():
    images, labels = indexed_images(10)
    labels = labels.clone()
    labels[-2:] = (labels[-2:] + 1) % 3  # the last two are wrong
    model = LevelClassifier()
    model.train()
    kinds = {
        "set": TensorImageSet(images, labels),
        "pair": (images, labels),
        "float pair": (images.float() / 255, labels),
        "loader": DataLoader(list(zip(images.float() / 255, labels, strict=True)), batch_size=3),
        "list": [(images[:7], labels[:7]), (images[7:], labels[7:])],
    }
    for name, data in kinds.items():
        assert evaluate_accuracy(model, data, batch_size=3) == pytest.approx(0.8), name
    assert model.training, "the model's mode was not restored"
    assert evaluate_accuracy(model, Items(10), channels_last=True) == 1.0


def test_evaluate_accuracy_normalizes():
    images, labels = indexed_images(6)
    seen = []

    class Spy(LevelClassifier):
        def forward(self, x):
            seen.append(x[:, 0, 0, 0].clone())
            return super().forward(x * 0.5 + 0.25)

    evaluate_accuracy(Spy(), (images, labels), normalize=((0.25,) * 3, (0.5,) * 3))
    assert torch.allclose(seen[0], (torch.arange(6) / 255 - 0.25) / 0.5)
    with pytest.raises(UserError, match="normalize=.* is invalid"):
        evaluate_accuracy(Spy(), (images, labels), normalize=((0.5,), (0.0,)))
