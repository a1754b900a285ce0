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
