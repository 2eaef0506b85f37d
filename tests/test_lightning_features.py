"""Lightning's own features with SAM, each against the same run without SAM or a closed reference.

The mixin rides Lightning's automatic optimization, so whatever touches the optimizer step (clipping,
accumulation, schedulers swapped by callbacks, the CLI's optimizers) must behave as without SAM.
"""

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    EMAWeightAveraging,
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
)

from lightning_sam import SAM, SAMLightningModule
from tests.helpers import Classifier, SAMClassifier, make_loader, reference_sam, trainer


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


class EpochLR(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class WithStepLR(Classifier):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)]


class SAMWithStepLR(SAMLightningModule, WithStepLR):
    pass


class RefreshEpoch(pl.Callback):
    """The weights when the BatchNorm-refresh epoch (the 4th) starts, and its training_step calls."""

    def __init__(self):
        self.start, self.calls = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 3 and batch_idx == 0:
            self.start = _params(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.calls += trainer.current_epoch == 3


class RecordingSWA(StochasticWeightAveraging):
    """Lightning's SWA, keeping a copy of each set of weights it averages."""

    averaged: list

    @staticmethod
    def update_parameters(average_model, model, n_averaged, avg_fn):
        RecordingSWA.averaged.append(_params(model))
        StochasticWeightAveraging.update_parameters(average_model, model, n_averaged, avg_fn)


def test_stochastic_weight_averaging():
    runs = {}
    for name, cls in (("plain", WithStepLR), ("sam", SAMWithStepLR)):
        model, lr, refresh = cls(), EpochLR(), RefreshEpoch()
        RecordingSWA.averaged = []
        swa = RecordingSWA(swa_lrs=0.05, swa_epoch_start=1, annealing_epochs=1)
        t = trainer(max_epochs=3, callbacks=[lr, refresh, swa])
        t.fit(model, make_loader(batch_size=24))  # 4 batches per epoch; BatchNorm: one more epoch for its stats
        runs[name] = (lr.lrs, t.global_step, RecordingSWA.averaged, refresh)
        if name == "sam":
            assert model.sam_last_step is not None
    (plain_lrs, plain_steps, _, _), (sam_lrs, sam_steps, _, _) = runs["plain"], runs["sam"]
    assert sam_lrs == pytest.approx(plain_lrs)  # SWALR replaced StepLR in both
    assert sam_lrs[:3] == pytest.approx([0.1, 0.05, 0.05])
    assert sam_steps == plain_steps == 13  # the BatchNorm epoch: one optimizer step, as without SAM
    for name in ("plain", "sam"):
        # the model holds the average of what SWA averaged when the BatchNorm epoch starts
        _, _, averaged, refresh = runs[name]
        assert len(averaged) == 3
        assert refresh.calls == 4  # one forward per batch: no perturbed pass without a backward
        for key, value in refresh.start.items():
            expected = sum(w[key] for w in averaged) / len(averaged)
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=f"{name} {key}")


def test_ema_weight_averaging():
    class StepWeights(pl.Callback):
        def __init__(self):
            self.weights = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.weights.append(_params(pl_module))

    model, record = SAMClassifier(batchnorm=False), StepWeights()
    ema = EMAWeightAveraging(decay=0.5, use_buffers=False)
    trainer(max_epochs=2, callbacks=[record, ema]).fit(model, make_loader(batch_size=24))
    assert len(record.weights) == 8
    expected = dict(record.weights[0])  # AveragedModel copies the first, then avg <- d avg + (1 - d) w
    for step in record.weights[1:]:
        expected = {k: 0.5 * expected[k] + 0.5 * step[k] for k in expected}
    for key, value in _params(model).items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)
    assert not torch.allclose(record.weights[-1]["net.0.weight"], expected["net.0.weight"])


def test_learning_rate_monitor_logs_the_schedule(tmp_path):
    rows = {}
    for name, cls in (("plain", WithStepLR), ("sam", SAMWithStepLR)):
        logger = pl.loggers.CSVLogger(tmp_path, name=name)
        t = trainer(max_epochs=3, logger=logger, log_every_n_steps=1, callbacks=[LearningRateMonitor("step")])
        t.fit(cls(), make_loader(batch_size=32))
        lines = (tmp_path / name / "version_0" / "metrics.csv").read_text().splitlines()
        column = lines[0].split(",").index("lr-SGD")
        rows[name] = [float(r.split(",")[column]) for r in lines[1:] if r.split(",")[column]]
    assert rows["sam"] == pytest.approx(rows["plain"])
    assert rows["sam"] == pytest.approx([0.1] * 3 + [0.01] * 3 + [0.001] * 3)


def test_lr_find_runs_the_sam_step_and_restores_the_model():
    model = SAMClassifier()
    before = _params(model)
    counts = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            counts.append(pl_module.sam_last_step is not None)

    t = trainer(max_epochs=1, callbacks=[Count()])
    finder = pl.tuner.Tuner(t).lr_find(model, make_loader(batch_size=8, n=192), num_training=20, min_lr=1e-4)
    assert len(finder.results["lr"]) == 20 and all(counts)
    assert finder.suggestion() is not None
    for key, value in _params(model).items():
        assert torch.equal(value, before[key]), key  # lr_find puts the initial weights back


class CLIModel(SAMLightningModule, Classifier):
    """A module for LightningCLI: its optimizer and scheduler come from the command line."""

    def __init__(self, rho: float = 0.05):
        super().__init__(sam=SAM(rho), batchnorm=False)

    def configure_optimizers(self):  # replaced by the CLI's --optimizer/--lr_scheduler
        raise AssertionError


class PlainCLIModel(Classifier):
    def __init__(self, rho: float = 0.05):
        super().__init__(batchnorm=False)


def test_lightning_cli_optimizer_and_scheduler_from_the_command_line():
    from lightning.pytorch.cli import LightningCLI

    args = [
        "--trainer.max_epochs=3", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
        "--optimizer=SGD", "--optimizer.lr=0.1",
        "--lr_scheduler=StepLR", "--lr_scheduler.step_size=1", "--lr_scheduler.gamma=0.5",
    ]  # fmt: skip
    lrs = {}
    for name, cls in (("plain", PlainCLIModel), ("sam", CLIModel)):
        cli = LightningCLI(cls, run=False, args=args, save_config_callback=None)
        cli.trainer.fit(cli.model, make_loader(batch_size=32))
        lrs[name] = cli.trainer.optimizers[0].param_groups[0]["lr"]
        if name == "sam":
            assert cli.model.sam_last_step is not None
    assert lrs["sam"] == pytest.approx(lrs["plain"]) == pytest.approx(0.0125)


class Rising(Classifier):
    def validation_step(self, batch, batch_idx):
        self.log("val/metric", float(self.current_epoch))  # gets worse every epoch


class SAMRising(SAMLightningModule, Rising):
    pass


def test_early_stopping_stops_as_without_sam():
    runs = {}
    for name, cls in (("plain", Rising), ("sam", SAMRising)):
        stop = EarlyStopping("val/metric", patience=2, mode="min")
        t = trainer(max_epochs=10, callbacks=[stop], limit_val_batches=1)
        t.fit(cls(), make_loader(batch_size=32), make_loader(batch_size=32))
        runs[name] = (stop.stopped_epoch, t.current_epoch, t.global_step)
    assert runs["sam"] == runs["plain"] == (2, 3, 9)


def test_step_checkpoints_without_a_manual_optimization_warning(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=4, enable_checkpointing=True, callbacks=[ckpt]).fit(SAMClassifier(), make_loader())
    assert not [w for w in caught if "manual optimization" in str(w.message).lower()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]


def test_configure_gradient_clipping_hook_sees_the_descent_gradient():
    seen = []

    class Clipping(SAMClassifier):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            seen.append((gradient_clip_val, [p.grad.clone() for p in self.parameters()]))
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm="value")

    loader = make_loader(batch_size=16)
    model = Clipping(batchnorm=False)
    reference = copy.deepcopy(model.net)
    trainer(max_steps=3, gradient_clip_val=0.01).fit(model, loader)
    assert [value for value, _ in seen] == [0.01] * 3  # once per optimizer step, with the Trainer's value
    # the hook saw SAM's perturbed gradient: the reference's first descent gradient
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    grads = {}

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            grads.setdefault("first", [p.grad.clone() for p in reference.parameters()])
            return super().step(closure)

    spy = Spy(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    spy.load_state_dict(opt.state_dict())
    reference_sam(reference, spy, list(loader)[:1], rho=0.05)
    for got, expected in zip(seen[0][1], grads["first"]):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_gradient_accumulation_scheduler_matches_the_reference():
    loader = make_loader(batch_size=8, n=48)  # 6 micro-batches per epoch
    model = SAMClassifier(sam=SAM(0.05))
    reference = copy.deepcopy(model.net)
    schedule = GradientAccumulationScheduler({0: 1, 1: 3})
    t = trainer(max_epochs=2, callbacks=[schedule])
    t.fit(model, loader)
    assert t.global_step == 6 + 2
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    reference_sam(reference, opt, loader, rho=0.05, accumulate=1)
    reference_sam(reference, opt, loader, rho=0.05, accumulate=3)
    for (key, value), expected in zip(model.net.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)

