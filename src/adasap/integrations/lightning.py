"""AdaSAP inside PyTorch Lightning's automatic optimization (``pip install adasap[lightning]``).

Lightning calls ``optimizer.step(closure)`` with a closure that runs ``training_step``,
``zero_grad`` and ``backward``. :class:`AdaSAPCallback` puts a :class:`PrunerOptimizer` in
the trainer whose ``step`` is one :meth:`Pruner.step <adasap.method.pruner.Pruner.step>`:
the pruner calls Lightning's closure once, or twice for a sharpness-aware step, removes
neurons when the schedule says so and replaces its optimizer. The trainer keeps the same
:class:`PrunerOptimizer`, whose parameter groups and state are always the pruner's current
optimizer's, so nothing in Lightning holds a stale optimizer after a removal::

    trainer = L.Trainer(max_steps=schedule.total_steps,
                        callbacks=[AdaSAPCallback(schedule, keep=0.5)])
    trainer.fit(module)  # configure_optimizers returns the base optimizer only

See docs/lightning.md for what is supported, resuming, and the manual-optimization recipe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from adasap.errors import UserError
from adasap.method.importance import DEFAULT_CRITERION, Importance
from adasap.method.pruner import Pruner, PrunerSettings
from adasap.method.schedule import PhaseSchedule
from adasap.method.target import PruningTarget

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import SingleDeviceStrategy
except ImportError as error:
    raise UserError(
        "the Lightning integration needs PyTorch Lightning: pip install adasap[lightning]"
    ) from error


_ONE_OPTIMIZER = (
    "configure_optimizers must return one base optimizer and no LR scheduler: pass "
    "lr_scheduler=lambda optimizer: ... to AdaSAPCallback (the pruner rebuilds both)"
)


class PrunerOptimizer(torch.optim.Optimizer):
    """The optimizer Lightning holds: each ``step(closure)`` is one ``pruner.step``.

    Its parameter groups, state and state dict are those of ``pruner.optimizer`` at the time
    they are read, so learning-rate monitors, gradient clipping and checkpoints follow the
    optimizer the pruner builds after each removal or phase change.
    """

    def __init__(self, pruner: Pruner, module: pl.LightningModule) -> None:
        # No Optimizer.__init__: every piece of optimizer state is the pruner's.
        self.pruner = pruner
        self.module = module

    @property
    def current(self) -> torch.optim.Optimizer:
        return self.pruner.optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.pruner.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.pruner.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.pruner.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.pruner.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.pruner.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruner.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise UserError(
            "the pruner builds its optimizer's parameter groups: give every parameter group "
            "to the optimizer configure_optimizers returns"
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise UserError(
                "Lightning stepped the optimizer without a closure (float16 precision with a "
                "grad scaler does): use precision='bf16-mixed' or 32, or the manual recipe in "
                "docs/lightning.md"
            )
        return self.pruner.step(_ForwardClosure(closure, self.module))


class _ForwardClosure:
    """Lightning's closure (training_step, zero_grad, backward) as the pruner's loss closure.

    The gradients are in place when Lightning's closure returns, so the pruner gets a copy of
    the loss whose ``backward`` reaches no parameter. ``self.log`` in ``training_step`` takes
    effect in the first call of each step only: later calls see perturbed weights.
    """

    def __init__(self, closure: Callable[[], Tensor | None], module: pl.LightningModule) -> None:
        self.closure, self.module, self.calls = closure, module, 0

    def __call__(self) -> Tensor:
        with _logging_off(self.module) if self.calls else contextlib.nullcontext():
            loss = self.closure()
        self.calls += 1
        if loss is None:
            raise UserError(
                "training_step returned None: return the batch's loss (a sharpness-aware step "
                "cannot be skipped)"
            )
        return loss.detach().requires_grad_()


@contextlib.contextmanager
def _logging_off(module: pl.LightningModule) -> Iterator[None]:
    def ignore(*args: Any, **kwargs: Any) -> None:
        return None

    module.log = module.log_dict = ignore
    try:
        yield
    finally:
        del module.log, module.log_dict


class AdaSAPCallback(pl.Callback):
    """Prune a LightningModule with AdaSAP (or a baseline) inside ``trainer.fit``.

    The module is pruned in place through its ``forward``; ``configure_optimizers`` returns
    the base optimizer only (e.g. SGD with momentum), whose class, defaults and parameter
    groups the pruner reuses. Steps are optimizer steps, so ``Trainer(max_steps=
    schedule.total_steps)`` runs the whole schedule. Pass a learning-rate schedule as
    ``lr_scheduler`` (the pruner rebuilds it with the optimizer), not from
    ``configure_optimizers``.

    Args:
        schedule: the phases in optimizer steps.
        example_inputs: a batch the module's ``forward`` accepts, for tracing and sizes;
            by default the first sample of the first training batch (its first element when
            the batch is a tuple or list).
        method, keep, criterion, lr_scheduler, ignored_layers, settings, overrides: as for
            :class:`~adasap.method.pruner.Pruner`.

    Supports one device, automatic optimization, no gradient accumulation, and precisions
    without a grad scaler (32, bf16-mixed). Resuming with ``trainer.fit(ckpt_path=...)`` on a
    fresh dense module re-applies the removals before Lightning loads the pruned weights.
    """

    def __init__(
        self,
        schedule: PhaseSchedule,
        *,
        example_inputs: Tensor | None = None,
        method: str = "adasap",
        keep: float | PruningTarget = 0.5,
        criterion: str | Importance = DEFAULT_CRITERION,
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        ignored_layers: Sequence[nn.Module] | None = None,
        settings: PrunerSettings | None = None,
        **overrides: Any,
    ) -> None:
        self.schedule, self.example_inputs = schedule, example_inputs
        self.pruner_options = dict(
            method=method,
            keep=keep,
            criterion=criterion,
            lr_scheduler=lr_scheduler,
            ignored_layers=ignored_layers,
            settings=settings,
            **overrides,
        )
        self.pruner: Pruner | None = None
        self._replaced_hook: Callable[[dict[str, Any]], None] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_trainer(trainer, pl_module)
        # Lightning loads the weights right after the module's on_load_checkpoint and before
        # any callback hook, so the removals are re-applied from there.
        user_hook = pl_module.on_load_checkpoint
        self._replaced_hook = pl_module.__dict__.get("on_load_checkpoint")

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            self._restore(trainer, pl_module, checkpoint)
            user_hook(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._unhook(pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._unhook(pl_module)  # Lightning skips teardown hooks when fit fails

    def _unhook(self, pl_module: pl.LightningModule) -> None:
        pl_module.__dict__.pop("on_load_checkpoint", None)
        if self._replaced_hook is not None:
            pl_module.on_load_checkpoint = self._replaced_hook

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1 or trainer.lr_scheduler_configs:
            raise UserError(_ONE_OPTIMIZER)
        if self.pruner is None and self.example_inputs is not None:
            self._build(pl_module, self.example_inputs, trainer.optimizers[0])
        if self.pruner is not None:
            self._install(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pruner is None:
            self._build(pl_module, _first_sample(batch), trainer.optimizers[0])
            self._install(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        if self.pruner is None:
            return {}
        return {"pruner": self.pruner.state_dict(), "example_inputs": self.pruner.example.cpu()}

    def _build(
        self, pl_module: pl.LightningModule, example: Tensor, optimizer: torch.optim.Optimizer
    ) -> None:
        example = example.to(pl_module.device)
        self.pruner = Pruner(
            pl_module, example, self.schedule, optimizer=optimizer, **self.pruner_options
        )

    def _install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.pruner is not None
        trainer.strategy.optimizers = [PrunerOptimizer(self.pruner, pl_module)]

    def _restore(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Mapping[str, Any]
    ) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not state:
            return  # a checkpoint from dense training: its weights fit the dense module
        if self.pruner is not None:
            raise UserError(
                "this AdaSAPCallback has pruned a module already: resume with a new callback "
                "and a fresh dense module"
            )
        # The module goes to its device first: the pruner's optimizer state is built there.
        pl_module.to(trainer.strategy.root_device)
        example = self.example_inputs
        self._build(
            pl_module,
            state["example_inputs"] if example is None else example,
            _configured_optimizer(pl_module),
        )
        self.pruner.load_state_dict(state["pruner"])


def _check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    if not pl_module.automatic_optimization:
        raise UserError(
            "AdaSAPCallback drives automatic optimization: with automatic_optimization = False "
            "call pruner.step(closure) in training_step instead (docs/lightning.md)"
        )
    if not isinstance(trainer.strategy, SingleDeviceStrategy):
        raise UserError(
            f"AdaSAPCallback runs on one device, not with {type(trainer.strategy).__name__}: "
            "use Trainer(devices=1)"
        )
    if trainer.accumulate_grad_batches != 1:
        raise UserError(
            "a sharpness-aware step needs the gradient of one batch: use "
            "accumulate_grad_batches=1 (a larger batch instead)"
        )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise UserError(
            "float16 precision steps the optimizer through a grad scaler, without the closure "
            "AdaSAP needs: use precision='bf16-mixed' or 32, or the manual recipe in "
            "docs/lightning.md"
        )


def _first_sample(batch: Any) -> Tensor:
    inputs = batch[0] if isinstance(batch, tuple | list) and batch else batch
    if not isinstance(inputs, Tensor):
        raise UserError(
            f"cannot take the model's inputs from a {type(batch).__name__} batch: pass "
            "AdaSAPCallback(example_inputs=a batch the module's forward accepts)"
        )
    return inputs[:1]


def _configured_optimizer(pl_module: pl.LightningModule) -> torch.optim.Optimizer:
    """The one optimizer ``configure_optimizers`` returns (as itself, a list or a dict)."""
    configured = pl_module.configure_optimizers()
    if isinstance(configured, Mapping) and set(configured) == {"optimizer"}:
        configured = configured["optimizer"]
    if isinstance(configured, list | tuple) and len(configured) == 1:
        configured = configured[0]
    if not isinstance(configured, torch.optim.Optimizer):
        raise UserError(_ONE_OPTIMIZER)
    return configured
