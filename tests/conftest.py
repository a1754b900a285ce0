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
