import gzip
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from adasap.data import (
    TensorImageSet,
    augment_batch,
    batches,
    get_spec,
    load_dataset,
    num_batches,
)
from adasap.data import files as data
from adasap.data.files import IDX_FILES, locate_idx_files, read_idx
from adasap.errors import UserError
from test_registry import scratch_copy


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_fashion(folder: Path, n_train: int, n_test: int = 10, *, gz: bool = True) -> Path:
    """Four IDX files of random 28x28 images with labels cycling through 10 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n_train)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz=gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, gz=gz)
    return folder


@pytest.fixture
def no_default_sources(tmp_path, monkeypatch):
    """No $ADASAP_DATA, an empty Debian folder and cache, and a download that must not run."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "debian")
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    calls = []

    def fake_download(name, root, train=True):
        calls.append(name)
        raise UserError(f"{name} not found and its download failed (offline)")

    monkeypatch.setattr(data, "torchvision_download", fake_download)
    return calls


# --------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, gz=gz)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable


def test_read_idx_rejects_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(path)


@pytest.mark.parametrize("cut", [1, 6, 30])
def test_read_idx_rejects_truncated(tmp_path, cut):
    path = write_idx(tmp_path / "x", np.zeros((2, 4, 4)))
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_idx(path)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((50, 28, 28)), gz=True)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match="damaged"):
        read_idx(path)


# --------------------------------------------------------------------------- file lookup


def test_lookup_order_explicit_then_env_then_debian(tmp_path, monkeypatch, no_default_sources):
    explicit = write_fashion(tmp_path / "explicit", 20)
    env = write_fashion(tmp_path / "env", 30, gz=False)
    write_fashion(data.DEBIAN_FASHION_DIR, 40)
    monkeypatch.setenv(data.ENV_VAR, str(env))

    def train_size(data_dir=None):
        bundle = load_dataset("fashion-mnist", data_dir=data_dir, val_fraction=0)
        return len(bundle.train)

    assert train_size(explicit) == 20
    assert train_size() == 30
    monkeypatch.delenv(data.ENV_VAR)
    assert train_size() == 40
    assert no_default_sources == []


def test_lookup_falls_back_to_download(no_default_sources):
    with pytest.raises(UserError, match="download failed"):
        locate_idx_files("fashion-mnist")
    assert no_default_sources == ["fashion-mnist"]


def test_lookup_accepts_torchvision_layout(tmp_path, no_default_sources):
    write_fashion(tmp_path / "root" / "FashionMNIST" / "raw", 20)
    files = locate_idx_files("fashion-mnist", tmp_path / "root")
    assert set(files) == set(IDX_FILES)
    assert all("FashionMNIST" in str(p) for p in files.values())


def test_mnist_ignores_fashion_files_at_env_top(tmp_path, monkeypatch, no_default_sources):
    # Both datasets use the same file names, so a top-level folder means Fashion-MNIST only.
    monkeypatch.setenv(data.ENV_VAR, str(write_fashion(tmp_path / "env", 20)))
    with pytest.raises(UserError):
        locate_idx_files("mnist")
    write_fashion(tmp_path / "env" / "mnist", 30)
    assert len(load_dataset("mnist", val_fraction=0).train) == 30


def test_data_dir_missing_files_names_them(tmp_path, no_default_sources):
    folder = tmp_path / "partial"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((2, 28, 28)))
    with pytest.raises(UserError) as info:
        load_dataset("fashion-mnist", data_dir=folder)
    message = str(info.value)
    assert str(folder) in message and "\n" not in message
    assert "train-labels-idx1-ubyte" in message and "t10k-images-idx3-ubyte" in message
    assert "train-images-idx3-ubyte[" not in message


def test_mismatched_label_count_is_rejected(tmp_path, no_default_sources):
    folder = write_fashion(tmp_path / "d", 20)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(19), gz=True)
    with pytest.raises(UserError, match="does not match"):
        load_dataset("fashion-mnist", data_dir=folder)


def test_wrong_image_size_is_rejected(tmp_path, no_default_sources):
    folder = write_fashion(tmp_path / "d", 20)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((10, 32, 32)), gz=True)
    with pytest.raises(UserError, match="28x28"):
        load_dataset("fashion-mnist", data_dir=folder)


@pytest.mark.skipif(
    not (data.DEBIAN_FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    bundle = load_dataset("fashion-mnist", data_dir=data.DEBIAN_FASHION_DIR)
    assert len(bundle.train) + len(bundle.val) == 60000 and len(bundle.test) == 10000
    assert len(bundle.val) == 6000
    assert bundle.train.images.shape[1:] == (1, 28, 28)
    assert bundle.spec.num_classes == 10 and len(bundle.spec.class_names) == 10
    assert torch.bincount(bundle.test.labels).tolist() == [1000] * 10


# --------------------------------------------------------------------------- other datasets


def test_cifar_download_failure_is_user_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="--data-dir") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "cifar-10-python.tar.gz" in str(info.value)


def test_cifar_is_converted_to_nchw(tmp_path, monkeypatch):
    import torchvision.datasets

    class FakeCifar:
        classes = [f"c{i}" for i in range(10)]

        def __init__(self, root, train, download):
            n = 50 if train else 20
            self.data = np.zeros((n, 32, 32, 3), dtype=np.uint8)
            self.data[..., 2] = 7  # blue channel marks the channel axis
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCifar)
    bundle = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.2)
    assert bundle.train.images.shape == (40, 3, 32, 32) and len(bundle.test) == 20
    assert bundle.train.images[:, 2].eq(7).all() and bundle.train.images[:, :2].eq(0).all()
    assert bundle.spec.class_names == tuple(FakeCifar.classes)


def test_digits_offline_with_fixed_test_split():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=1)
    assert a.spec.num_classes == 10 and a.spec.channels == 1 and a.spec.image_size == 8
    assert a.train.images.shape[1:] == (1, 8, 8)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert abs(len(a.test) - 0.2 * 1797) < 10
    assert torch.equal(a.test.images, b.test.images)  # the holdout ignores the seed
    assert not torch.equal(a.val.images, b.val.images)
    assert a.train.images.max() == 255 and not a.train.hflip


def test_synthetic_is_deterministic_and_configurable():
    opts = {"num_classes": 4, "channels": 2, "image_size": 12, "num_train": 80, "num_test": 40}
    a, b = load_dataset("synthetic", **opts), load_dataset("synthetic", **opts)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert a.train.images.shape[1:] == (2, 12, 12) and len(a.test) == 40
    assert a.spec.num_classes == 4 and a.spec.channels == 2
    assert get_spec("synthetic", **opts) == a.spec


def test_synthetic_is_learnable():
    bundle = load_dataset("synthetic", val_fraction=0)
    train, test = bundle.train.float_images().flatten(1), bundle.test.float_images().flatten(1)
    k = bundle.spec.num_classes
    centroids = torch.stack([train[bundle.train.labels == c].mean(0) for c in range(k)])
    accuracy = (torch.cdist(test, centroids).argmin(1) == bundle.test.labels).float().mean()
    assert accuracy > 0.8  # chance is 0.1


def test_val_split_disjoint_stratified_and_seeded():
    def rows(images):
        return {bytes(r) for r in images.flatten(1).numpy()}

    a = load_dataset("synthetic", seed=3)
    assert len(a.train) == 900 and len(a.val) == 100
    assert torch.bincount(a.val.labels).tolist() == [10] * 10
    assert not rows(a.train.images) & rows(a.val.images)
    assert len(rows(a.train.images) | rows(a.val.images)) == 1000
    again, other = load_dataset("synthetic", seed=3), load_dataset("synthetic", seed=4)
    assert torch.equal(a.val.images, again.val.images)
    assert rows(a.val.images) != rows(other.val.images)


def test_limits_are_balanced_and_seeded():
    a = load_dataset("synthetic", train_limit=200, test_limit=30, seed=1)
    assert len(a.train) + len(a.val) == 200 and len(a.test) == 30
    assert torch.bincount(a.train.labels).tolist() == [18] * 10
    assert torch.bincount(a.test.labels).tolist() == [3] * 10
    b = load_dataset("synthetic", train_limit=200, test_limit=30, seed=1)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    big = load_dataset("synthetic", test_limit=10**6)
    assert len(big.test) == 200


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_limit": 0}, "train_limit"),
        ({"test_limit": -3}, "test_limit"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"colour": True}, "colour"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_bad_options_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        load_dataset("synthetic", **kwargs)


def test_options_rejected_for_fixed_datasets():
    with pytest.raises(UserError, match="takes no options"):
        get_spec("digits", image_size=32)


def test_unknown_dataset_lists_choices():
    with pytest.raises(UserError) as info:
        load_dataset("fmnist")
    message = str(info.value)
    for name in ("fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "synthetic"):
        assert name in message
    assert "imagefolder:<path>" in message


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    name = f"imagefolder:{tmp_path}"
    spec = get_spec(name, image_size=16)
    assert spec.class_names == ("cat", "dog") and spec.channels == 3 and spec.image_size == 16
    bundle = load_dataset(name, image_size=16, num_workers=0, val_fraction=0.2)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 2, 4)
    for augment in (False, True):
        got = list(batches(bundle.train, 3, shuffle=True, augment=augment, generator=None))
        assert [len(y) for _, y in got] == [3, 3, 2]
        x = torch.cat([x for x, _ in got])
        assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1
        assert sorted(torch.cat([y for _, y in got]).tolist()) == sorted(
            bundle.train.labels.tolist()
        )
    with pytest.raises(UserError, match="val"):
        get_spec(f"imagefolder:{tmp_path / 'train'}")


# --------------------------------------------------------------------------- batches


def indexed_set(n: int = 50, size: int = 16, hflip: bool = True) -> TensorImageSet:
    """Image i is filled with value i and has label i, so batches reveal which samples they hold."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, size, size)
    return TensorImageSet(images.contiguous(), torch.arange(n), hflip)


def test_batches_shapes_range_and_order():
    images = indexed_set()
    got = list(batches(images, 16, shuffle=False))
    assert [len(y) for _, y in got] == [16, 16, 16, 2] and num_batches(images, 16) == 4
    x, y = got[0]
    assert x.shape == (16, 2, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(torch.cat([y for _, y in got]), torch.arange(50))
    assert torch.allclose(x[:, 0, 0, 0], torch.arange(16) / 255)
    dropped = list(batches(images, 16, shuffle=False, drop_last=True))
    assert len(dropped) == num_batches(images, 16, drop_last=True) == 3


def test_shuffled_epoch_sees_every_sample_once():
    images = indexed_set()
    labels = [y for _, y in batches(images, 8, shuffle=True, generator=torch.Generator())]
    seen = torch.cat(labels)
    assert not torch.equal(seen, torch.arange(50))
    assert torch.equal(seen.sort().values, torch.arange(50))


def test_same_generator_seed_gives_identical_batches():
    bundle = load_dataset("synthetic", num_train=100)

    def epoch(seed):
        gen = torch.Generator().manual_seed(seed)
        return list(batches(bundle.train, 32, shuffle=True, generator=gen, augment=True))

    a, b, c = epoch(7), epoch(7), epoch(8)
    assert all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )
    assert not torch.equal(a[0][1], c[0][1])


def test_augmentation_changes_images_but_keeps_shape_and_range():
    bundle = load_dataset("synthetic", num_train=64, val_fraction=0)
    gen = torch.Generator().manual_seed(0)
    plain = next(batches(bundle.train, 64, shuffle=False))[0]
    augmented = next(batches(bundle.train, 64, shuffle=False, augment=True, generator=gen))[0]
    assert augmented.shape == plain.shape and augmented.dtype == torch.float32
    assert 0 <= augmented.min() and augmented.max() <= 1
    changed = (augmented != plain).flatten(1).any(1).float().mean()
    assert changed > 0.5


@pytest.mark.parametrize("hflip", [False, True])
def test_flip_only_when_allowed(hflip):
    # A bright pixel in column 0 moves at most `pad` columns unless the image is mirrored.
    n, size = 200, 16
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x[:, :, size // 2, 0] = 255
    out = augment_batch(x, generator=torch.Generator().manual_seed(0), hflip=hflip)
    assert out.shape == x.shape and out.dtype == torch.uint8
    cols = out.amax(dim=(1, 2)).float().argmax(1)
    visible = out.flatten(1).amax(1) > 0
    mirrored = (cols[visible] >= size - 3).float().mean()
    assert (mirrored > 0.3) if hflip else (mirrored == 0)
    assert cols[visible].min() == 0 and visible.float().mean() > 0.5


def test_channels_last_and_set_to_device():
    images = indexed_set().to("cpu")
    x, _ = next(batches(images, 8, shuffle=False, memory_format=torch.channels_last))
    assert x.is_contiguous(memory_format=torch.channels_last)
    sub = images.subset([3, 1])
    assert sub.labels.tolist() == [3, 1] and torch.equal(sub.float_images()[0], x[3])


def test_a_registered_dataset_loads_like_the_built_ins(monkeypatch):
    from adasap.data import DatasetSpec, datasets, register_dataset

    monkeypatch.setattr(datasets, "_REGISTRY", scratch_copy(datasets._REGISTRY))
    spec = DatasetSpec("tiny-test", 2, 1, 4, (0.5,), (0.5,))

    @register_dataset("tiny-test", spec, options={"count": 10})
    def load_tiny(spec, options, data_dir):
        n = options["count"]
        images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4)
        return (
            spec,
            TensorImageSet(images, torch.arange(n) % 2),
            TensorImageSet(images, torch.arange(n) % 2),
        )

    bundle = load_dataset("tiny-test", count=20, val_fraction=0.5)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (10, 10, 20)
    assert bundle.spec is spec and bundle.train.num_classes == 2
    with pytest.raises(UserError, match="takes only count, not size"):
        get_spec("tiny-test", size=3)
    with pytest.raises(UserError, match="tiny-test"):
        get_spec("nope")
