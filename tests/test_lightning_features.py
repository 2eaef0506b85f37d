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
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.plugins import MixedPrecision

try:
    from lightning.pytorch.callbacks import EMAWeightAveraging
except ImportError:  # Lightning before 2.6 has no EMAWeightAveraging
    EMAWeightAveraging = None
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F

from lightning_sam import SAM, SAMLightningModule
from tests.helpers import (
    Classifier,
    SAMClassifier,
    assert_same_state,
    make_data,
    make_loader,
    reference_sam,
    state_copy,
    trainer,
)


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


@pytest.mark.skipif(EMAWeightAveraging is None, reason="EMAWeightAveraging arrived in Lightning 2.6")
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
    class Counted(SAMClassifier):
        def training_step(self, batch, batch_idx):
            self.calls.append(self.trainer.global_step)  # the finder swaps the Trainer's callbacks out: count here
            return super().training_step(batch, batch_idx)

    model = Counted()
    model.calls = []
    before = _params(model)
    t = trainer(max_epochs=1)
    finder = pl.tuner.Tuner(t).lr_find(model, make_loader(batch_size=8, n=192), num_training=20, min_lr=1e-4)
    assert len(finder.results["lr"]) == 20
    assert model.calls == [step for step in range(20) for _ in range(2)]  # two passes per trial step
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


# ---------------------------------------------------------------------------------------------- schedulers


class Scheduled(Classifier):
    def __init__(self, kind: str, **kwargs):
        super().__init__(batchnorm=False, **kwargs)
        self.kind = kind

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y) + self.current_epoch)  # rises: plateau triggers

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        if self.kind == "epoch":
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]
        if self.kind == "step":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.9**i)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2}}
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
        return {"optimizer": opt, "lr_scheduler": sched, "monitor": "val/loss"}


class SAMScheduled(SAMLightningModule, Scheduled):
    pass


class RecordLR(pl.Callback):
    def __init__(self):
        self.history = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.history.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("kind", ["epoch", "step", "plateau"])
def test_schedulers_step_as_in_automatic_optimization(kind):
    lrs = {}
    for name, cls in (("automatic", Scheduled), ("sam", SAMScheduled)):
        model = cls(kind)
        record = RecordLR()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # e.g. Lightning's "keys will be ignored"
            trainer(max_epochs=4, callbacks=[record], limit_val_batches=1).fit(
                model, make_loader(batch_size=32), make_loader(batch_size=32)
            )
        lrs[name] = [*record.history, model.trainer.optimizers[0].param_groups[0]["lr"]]
    assert lrs["sam"] == pytest.approx(lrs["automatic"])
    assert len(set(lrs["sam"])) > 1


def test_per_step_plateau_on_a_validation_metric_steps_after_that_validation():
    class PerStep(Scheduled):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
            return [opt], [{"scheduler": plateau, "interval": "step", "monitor": "val/loss", "strict": False}]

    class SAMPerStep(SAMLightningModule, PerStep):
        pass

    lrs = {}
    for name, cls in (("automatic", PerStep), ("sam", SAMPerStep)):
        record = RecordLR()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no val/loss before the first validation
            t = trainer(max_epochs=2, callbacks=[record], limit_val_batches=1, val_check_interval=2)
            t.fit(cls("plateau"), make_loader(batch_size=16), make_loader(batch_size=32))
        lrs[name] = record.history
    assert lrs["sam"] == pytest.approx(lrs["automatic"])
    assert len(set(lrs["sam"])) > 2


def test_epoch_plateau_is_not_stepped_when_max_steps_ends_the_epoch_early():
    class OnTrainLoss(Scheduled):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
            return {"optimizer": opt, "lr_scheduler": plateau, "monitor": "train/loss"}

    class SAMOnTrainLoss(SAMLightningModule, OnTrainLoss):
        pass

    states = {}
    for name, model in (("automatic", OnTrainLoss("plateau")), ("sam", SAMOnTrainLoss("plateau", sam=SAM(0.0)))):
        trainer(max_epochs=5, max_steps=8).fit(model, make_loader(batch_size=16))  # 6 batches per epoch
        states[name] = model.lr_schedulers().state_dict()
    assert states["sam"]["last_epoch"] == states["automatic"]["last_epoch"] == 1  # epoch 1 only
    for key in ("num_bad_epochs", "best", "_last_lr"):
        assert states["sam"][key] == pytest.approx(states["automatic"][key], rel=1e-5), key


def test_plateau_without_the_monitored_metric_raises():
    class NoVal(SAMScheduled):
        validation_step = None

    with pytest.raises(MisconfigurationException, match="conditioned on metric val/loss which is not"):
        trainer(max_epochs=1, limit_val_batches=0).fit(NoVal("plateau"), make_loader())


# ---------------------------------------------------------------------------------------------- clipping


def test_clipping_matches_reference():
    loader = make_loader(batch_size=16)
    model = SAMClassifier(sam=SAM(0.05))
    reference = copy.deepcopy(model.net)
    trainer(gradient_clip_val=0.05).fit(model, loader)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    reference_sam(reference, opt, loader, rho=0.05, clip_norm=0.05)
    assert_same_state(state_copy(model.net), state_copy(reference), atol=1e-6)
    unclipped = SAMClassifier(sam=SAM(0.05))
    trainer().fit(unclipped, loader)
    assert not torch.allclose(unclipped.net[0].weight, model.net[0].weight, atol=1e-4)


def test_clipping_by_value_sees_unscaled_gradients_under_16_mixed():
    seen = {}

    class Probe(SAMClassifier):
        def on_before_optimizer_step(self, optimizer):
            seen["max_before"] = max(p.grad.abs().max().item() for p in self.parameters())

    class After(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen["max_after"] = max(p.grad.abs().max().item() for p in pl_module.parameters() if p.grad is not None)

    model = Probe(batchnorm=False)
    t = trainer(
        max_steps=1,
        plugins=[MixedPrecision("16-mixed", "cpu")],
        callbacks=[After()],
        gradient_clip_val=1e-3,
        gradient_clip_algorithm="value",
    )
    t.fit(model, make_loader(batch_size=16))
    assert 1e-3 < seen["max_before"] < 10  # unscaled (the loss scale is 65536)
    assert seen["max_after"] == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------------------- accumulation


def test_accumulation_matches_reference_with_the_same_semantics():
    loader = make_loader(batch_size=8, n=88)  # 11 micro-batches: updates after 3, 6, 9 and the last (11)
    model = SAMClassifier(sam=SAM(0.05))
    reference = copy.deepcopy(model.net)
    trainer(accumulate_grad_batches=3).fit(model, loader)
    assert model.trainer.global_step == 4
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    reference_sam(reference, opt, loader, rho=0.05, accumulate=3)
    assert_same_state(state_copy(model.net), state_copy(reference), atol=1e-6)


class Branching(SAMLightningModule, pl.LightningModule):
    """A layer used only by batches whose first feature is positive (data-dependent routing)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.first, self.extra, self.last = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def net_forward(self, x):
        h = torch.tanh(self.first(x))
        return self.last(torch.tanh(self.extra(h)) if x[0, 0] > 0 else h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net_forward(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_accumulation_with_a_parameter_first_used_in_a_later_micro_batch():
    data = make_data(n=32)
    data.tensors[0][0, 0], data.tensors[0][8, 0] = -1.0, 1.0  # micro-batch 1 skips `extra`, 2 uses it
    data.tensors[0][16, 0], data.tensors[0][24, 0] = 1.0, -1.0
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model = Branching(sam=SAM(0.05))
    reference = copy.deepcopy(model)
    trainer(accumulate_grad_batches=2).fit(model, loader)

    class Net(nn.Module):  # the same parameters, for the plain loop
        def __init__(self, m):
            super().__init__()
            self.first, self.extra, self.last, self.forward = m.first, m.extra, m.last, m.net_forward

    net = Net(reference)
    reference_sam(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), loader, rho=0.05, accumulate=2)
    assert_same_state(state_copy(model), state_copy(net), atol=1e-6)
    assert not torch.equal(model.extra.weight, Branching().extra.weight)
