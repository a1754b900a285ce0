"""Sharpness-aware optimizers: SAM/ASAM and AdaSAP's per-neuron adaptive perturbation.

The API follows davda54/sam: the optimizer wraps a base optimizer, and one update is
``loss.backward(); opt.first_step(zero_grad=True); loss_fn().backward(); opt.second_step()``.
:func:`adasap.method.step.sharpness_aware_step` runs that sequence in a training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

# How AdaSAP normalises its perturbation (docs/method.md, "Perturbation normalisations").
Normalization = Literal["global", "neuron", "neuron-scaled"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)


def _total_norm(tensors: Iterable[Tensor]) -> Tensor:
    """The L2 norm of several tensors taken as one vector (on the first one's device)."""
    norms = [t.norm(2) for t in tensors]
    if not norms:
        return torch.zeros(())
    return torch.stack([n.to(norms[0].device) for n in norms]).norm(2)


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization (Foret et al. 2021), optionally scale-invariant (ASAM).

    Args:
        params: parameters or parameter groups, as for any optimizer.
        base_optimizer: optimizer class (e.g. ``torch.optim.SGD``) that makes the actual update
            with the gradient taken at the perturbed weights.
        rho: perturbation radius.
        adaptive: ASAM scaling ``e = rho * T^2 g / ||T g||`` with ``T = |w| + eta``.
        eta: ASAM's offset that keeps zero weights perturbable.
        max_grad_norm: if set, the gradient used for the update (the one at the perturbed
            weights) is clipped to this global norm before the base optimizer steps.
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay, ...).

    The optimizer state is shared with the base optimizer, so ``state_dict()`` holds the
    base optimizer's moments and round-trips through ``load_state_dict``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.state = self.base_optimizer.state

    def _params_with_grad(self) -> list[tuple[dict[str, Any], Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _scaled_gradient(self, group: dict[str, Any], p: Tensor) -> Tensor:
        """The direction before normalisation: g, or T^2 g for ASAM."""
        if group["adaptive"]:
            return (p.detach().abs() + group["eta"]).pow(2) * p.grad
        return p.grad

    def _norm_gradient(self, group: dict[str, Any], p: Tensor) -> Tensor:
        """The vector whose norm normalises the perturbation: g, or T g for ASAM."""
        if group["adaptive"]:
            return (p.detach().abs() + group["eta"]) * p.grad
        return p.grad

    def _global_norm(self, pairs: list[tuple[dict[str, Any], Tensor]]) -> Tensor:
        return _total_norm(self._norm_gradient(g, p) for g, p in pairs)

    def perturbations(self) -> dict[Tensor, Tensor]:
        """The weight perturbation e(w) for every parameter that has a gradient."""
        pairs = self._params_with_grad()
        norm = self._global_norm(pairs)
        return {
            p: self._scaled_gradient(g, p) * g["rho"] / (norm.to(p.device) + 1e-12)
            for g, p in pairs
        }

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to the worst-case weights w + e(w); the gradient there is taken next."""
        perturbations = self.perturbations()
        finite = all(torch.isfinite(e).all() for e in perturbations.values())
        for p, e in perturbations.items():
            # A non-finite gradient (AMP overflow) gives no usable direction: stay at w,
            # and let the grad scaler skip the update.
            self.state[p]["old_p"] = p.detach().clone()
            if finite:
                p.add_(e)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def restore(self) -> None:
        """Return every perturbed parameter to its exact weights from before first_step."""
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state.get(p, {}).pop("old_p", None)
                if old is not None:
                    p.copy_(old)

    def clip_gradients(self) -> None:
        if self.max_grad_norm is not None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights and update them with the gradient from the perturbed point."""
        self.restore()
        self.clip_gradients()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        """One SAM update; the gradient at w must already be computed (as in davda54/sam).

        ``closure`` must run a full forward and backward pass on the same batch.
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes forward and backward")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state


@dataclass
class NeuronOwnership:
    """Which neuron owns each output channel of each parameter.

    ``owners[p] = (dim, ids)``: along dimension ``dim`` of ``p``, channel ``c`` belongs to neuron
    ``ids[c]`` (an index into ``range(num_neurons)``). Parameters not listed belong to no
    prunable neuron.
    """

    num_neurons: int
    owners: dict[Tensor, tuple[int, Tensor]]


def _broadcast_along(values: Tensor, dim: int, like: Tensor) -> Tensor:
    shape = [1] * like.dim()
    shape[dim] = -1
    return values.view(shape)


class AdaSAP(SAM):
    """SAM with a radius per neuron: ``e_i = rho_i * g_i / ||g||`` (AdaSAP, Bair et al. 2024).

    Before :meth:`set_radii` is called, and for parameters owned by no neuron, the radius is
    ``rho_min``; with ``rho_min == rho_max`` AdaSAP is exactly SAM (or ASAM with ``adaptive``).

    Args:
        rho_min: the smallest radius (given to the most important neurons).
        rho_max: the largest radius (given to the least important neurons).
        normalization: ``"global"`` divides by the norm of the whole gradient (default);
            ``"neuron"`` divides each neuron's slice by the norm of that neuron's gradient;
            ``"neuron-scaled"`` keeps the per-neuron direction and rescales all of it by one
            factor so that its total norm equals the global form's (docs/method.md).
        Other arguments as for :class:`SAM`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho_min: float = 0.01,
        rho_max: float = 0.1,
        normalization: Normalization = "global",
        adaptive: bool = False,
        eta: float = 0.01,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not 0 <= rho_min <= rho_max:
            raise ValueError(f"need 0 <= rho_min <= rho_max, got {rho_min}, {rho_max}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {', '.join(map(repr, NORMALIZATIONS))}, "
                f"got {normalization!r}"
            )
        super().__init__(
            params,
            base_optimizer,
            rho=rho_min,
            adaptive=adaptive,
            eta=eta,
            max_grad_norm=max_grad_norm,
            **base_kwargs,
        )
        self.rho_min = rho_min
        self.rho_max = rho_max
        self.normalization = normalization
        self.ownership: NeuronOwnership | None = None
        self.neuron_radii: Tensor | None = None

    def set_radii(self, ownership: NeuronOwnership, radii: Tensor) -> None:
        """Give neuron ``i`` the radius ``radii[i]``."""
        if radii.shape != (ownership.num_neurons,):
            raise ValueError(
                f"radii must have shape ({ownership.num_neurons},), got {tuple(radii.shape)}"
            )
        self.ownership = ownership
        self.neuron_radii = radii.detach().float()

    def _indexed_params(self) -> list[Tensor]:
        """Parameters in the order ``state_dict`` numbers them."""
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state plus the per-neuron radii and which neuron owns what.

        Ownership is stored by parameter index, as the optimizer state is, so a checkpoint
        restores AdaSAP's perturbation exactly (davda54/sam keeps rho in ``param_groups``).
        """
        state = super().state_dict()
        if self.ownership is not None:
            index = {p: i for i, p in enumerate(self._indexed_params())}
            state["neurons"] = {
                "count": self.ownership.num_neurons,
                "radii": self.neuron_radii.clone(),
                "owners": {
                    index[p]: (dim, ids.clone())
                    for p, (dim, ids) in self.ownership.owners.items()
                    if p in index
                },
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        neurons = state_dict.pop("neurons", None)
        super().load_state_dict(state_dict)
        if neurons is None:
            self.ownership, self.neuron_radii = None, None
            return
        params = self._indexed_params()
        owners = {params[i]: (dim, ids) for i, (dim, ids) in neurons["owners"].items()}
        self.set_radii(NeuronOwnership(neurons["count"], owners), neurons["radii"])

    def _radius_of(self, p: Tensor) -> Tensor | float:
        if self.ownership is None or p not in self.ownership.owners:
            return self.rho_min
        dim, ids = self.ownership.owners[p]
        radii = self.neuron_radii.to(p.device)[ids.to(p.device)]
        return _broadcast_along(radii, dim, p)

    def _neuron_norms(self, pairs: list[tuple[dict[str, Any], Tensor]]) -> tuple[Tensor, Tensor]:
        """Squared gradient norm per neuron, and that of all parameters owned by no neuron."""
        assert self.ownership is not None
        device = pairs[0][1].device
        per_neuron = torch.zeros(self.ownership.num_neurons, device=device)
        unowned = torch.zeros((), device=device)
        for g, p in pairs:
            squared = self._norm_gradient(g, p).pow(2)
            if p in self.ownership.owners:
                dim, ids = self.ownership.owners[p]
                reduce_dims = [d for d in range(p.dim()) if d != dim]
                per_channel = squared.sum(dim=reduce_dims) if reduce_dims else squared
                per_neuron.index_add_(0, ids.to(device), per_channel.float())
            else:
                unowned = unowned + squared.sum().float()
        return per_neuron, unowned

    def _global_perturbations(
        self, pairs: list[tuple[dict[str, Any], Tensor]]
    ) -> dict[Tensor, Tensor]:
        norm = self._global_norm(pairs)
        return {
            p: self._scaled_gradient(g, p) * self._radius_of(p) / (norm.to(p.device) + 1e-12)
            for g, p in pairs
        }

    def _global_perturbation_norm(self, pairs: list[tuple[dict[str, Any], Tensor]]) -> Tensor:
        """``||e||`` of the global form at the current radii, without keeping its tensors."""
        numerator = _total_norm(self._scaled_gradient(g, p) * self._radius_of(p) for g, p in pairs)
        return numerator / (self._global_norm(pairs).to(numerator.device) + 1e-12)

    def _neuron_perturbations(
        self, pairs: list[tuple[dict[str, Any], Tensor]]
    ) -> dict[Tensor, Tensor]:
        assert self.ownership is not None
        per_neuron, unowned = self._neuron_norms(pairs)
        per_neuron, unowned = per_neuron.sqrt(), unowned.sqrt()
        result = {}
        for g, p in pairs:
            if p in self.ownership.owners:
                dim, ids = self.ownership.owners[p]
                norm = _broadcast_along(per_neuron[ids.to(per_neuron.device)], dim, p)
            else:
                norm = unowned
            result[p] = self._scaled_gradient(g, p) * self._radius_of(p) / (norm + 1e-12)
        return result

    def perturbations(self) -> dict[Tensor, Tensor]:
        pairs = self._params_with_grad()
        if not pairs:
            return {}
        if self.normalization == "global" or self.ownership is None:
            return self._global_perturbations(pairs)
        result = self._neuron_perturbations(pairs)
        if self.normalization == "neuron-scaled":
            # One factor for every neuron keeps the per-neuron direction and the ratios of the
            # radii; dividing by the actual norm (not sqrt(sum rho_i^2)) leaves out neurons
            # whose gradient is zero, so the total norm matches the global form's exactly.
            target = self._global_perturbation_norm(pairs)
            scale = target / (_total_norm(result.values()).to(target.device) + 1e-12)
            for e in result.values():
                e.mul_(scale.to(e.device))
        return result
