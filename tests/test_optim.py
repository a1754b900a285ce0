import copy
import math

import pytest
import torch
from torch import nn

from adasap.method.importance import radii_from_scores
from adasap.method.optim import SAM, AdaSAP, NeuronOwnership
from adasap.method.step import frozen_bn_statistics, sharpness_aware_step


def quadratic_setup():
    """L(w) = 0.5 * sum(a * w^2): the gradient a * w is known in closed form."""
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 1.0]]))
    a = torch.tensor([[1.0, 2.0], [0.5, 1.0], [3.0, 1.0]])
    return w, a, lambda: 0.5 * (a * w * w).sum()


def test_sam_perturbation_matches_hand_computation():
    w, a, loss_fn = quadratic_setup()
    opt = SAM([w], torch.optim.SGD, rho=0.3, lr=0.1)
    w0 = w.detach().clone()
    loss_fn().backward()
    opt.first_step()
    g = a * w0
    expected = w0 + 0.3 * g / g.norm()
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-7)


def test_asam_perturbation_matches_hand_computation():
    w, a, loss_fn = quadratic_setup()
    opt = SAM([w], torch.optim.SGD, rho=0.5, adaptive=True, eta=0.1, lr=0.1)
    w0 = w.detach().clone()
    loss_fn().backward()
    opt.first_step()
    g = a * w0
    t = w0.abs() + 0.1
    expected = w0 + 0.5 * t * t * g / (t * g).norm()
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-7)


def test_second_step_updates_with_gradient_at_perturbed_point():
    w, a, loss_fn = quadratic_setup()
    opt = SAM([w], torch.optim.SGD, rho=0.3, lr=0.1)
    w0 = w.detach().clone()
    loss_fn().backward()
    opt.step(lambda: loss_fn().backward())
    g = a * w0
    perturbed = w0 + 0.3 * g / g.norm()
    expected = w0 - 0.1 * a * perturbed
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-7)


def test_weights_restored_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3))
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.7, lr=0.1)
    model(torch.randn(5, 7)).pow(2).sum().backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(model[0].weight, before["0.weight"])
    opt.restore()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)
    )


def test_bn_running_stats_unchanged_by_second_pass():
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))
    model = bn_model()
    model(x)  # materialise the lazy layer
    reference = copy.deepcopy(model)
    reference.train()
    with torch.no_grad():
        reference(x)  # exactly one forward pass in training mode
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    sharpness_aware_step(model, opt, lambda: nn.functional.cross_entropy(model(x), y))
    bn, ref_bn = model[1], reference[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=0, atol=0)
    assert bn.num_batches_tracked == ref_bn.num_batches_tracked == 2


def test_frozen_bn_statistics_restores_flag():
    model = bn_model()
    with frozen_bn_statistics(model):
        assert not model[1].track_running_stats
    assert model[1].track_running_stats


def owned_linear():
    """A linear layer whose 4 output rows are neurons 0..3; the bias is unowned."""
    torch.manual_seed(1)
    layer = nn.Linear(3, 4)
    ownership = NeuronOwnership(4, {layer.weight: (0, torch.arange(4))})
    return layer, ownership


@pytest.mark.parametrize("adaptive", [False, True])
def test_adasap_with_equal_radii_is_exactly_sam(adaptive):
    layer, ownership = owned_linear()
    twin = copy.deepcopy(layer)
    x = torch.randn(6, 3)
    ada = AdaSAP(
        layer.parameters(),
        torch.optim.SGD,
        rho_min=0.2,
        rho_max=0.2,
        adaptive=adaptive,
        lr=0.1,
        momentum=0.9,
    )
    ada.set_radii(ownership, torch.full((4,), 0.2))
    sam = SAM(twin.parameters(), torch.optim.SGD, rho=0.2, adaptive=adaptive, lr=0.1, momentum=0.9)
    for _ in range(3):
        layer(x).pow(2).sum().backward()
        ada.step(lambda: layer(x).pow(2).sum().backward())
        ada.zero_grad()
        twin(x).pow(2).sum().backward()
        sam.step(lambda: twin(x).pow(2).sum().backward())
        sam.zero_grad()
    # equal up to float32 rounding of radius-tensor vs scalar products
    torch.testing.assert_close(layer.weight, twin.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.bias, twin.bias, rtol=0, atol=1e-6)


def test_adasap_global_perturbation_matches_hand_computation():
    layer, ownership = owned_linear()
    x = torch.randn(6, 3)
    opt = AdaSAP(layer.parameters(), torch.optim.SGD, rho_min=0.05, rho_max=0.5, lr=0.1)
    radii = torch.tensor([0.5, 0.1, 0.3, 0.05])
    opt.set_radii(ownership, radii)
    layer(x).pow(2).sum().backward()
    g_w, g_b = layer.weight.grad.clone(), layer.bias.grad.clone()
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    norm = torch.cat([g_w.flatten(), g_b]).norm()
    opt.first_step()
    torch.testing.assert_close(layer.weight.detach(), w0 + radii[:, None] * g_w / norm)
    torch.testing.assert_close(layer.bias.detach(), b0 + 0.05 * g_b / norm)  # rho_min


def test_adasap_neuron_normalisation_matches_hand_computation():
    layer, ownership = owned_linear()
    x = torch.randn(6, 3)
    opt = AdaSAP(
        layer.parameters(),
        torch.optim.SGD,
        rho_min=0.05,
        rho_max=0.5,
        normalization="neuron",
        lr=0.1,
    )
    radii = torch.tensor([0.5, 0.1, 0.3, 0.05])
    opt.set_radii(ownership, radii)
    layer(x).pow(2).sum().backward()
    g_w, g_b = layer.weight.grad.clone(), layer.bias.grad.clone()
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt.first_step()
    per_row = radii[:, None] * g_w / g_w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer.weight.detach(), w0 + per_row)
    torch.testing.assert_close(layer.bias.detach(), b0 + 0.05 * g_b / g_b.norm())
    # every neuron is moved by exactly its own radius
    torch.testing.assert_close((layer.weight.detach() - w0).norm(dim=1), radii)


def two_neurons():
    """Neuron 0 owns row 0 (gradient norm 5), neuron 1 row 1 (norm 1); the bias is unowned."""
    w = nn.Parameter(torch.zeros(2, 2))
    b = nn.Parameter(torch.zeros(1))
    w.grad = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    b.grad = torch.tensor([2.0])
    return w, b, NeuronOwnership(2, {w: (0, torch.arange(2))})


def test_adasap_scaled_neuron_normalisation_matches_hand_computation():
    w, b, ownership = two_neurons()
    opt = AdaSAP([w, b], torch.optim.SGD, rho_min=0.05, rho_max=0.4,
                 normalization="neuron-scaled", lr=0.1)  # fmt: skip
    opt.set_radii(ownership, torch.tensor([0.4, 0.1]))
    e = opt.perturbations()
    # global form: ||e||^2 = sum rho_i^2 ||g_i||^2 / ||g||^2, ||g||^2 = 25 + 1 + 4
    global_sq = (0.4**2 * 25 + 0.1**2 * 1 + 0.05**2 * 4) / 30
    # per-neuron form: ||e||^2 = sum rho_i^2, the unowned bias being one block at rho_min
    neuron_sq = 0.4**2 + 0.1**2 + 0.05**2
    c = math.sqrt(global_sq / neuron_sq)
    expected_w = torch.tensor([[0.4 * 0.6, 0.4 * 0.8], [0.0, 0.1]]) * c
    torch.testing.assert_close(e[w], expected_w)
    torch.testing.assert_close(e[b], torch.tensor([0.05 * c]))
    total = torch.cat([e[w].flatten(), e[b]]).norm()
    torch.testing.assert_close(total, torch.tensor(math.sqrt(global_sq)))


def random_conv_model(seed):
    """A conv + BN + linear model with random gradients; neurons = conv output channels.

    Neuron 5 has no gradient at all (its per-neuron direction is zero); the BN bias and the
    linear layer are owned by no neuron.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(24, 4))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * torch.rand(()) * 5
    ids = torch.arange(6)
    owners = {model[0].weight: (0, ids), model[0].bias: (0, ids), model[1].weight: (0, ids)}
    for p in owners:
        p.grad[5] = 0.0
    return model, NeuronOwnership(6, owners)


def adasap_perturbations(model, ownership, radii, normalization, adaptive=False):
    opt = AdaSAP(model.parameters(), torch.optim.SGD, rho_min=0.02, rho_max=0.3,
                 normalization=normalization, adaptive=adaptive, lr=0.1)  # fmt: skip
    opt.set_radii(ownership, radii)
    return opt.perturbations()


def total_norm(perturbations):
    return torch.cat([e.flatten() for e in perturbations.values()]).norm()


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_scaled_neuron_norm_equals_global_norm(seed, adaptive):
    model, ownership = random_conv_model(seed)
    radii = 0.02 + torch.rand(6) * 0.28
    forms = {
        n: adasap_perturbations(model, ownership, radii, n, adaptive)
        for n in ("global", "neuron", "neuron-scaled")
    }
    torch.testing.assert_close(total_norm(forms["neuron-scaled"]), total_norm(forms["global"]))
    # the unscaled per-neuron form is the larger one this fixes
    assert total_norm(forms["neuron"]) > 1.5 * total_norm(forms["global"])


def test_scaled_neuron_keeps_the_per_neuron_direction():
    model, ownership = random_conv_model(0)
    radii = torch.tensor([0.3, 0.02, 0.1, 0.2, 0.05, 0.15])
    e = adasap_perturbations(model, ownership, radii, "neuron-scaled")
    conv = model[0]
    slices = [torch.cat([conv.weight.grad[i].flatten(), conv.bias.grad[i : i + 1],
                         model[1].weight.grad[i : i + 1]]) for i in range(6)]  # fmt: skip
    moves = [torch.cat([e[conv.weight][i].flatten(), e[conv.bias][i : i + 1],
                        e[model[1].weight][i : i + 1]]) for i in range(6)]  # fmt: skip
    # each neuron moves along its own gradient, by its radius times one shared factor
    factors = []
    for g, m, rho in zip(slices[:5], moves[:5], radii[:5], strict=True):
        torch.testing.assert_close(m, g / g.norm() * m.norm())
        factors.append(m.norm() / rho)
    torch.testing.assert_close(torch.stack(factors), torch.full((5,), factors[0].item()))
    assert factors[0] < 1  # shrunk: the per-neuron form's norm is ~sqrt(5 + 1) radii
    assert not moves[5].any()  # no gradient, no move


def test_scaled_neuron_with_equal_radii_has_sams_length():
    model, ownership = random_conv_model(1)
    opt = AdaSAP(model.parameters(), torch.optim.SGD, rho_min=0.3, rho_max=0.3,
                 normalization="neuron-scaled", lr=0.1)  # fmt: skip
    opt.set_radii(ownership, torch.full((6,), 0.3))
    # SAM's step length with the per-neuron direction; unscaled it would be 0.3 * sqrt(5 + 1),
    # and a factor from sqrt(sum rho_i^2) would count the gradient-free neuron 5
    torch.testing.assert_close(total_norm(opt.perturbations()), torch.tensor(0.3))


def test_lower_score_neurons_get_larger_perturbations():
    layer, ownership = owned_linear()
    with torch.no_grad():
        layer.weight.copy_(torch.ones(4, 3))
    scores = torch.tensor([3.0, 0.5, 2.0, 1.0])
    radii = radii_from_scores(scores, rho_min=0.01, rho_max=0.4)
    opt = AdaSAP(layer.parameters(), torch.optim.SGD, rho_min=0.01, rho_max=0.4, lr=0.1)
    opt.set_radii(ownership, radii)
    layer.weight.grad = torch.ones(4, 3)  # the same gradient for every neuron
    layer.bias.grad = torch.zeros(4)
    moves = opt.perturbations()[layer.weight].norm(dim=1)
    assert torch.equal(torch.argsort(moves), torch.argsort(scores, descending=True))


def test_radii_from_scores_linear_map():
    radii = radii_from_scores(torch.tensor([1.0, 3.0, 2.0]), rho_min=0.1, rho_max=0.5)
    torch.testing.assert_close(radii, torch.tensor([0.5, 0.1, 0.3]))
    flat = radii_from_scores(torch.tensor([2.0, 2.0]), rho_min=0.1, rho_max=0.5)
    torch.testing.assert_close(flat, torch.tensor([0.3, 0.3]))
    per_group = radii_from_scores(
        torch.tensor([1.0, 2.0, 10.0, 30.0]), 0.0, 1.0, group_index=torch.tensor([0, 0, 1, 1])
    )
    torch.testing.assert_close(per_group, torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_gradient_clipping_applies_to_update_gradient():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = SAM([w], torch.optim.SGD, rho=0.0, lr=1.0, max_grad_norm=1.0)
    w0 = w.detach().clone()
    sharpness_aware_step(nn.Module(), opt, lambda: 0.5 * (w * w).sum())
    # gradient (3, 4) has norm 5, clipped to norm 1
    torch.testing.assert_close(w.detach(), w0 - w0 / 5.0)


def test_state_dict_round_trips_momentum():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    x = torch.randn(8, 4)
    for _ in range(2):
        sharpness_aware_step(model, opt, lambda: model(x).pow(2).mean())
    saved = opt.state_dict()
    fresh = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    fresh.load_state_dict(saved)
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])
        assert fresh.base_optimizer.state[p] is fresh.state[p]
        assert "old_p" not in fresh.state[p]


def make_optimizer(kind, params, ownership=None):
    common = dict(lr=0.05, momentum=0.9)
    if kind == "sgd":
        return torch.optim.SGD(params, **common)
    if kind in ("sam", "asam"):
        return SAM(params, torch.optim.SGD, rho=0.05, adaptive=kind == "asam", **common)
    normalization = kind.removeprefix("adasap-") if "neuron" in kind else "global"
    opt = AdaSAP(
        params,
        torch.optim.SGD,
        rho_min=0.01,
        rho_max=0.1,
        normalization=normalization,
        adaptive=kind == "adasap-asam",
        **common,
    )
    opt.set_radii(ownership, torch.linspace(0.01, 0.1, ownership.num_neurons))
    return opt


@pytest.mark.parametrize(
    "kind",
    ["sgd", "sam", "asam", "adasap", "adasap-neuron", "adasap-neuron-scaled", "adasap-asam"],
)
def test_loss_falls_on_toy_problem(kind):
    torch.manual_seed(0)
    x = torch.randn(128, 5)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    ownership = NeuronOwnership(
        16, {model[0].weight: (0, torch.arange(16)), model[1].weight: (0, torch.arange(16))}
    )
    opt = make_optimizer(kind, model.parameters(), ownership)
    loss = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    first = loss().item()
    for _ in range(60):
        sharpness_aware_step(model, opt, loss)
    assert loss().item() < 0.5 * first


@pytest.mark.parametrize(
    "kwargs",
    [dict(rho=-0.1), dict(eta=-1.0), dict(max_grad_norm=0.0)],
)
def test_sam_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SAM([nn.Parameter(torch.ones(1))], torch.optim.SGD, lr=0.1, **kwargs)


def test_adasap_rejects_bad_arguments():
    p = [nn.Parameter(torch.ones(1))]
    with pytest.raises(ValueError, match="rho_min <= rho_max"):
        AdaSAP(p, torch.optim.SGD, rho_min=0.5, rho_max=0.1, lr=0.1)
    # one error that names every accepted value
    with pytest.raises(ValueError, match="'global', 'neuron', 'neuron-scaled', got 'layer'"):
        AdaSAP(p, torch.optim.SGD, normalization="layer", lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        opt = AdaSAP(p, torch.optim.SGD, lr=0.1)
        opt.set_radii(NeuronOwnership(3, {}), torch.ones(2))


@pytest.mark.parametrize("normalization", ["global", "neuron", "neuron-scaled"])
def test_adasap_state_dict_carries_the_radii_and_ownership(normalization):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    ownership = NeuronOwnership(
        6, {model[0].weight: (0, torch.arange(6)), model[0].bias: (0, torch.arange(6))}
    )

    def adasap():
        return AdaSAP(model.parameters(), torch.optim.SGD, rho_min=0.01, rho_max=0.3,
                      normalization=normalization, lr=0.1, momentum=0.9)  # fmt: skip

    opt = adasap()
    opt.set_radii(ownership, torch.linspace(0.01, 0.3, 6))
    x = torch.randn(8, 5)
    sharpness_aware_step(model, opt, lambda: model(x).pow(2).mean())
    saved = opt.state_dict()
    fresh = adasap()
    fresh.load_state_dict(saved)
    model(x).pow(2).mean().backward()
    expected = opt.perturbations()
    restored = fresh.perturbations()
    assert fresh.ownership.num_neurons == 6
    for p in model.parameters():
        torch.testing.assert_close(restored[p], expected[p], rtol=0, atol=0)
    # without the radii every neuron would fall back to rho_min: a different perturbation
    plain = adasap().perturbations()
    assert not torch.allclose(plain[model[0].bias], expected[model[0].bias])
