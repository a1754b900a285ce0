import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The tests' tensors are small, and a 2-thread pool spins badly when the two cores are
    shared with another process: one thread keeps the suite fast and its timing steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def local_ray(tmp_path, monkeypatch):
    """A 2-CPU local Ray cluster whose workers share this test's adasap cache (skipped without
    ray), shut down after the test."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path / "cache"))
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={
        "env_vars": {"ADASAP_CACHE": str(tmp_path / "cache")}})  # fmt: skip
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_classification():
    """100 synthetic 10 px one-channel training images of 3 classes (and 20 test images):
    data a whole pruning run (dense, three phases) goes through in seconds."""
    from adasap.data import load_dataset

    return load_dataset(
        "synthetic", num_train=100, num_test=20, image_size=10, channels=1, num_classes=3
    )


@pytest.fixture(scope="module")
def tiny_resnet(tiny_classification):
    """An untrained ResNet-20 (seed 0) for :func:`tiny_classification`."""
    from adasap.models.builders import build_model

    torch.manual_seed(0)
    s = tiny_classification.spec
    return build_model("resnet20", num_classes=s.num_classes, in_channels=s.channels,
                       image_size=s.image_size, mean=s.mean, std=s.std)  # fmt: skip
