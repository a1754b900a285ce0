import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adasap.robustness.sharpness import top_hessian_eigenvalue, worst_case_loss_increase


def mse(out, y):
    return F.mse_loss(out.squeeze(1), y)


@pytest.fixture
def least_squares():
    """A linear least-squares problem: L(w) = mean over all rows of (x.w + b - y)^2."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()
    x = torch.randn(48, 5, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5, 2.0, 1.0])
    y = torch.randn(48, dtype=torch.float64)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    # the Hessian of the mean squared error in (w, b) is 2/n * A^T A with A = [x, 1]
    a = np.concatenate([x.numpy(), np.ones((48, 1))], axis=1)
    return model, batches, a, y.numpy()


def test_top_eigenvalue_matches_closed_form(least_squares):
    model, batches, a, _ = least_squares
    hessian = 2 / len(a) * a.T @ a
    expected = np.linalg.eigvalsh(hessian).max()
    got = top_hessian_eigenvalue(model, batches, iterations=200, tol=1e-10, loss_fn=mse)
    assert got == pytest.approx(expected, rel=1e-2)


def test_loss_increase_matches_hand_computation(least_squares):
    model, batches, a, y = least_squares
    w = np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy()])
    loss = lambda v: np.mean((a @ v - y) ** 2)  # noqa: E731
    g = 2 / len(a) * a.T @ (a @ w - y)
    rho = 0.3
    expected = loss(w + rho * g / np.linalg.norm(g)) - loss(w)
    got = worst_case_loss_increase(model, batches, rho, loss_fn=mse)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got > 0


@pytest.fixture
def small_net():
    """A conv net with BatchNorm, in train mode, whose running statistics must not change."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    model.train()
    x = torch.rand(2, 8, 1, 8, 8)
    y = torch.randint(0, 3, (2, 8))
    return model, list(zip(x, y, strict=True))


def test_weights_buffers_and_mode_restored(small_net):
    model, batches = small_net
    before = {k: v.clone() for k, v in model.state_dict().items()}
    worst_case_loss_increase(model, batches, rho=0.5)
    top_hessian_eigenvalue(model, batches, iterations=3)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_deterministic(small_net):
    model, batches = small_net
    first = (
        worst_case_loss_increase(model, batches, rho=0.1),
        top_hessian_eigenvalue(model, batches, iterations=5, seed=3),
    )
    second = (
        worst_case_loss_increase(model, batches, rho=0.1),
        top_hessian_eigenvalue(model, batches, iterations=5, seed=3),
    )
    assert first == second
    assert all(np.isfinite(first))


def test_empty_batches_rejected(small_net):
    model, _ = small_net
    with pytest.raises(ValueError, match="non-empty"):
        worst_case_loss_increase(model, [], rho=0.1)
