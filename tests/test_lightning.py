"""AdaSAP inside PyTorch Lightning: the callback (automatic optimization) and the manual recipe."""

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from adasap.errors import UserError  # noqa: E402
from adasap.integrations.lightning import AdaSAPCallback, PrunerOptimizer  # noqa: E402
from adasap.method.pruner import Pruner, replay_pruning  # noqa: E402
from adasap.method.schedule import PhaseSchedule  # noqa: E402

# 32 images of 8x8 px in batches of 8: 4 steps per epoch
SCHEDULE = PhaseSchedule(warmup=2, prune=4, finetune=2, removals=2)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TinyNet(L.LightningModule):
    def __init__(self, images: int = 32) -> None:
        super().__init__()
        self.images = images
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 4),
        )
        self.training_steps = 0  # calls of training_step: forward passes on training batches
        self.losses: list[float] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.training_steps += 1
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(self.images, 3, 8, 8, generator=generator)
        labels = torch.randint(0, 4, (self.images,), generator=generator)
        return DataLoader(TensorDataset(images, labels), batch_size=8)


class OptimizerWatch(L.Callback):
    """After every step: is the trainer's optimizer over the module's current parameters?"""

    def __init__(self, adasap: AdaSAPCallback) -> None:
        self.adasap, self.checks = adasap, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        held = trainer.optimizers[0]
        live = {id(p) for g in held.param_groups for p in g["params"]}
        self.checks.append(
            (
                held.param_groups is self.adasap.pruner.optimizer.param_groups,
                live == {id(p) for p in pl_module.parameters()},
            )
        )


def fit(module, callbacks, max_steps, ckpt_path=None, **trainer_options):
    options = dict(
        max_steps=max_steps,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    trainer = L.Trainer(callbacks=callbacks, **{**options, **trainer_options})
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_callback_prunes_to_the_target_with_two_passes_per_step():
    module = TinyNet()
    dense = parameter_count(module)
    # a parameter target in any channel counts: this tiny net is what the fractions measure
    adasap = AdaSAPCallback(SCHEDULE, keep=0.5, keep_kind="params", round_to=1)
    watch = OptimizerWatch(adasap)
    trainer = fit(module, [adasap, watch], SCHEDULE.total_steps)
    pruner = adasap.pruner
    assert pruner.steps_done == SCHEDULE.total_steps == trainer.global_step
    assert module.net[0].out_channels < 16  # pruned in place
    assert parameter_count(module) / dense == pytest.approx(0.5, abs=0.05)
    assert pruner.size.params / pruner.target.dense.params == pytest.approx(0.5, abs=0.05)
    # AdaSAP, then SAM in fine-tuning: two training forward passes in every step
    assert module.training_steps == 2 * SCHEDULE.total_steps
    assert type(pruner.optimizer).__name__ == "SAM"
    assert isinstance(trainer.optimizers[0], PrunerOptimizer)
    assert trainer.optimizers[0].current is pruner.optimizer
    assert watch.checks == [(True, True)] * SCHEDULE.total_steps
    assert "on_load_checkpoint" not in vars(module)  # the resume hook is gone after fit
    # the logged loss is the one at the unperturbed weights (first pass of the last step)
    assert trainer.callback_metrics["train_loss"].item() == pytest.approx(module.losses[-2])


def test_removal_replaces_the_optimizer_the_trainer_steps():
    module = TinyNet()
    adasap = AdaSAPCallback(SCHEDULE, keep=0.5, example_inputs=torch.randn(1, 3, 8, 8))
    seen = []

    class Hook(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            adasap.pruner.register_removal_hook(lambda p: seen.append(p.optimizer))

    fit(module, [adasap, Hook()], SCHEDULE.warmup + 1)
    assert len(seen) == 1 and seen[0] is adasap.pruner.optimizer
    moments = [s["momentum_buffer"] for s in seen[0].state.values()]
    assert moments and all(m.shape == p.shape for m, p in zip(moments, seen[0].state, strict=True))


def test_sgd_method_makes_one_pass_per_step():
    module = TinyNet()
    adasap = AdaSAPCallback(SCHEDULE, keep=0.5, method="sgd")
    fit(module, [adasap], SCHEDULE.total_steps)
    assert module.training_steps == SCHEDULE.total_steps
    assert isinstance(adasap.pruner.optimizer, torch.optim.SGD)


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path):
    # One batch per epoch: the runs see the same data whatever epoch Lightning resumes in.
    whole = TinyNet(images=8)
    fit(whole, [AdaSAPCallback(SCHEDULE, keep=0.5)], SCHEDULE.total_steps)

    # stop after the first removal (before step 2) and before the second (before step 4)
    first = TinyNet(images=8)
    trainer = fit(first, [AdaSAPCallback(SCHEDULE, keep=0.5)], 3)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)

    resumed = TinyNet(images=8)  # dense: the callback re-applies the removal before loading
    adasap = AdaSAPCallback(SCHEDULE, keep=0.5)
    trainer = fit(resumed, [adasap], SCHEDULE.total_steps, ckpt_path=path)
    assert adasap.pruner.steps_done == SCHEDULE.total_steps == trainer.global_step
    assert resumed.training_steps == 2 * (SCHEDULE.total_steps - 3)
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, msg=name)


def test_pruned_weights_load_outside_the_trainer(tmp_path):
    trained = TinyNet(images=8)
    trainer = fit(trained, [AdaSAPCallback(SCHEDULE, keep=0.5)], SCHEDULE.total_steps)
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")

    # the docs/lightning.md recipe for inference
    checkpoint = torch.load(tmp_path / "pruned.ckpt", weights_only=False)
    adasap = checkpoint["callbacks"]["AdaSAPCallback"]
    module = TinyNet()
    replay_pruning(module, adasap["pruner"]["pruning_history"], adasap["example_inputs"])
    module.load_state_dict(checkpoint["state_dict"])
    images = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(module.eval()(images), trained.eval()(images))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=1"),
        ({"plugins": [MixedPrecision("16-mixed", "cpu")]}, "bf16-mixed"),
    ],
)
def test_unsupported_trainer_settings_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        fit(TinyNet(), [AdaSAPCallback(SCHEDULE)], 1, **options)


def test_lr_scheduler_from_configure_optimizers_is_a_user_error():
    class WithScheduler(TinyNet):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1)]

    module = WithScheduler()
    with pytest.raises(UserError, match="lr_scheduler=lambda optimizer"):
        fit(module, [AdaSAPCallback(SCHEDULE)], 1)
    assert "on_load_checkpoint" not in vars(module)  # unhooked although fit failed


def test_callback_refuses_manual_optimization():
    module = TinyNet()
    module.automatic_optimization = False
    with pytest.raises(UserError, match="pruner.step"):
        fit(module, [AdaSAPCallback(SCHEDULE)], 1)


def test_batch_without_tensor_inputs_needs_example_inputs():
    class DictBatches(TinyNet):
        def train_dataloader(self):
            return [{"images": torch.zeros(2, 3, 8, 8), "labels": torch.zeros(2).long()}]

    with pytest.raises(UserError, match="example_inputs="):
        fit(DictBatches(), [AdaSAPCallback(SCHEDULE)], 1)


def test_missing_lightning_is_a_one_line_user_error(monkeypatch):
    monkeypatch.delitem(sys.modules, "adasap.integrations.lightning")
    for name in [n for n in sys.modules if n == "lightning" or n.startswith("lightning.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match=r"pip install adasap\[lightning\]"):
        importlib.import_module("adasap.integrations.lightning")


class ManualNet(TinyNet):
    """The manual-optimization recipe of docs/lightning.md."""

    def __init__(self, schedule: PhaseSchedule) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.schedule = schedule
        self.pruner: Pruner | None = None

    def build_pruner(self) -> None:
        if self.pruner is None:
            self.pruner = Pruner(  # prunes self.net: a copy of self would copy the pruner
                self.net,
                torch.zeros(1, 3, 8, 8, device=self.device),
                self.schedule,
                keep=0.5,
                keep_kind="params",
                round_to=1,
                optimizer=torch.optim.SGD,
                optimizer_kwargs={"lr": 0.05, "momentum": 0.9},
            )

    def configure_optimizers(self):
        return None

    def on_fit_start(self):
        self.build_pruner()

    def training_step(self, batch, batch_idx):
        images, labels = batch

        def loss():
            self.training_steps += 1
            return F.cross_entropy(self(images), labels)

        self.log("train_loss", self.pruner.step(loss))

    def on_save_checkpoint(self, checkpoint):
        checkpoint["adasap"] = self.pruner.state_dict()

    def on_load_checkpoint(self, checkpoint):
        # Lightning loads the weights right after this hook: re-apply the removals first
        self.build_pruner()
        self.pruner.load_state_dict(checkpoint["adasap"])


def test_manual_optimization_recipe_prunes_and_resumes(tmp_path):
    module = ManualNet(SCHEDULE)
    dense = parameter_count(module)
    # global_step counts LightningOptimizer steps only, so the recipe runs by epochs
    trainer = fit(module, [], -1, max_epochs=1)
    assert module.pruner.steps_done == 4 and module.training_steps == 8
    path = tmp_path / "manual.ckpt"
    trainer.save_checkpoint(path)

    resumed = ManualNet(SCHEDULE)
    fit(resumed, [], -1, max_epochs=2, ckpt_path=path)
    assert resumed.pruner.steps_done == SCHEDULE.total_steps
    assert resumed.training_steps == 2 * 4
    assert parameter_count(resumed) / dense == pytest.approx(0.5, abs=0.05)
