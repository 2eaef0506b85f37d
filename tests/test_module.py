import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F

from lightning_sam import ASAM, SAM, RhoSchedule, SAMLightningModule
from tests.helpers import (
    Classifier,
    Quadratic,
    SAMClassifier,
    make_data,
    make_loader,
    make_net,
    reference_sam,
    trainer,
    two_group_sgd,
)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# ---------------------------------------------------------------------------------------------- exactness


def test_quadratic_step_is_the_closed_form():
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        m = torch.randn(4, 4)
        a, w0, lr, rho = m @ m.T + torch.eye(4), torch.randn(4), 0.05, 0.1
        model = Quadratic(a, w0, lr, sam=SAM(rho))
        trainer(max_steps=5).fit(model, torch.utils.data.DataLoader(range(10)))
        w = w0.clone()
        for _ in range(5):  # w <- w - lr * A (w + rho A w / ||A w||)
            g = a @ w
            w = w - lr * a @ (w + rho * g / g.norm())
        torch.testing.assert_close(model.w.detach(), w, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize(
    ("method", "eta"), [(SAM(0.05), None), (ASAM(0.5, 0.01), 0.01), (ASAM(1.0, 0.0), 0.0)], ids=["sam", "asam", "asam0"]
)
def test_parity_with_plain_pytorch_loop_with_batchnorm_and_two_param_groups(method, eta):
    loader = make_loader(batch_size=8, n=96)  # 12 steps
    model = SAMClassifier(sam=method, two_groups=True)
    reference = copy.deepcopy(model.net)
    trainer(max_epochs=1).fit(model, loader)
    assert model.trainer.global_step == 12
    reference_sam(reference, two_group_sgd(reference), loader, rho=method.rho, adaptive_eta=eta)
    _assert_same_state(_state(model.net), _state(reference), atol=1e-6)
    # the second group's own rho is used (a run with rho everywhere differs)
    other = copy.deepcopy(reference)
    reference_sam(other, two_group_sgd(other, rho2=None), loader, rho=method.rho, adaptive_eta=eta)
    assert not torch.allclose(other[0].weight, reference[0].weight, atol=1e-6)


def test_batchnorm_statistics_come_from_the_clean_pass_only():
    loader = make_loader(batch_size=16, n=32)
    model = SAMClassifier(sam=SAM(0.5))
    bn = model.net[1]
    expected = copy.deepcopy(bn)
    first = copy.deepcopy(model.net[0])
    trainer(max_steps=1).fit(model, loader)
    x, _ = next(iter(loader))
    expected(first(x))  # one update of the statistics, from the clean forward at w
    torch.testing.assert_close(bn.running_mean, expected.running_mean)
    torch.testing.assert_close(bn.running_var, expected.running_var)
    assert bn.num_batches_tracked.item() == 1


def test_instancenorm_statistics_come_from_the_clean_pass_only():
    # InstanceNorm updates its running statistics whatever track_running_stats says in training
    class WithInstanceNorm(SAMClassifier):
        def __init__(self, **kwargs):
            super().__init__(batchnorm=False, **kwargs)
            self.norm = nn.InstanceNorm1d(1, track_running_stats=True)

        def forward(self, x):
            return self.net(self.norm(x.unsqueeze(1)).squeeze(1))

    loader = make_loader(batch_size=16, n=32)
    model = WithInstanceNorm(sam=SAM(0.5))
    expected = copy.deepcopy(model.norm)
    trainer(max_steps=1).fit(model, loader)
    expected(next(iter(loader))[0].unsqueeze(1))  # the clean forward's update (the input does not depend on w)
    torch.testing.assert_close(model.norm.running_mean, expected.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model.norm.running_var, expected.running_var, rtol=0, atol=0)


def test_rho_zero_is_plain_sgd():
    loader = make_loader()
    model = SAMClassifier(sam=SAM(0.0), batchnorm=False)
    plain = Classifier(batchnorm=False)
    trainer().fit(model, loader)
    trainer().fit(plain, loader)
    _assert_same_state(_state(model.net), _state(plain.net), atol=1e-6)


# ---------------------------------------------------------------------------------------------- contract


class Counting(Classifier):
    """Logs, updates a torchmetric, and counts its calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
        self.total = torchmetrics.SumMetric()
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.acc(logits, y)
        self.total.update(torch.tensor(float(len(y))))
        self.log("calls", float(self.calls), reduce_fx="sum")
        self.log_dict({"train/loss": loss, "train/acc": self.acc})
        return {"loss": loss, "extra": logits.detach()}


class SAMCounting(SAMLightningModule, Counting):
    pass


def test_training_step_runs_twice_but_logs_and_metrics_count_once(tmp_path):
    loader = make_loader(batch_size=16, n=96)
    model = SAMCounting()
    seen = []

    class Seen(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(int(pl_module.acc.tp.sum() + pl_module.acc.fn.sum()))

    t = trainer(max_epochs=1, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1, callbacks=[Seen()])
    t.fit(model, loader)
    assert model.calls == 12  # 6 steps, two passes each
    assert model.total.compute().item() == 96  # each sample counted once
    assert seen == [16, 32, 48, 64, 80, 96]
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    calls = [row.split(",")[header.index("calls")] for row in lines[1:]]
    assert [float(c) for c in calls if c] == [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]  # the clean pass's value


def test_global_step_max_steps_and_step_based_checkpoints(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    t = trainer(max_steps=5, enable_checkpointing=True, callbacks=[ckpt], max_epochs=10)
    t.fit(SAMClassifier(), make_loader(batch_size=16, n=32))
    assert t.global_step == 5
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "epoch=0-step=2.ckpt" in names and "epoch=1-step=4.ckpt" in names


def test_mixin_as_the_only_base_and_batch_idx_optional():
    class OnlyBase(SAMLightningModule):
        def __init__(self):
            super().__init__(sam=SAM(0.1))
            self.net = make_net()

        def training_step(self, batch):  # no batch_idx
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = OnlyBase()
    before = _state(model)
    trainer(max_steps=3).fit(model, make_loader())
    assert model.trainer.global_step == 3
    assert not torch.equal(before["net.0.weight"], model.net[0].weight)
    assert model.sam_last_step is not None and model.sam_last_step.eps_norm.item() == pytest.approx(0.1, rel=1e-4)


def test_direct_call_outside_a_trainer_is_the_users_step():
    model = SAMClassifier()
    x, y = next(iter(make_loader()))
    torch.testing.assert_close(model.training_step((x, y), 0), F.cross_entropy(model(x), y))


def test_step_statistics():
    model = SAMClassifier(sam=SAM(0.05))
    trainer(max_steps=1).fit(model, make_loader(batch_size=16))
    s = model.sam_last_step
    assert s.eps_norm.item() == pytest.approx(0.05, rel=1e-5)
    assert s.grad_norm.item() > 0 and s.rho == 0.05
    torch.testing.assert_close(s.sharpness, s.perturbed_loss - s.loss)
    assert s.sharpness.item() > 0  # an ascent step increases the loss


def test_user_hooks_still_run():
    seen = []

    class Hooked(SAMClassifier):
        def on_before_optimizer_step(self, optimizer):
            seen.append("before_step")

        def on_train_epoch_end(self):
            seen.append("epoch_end")

    trainer(max_epochs=2).fit(Hooked(), make_loader(batch_size=48, n=96))
    assert seen == ["before_step", "before_step", "epoch_end"] * 2


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
    _assert_same_state(_state(model.net), _state(reference), atol=1e-6)
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
    _assert_same_state(_state(model.net), _state(reference), atol=1e-6)


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
    _assert_same_state(_state(model), _state(net), atol=1e-6)
    assert not torch.equal(model.extra.weight, Branching().extra.weight)


# ---------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains(precision):
    plugins = [MixedPrecision("16-mixed", "cpu")] if precision == "16-mixed" else []
    kwargs = {"plugins": plugins} if plugins else {"precision": precision}
    model = SAMClassifier(sam=SAM(0.05))
    before = _state(model.net)
    t = trainer(max_epochs=3, **kwargs)
    t.fit(model, make_loader(batch_size=16))
    after = _state(model.net)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(before["0.weight"], after["0.weight"])
    assert model.sam_last_step.eps_norm.item() == pytest.approx(0.05, rel=1e-2)
    if precision == "16-mixed":
        # grad_norm is reported unscaled: compare with an fp32 evaluation of the same batch
        assert model.sam_last_step.grad_norm.item() < 100


def test_fp16_overflow_never_reaches_the_weights():
    class Overflow(SAMClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * 1e4 if self.trainer.global_step == 1 else loss  # scaled by 65536: inf in fp16

    model = Overflow(sam=SAM(0.05))
    t = trainer(max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu")])
    states = []

    class Snap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            states.append((_state(pl_module.net), copy.deepcopy(trainer.optimizers[0].state_dict())))

    t.callbacks.append(Snap())
    with pytest.warns(RuntimeWarning, match="skipped the update at global step 1"):
        t.fit(model, make_loader(batch_size=16))
    assert t.global_step == 3
    assert model.sam_skipped_steps == 1
    _assert_same_state(states[1][0], states[2][0])  # step 1 changed nothing, BN statistics included
    scaler = t.precision_plugin.scaler
    assert scaler.get_scale() == 65536.0 / 2  # the scaler backed off once
    assert all(torch.isfinite(v).all() for v in _state(model.net).values())


# ---------------------------------------------------------------------------------------------- safety


class Faulty(SAMClassifier):
    """Injects a fault at one step, in the clean or the perturbed pass."""

    def __init__(self, fault: str, at_step: int, in_pass: int, **kwargs):
        super().__init__(**kwargs)
        self.fault, self.at_step, self.in_pass, self.pass_count = fault, at_step, in_pass, 0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.pass_count += 1
        if self.trainer.global_step == self.at_step and (self.pass_count - 1) % 2 == self.in_pass:
            if self.fault == "nan":
                return loss * float("nan")
            if self.fault == "inf_grad":
                return loss + 0 * torch.sqrt(self.net[0].weight[0, 0] * 0)  # finite loss, inf gradient
            raise RuntimeError("injected")
        return loss


class Snapshots(pl.Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append((_state(pl_module), copy.deepcopy(trainer.optimizers[0].state_dict())))


@pytest.mark.parametrize("fault", ["nan", "inf_grad"])
@pytest.mark.parametrize("in_pass", [0, 1], ids=["clean", "perturbed"])
def test_nonfinite_step_is_skipped_and_changes_nothing(fault, in_pass, tmp_path):
    model = Faulty(fault, at_step=2, in_pass=in_pass)
    snaps = Snapshots()
    t = trainer(max_steps=4, callbacks=[snaps], logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1)
    with pytest.warns(RuntimeWarning, match="skipped the update at global step 2"):
        t.fit(model, make_loader(batch_size=16))
    assert t.global_step == 4 and model.sam_skipped_steps == 1
    (params_2, opt_2), (params_3, opt_3) = snaps.states[2], snaps.states[3]
    _assert_same_state(params_2, params_3)
    assert str(opt_2) == str(opt_3)
    assert not torch.equal(snaps.states[1][0]["net.0.weight"], params_2["net.0.weight"])  # others did update
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("sam/skipped_steps")
    assert [float(r.split(",")[column]) for r in lines[1:] if r.split(",")[column]] == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("in_pass", [0, 1], ids=["clean", "perturbed"])
def test_exception_leaves_weights_and_buffers_as_before(in_pass):
    model = Faulty("raise", at_step=2, in_pass=in_pass)
    snaps = Snapshots()
    with pytest.raises(RuntimeError, match="injected"):
        trainer(max_steps=4, callbacks=[snaps]).fit(model, make_loader(batch_size=16))
    _assert_same_state(snaps.states[2][0], _state(model))


def test_exception_in_the_optimizer_step_restores_the_weights():
    class Exploding(torch.optim.SGD):
        def step(self, closure=None):
            closure()  # torch's optimizers evaluate the closure before they write
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(1.0)  # half-way through an update...
            raise MemoryError("injected")

    class M(SAMClassifier):
        def configure_optimizers(self):
            return Exploding(self.parameters(), lr=0.1)

    model = M()
    before = _state(model)
    with pytest.raises(MemoryError, match="injected"):
        trainer(max_steps=1).fit(model, make_loader(batch_size=16))
    _assert_same_state(before, _state(model))


def test_resume_at_epoch_boundary_is_bit_exact(tmp_path):
    loader = make_loader(batch_size=16)

    def run(max_epochs, ckpt_path=None, **kw):
        model = SAMClassifier(sam=ASAM(0.5))
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
        t = trainer(
            max_epochs=max_epochs,
            enable_checkpointing=True,
            callbacks=[ckpt],
            accumulate_grad_batches=2,
            gradient_clip_val=1.0,
            **kw,
        )
        t.fit(model, loader, ckpt_path=ckpt_path)
        return model

    full = run(4)
    for p in tmp_path.iterdir():
        if p.name != "epoch=1-step=6.ckpt":
            p.unlink()
    resumed = run(4, ckpt_path=tmp_path / "epoch=1-step=6.ckpt")
    _assert_same_state(_state(full), _state(resumed))
    assert resumed.trainer.global_step == full.trainer.global_step == 12


# ---------------------------------------------------------------------------------------------- errors


def test_two_optimizers_raise():
    class Two(SAMClassifier):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[3].parameters())]

    # Lightning's own check: several optimizers need manual optimization (see lightning_sam.sam_step)
    with pytest.raises(RuntimeError, match=r"multiple optimizers is only supported with manual"):
        trainer().fit(Two(), make_loader())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sam": 0.05}, TypeError, r"`sam` to be a method object \(SAM, ASAM, GSAM, LookSAM\)"),
        ({"sam": {"class_path": "torch.nn.Linear"}}, ValueError, r"`class_path` to name a SAM class"),
        ({"sync_perturbation": 1}, TypeError, r"`sync_perturbation` to be True or False, got 1"),
    ],
)
def test_invalid_module_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SAMClassifier(**kwargs)


def test_invalid_param_group_rho():
    class BadRho(SAMClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": self.parameters(), "rho": -1.0}], lr=0.1)

    with pytest.raises(ValueError, match=r"`param_groups\[0\]\['rho'\]` to be a finite, non-negative float"):
        trainer().fit(BadRho(), make_loader())


def test_training_step_returning_none_skips_that_batch_as_in_plain_lightning():
    class SkipSecond(SAMClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return None if batch_idx == 1 else loss

    snaps = Snapshots()
    model = SkipSecond()
    with pytest.warns(UserWarning, match="`training_step` returned `None`"):
        trainer(max_steps=3, callbacks=[snaps]).fit(model, make_loader(batch_size=16))
    (state_1, opt_1), (state_2, opt_2) = snaps.states[1], snaps.states[2]
    weights = [name for name, _ in model.named_parameters()]
    # the skipped batch changed no weight and no optimizer state (its forward moved the BatchNorm
    # statistics, as in plain Lightning)
    _assert_same_state({k: state_1[k] for k in weights}, {k: state_2[k] for k in weights})
    assert str(opt_1) == str(opt_2)
    params_1 = state_1
    assert not torch.equal(snaps.states[0][0]["net.0.weight"], params_1["net.0.weight"])


def test_perturbed_pass_must_return_the_loss():
    class FirstPassOnly(SAMClassifier):
        calls = 0

        def training_step(self, batch, batch_idx):
            self.calls += 1
            loss = super().training_step(batch, batch_idx)
            return loss if self.calls % 2 else None

    model = FirstPassOnly()
    before = _state(model)
    with pytest.raises(TypeError, match=r"needs `training_step` to return the loss.*perturbed pass got NoneType"):
        trainer().fit(model, make_loader())
    _assert_same_state(before, _state(model))


def test_missing_training_step():
    class Empty(SAMLightningModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="defines no `training_step`"):
        trainer().fit(Empty(), make_loader())


def test_manual_optimization_is_refused_with_a_pointer_to_sam_step():
    model = SAMClassifier()
    model.automatic_optimization = False
    with pytest.raises(ValueError, match=r"automatic_optimization` is False.*lightning_sam.sam_step"):
        trainer().fit(model, make_loader())


def test_leftover_manual_backward_says_what_to_do():
    class Leftover(SAMClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            return loss

    model = Leftover()
    before = _state(model)
    with pytest.raises(RuntimeError, match=r"called `self.manual_backward\(...\)`.*return the loss.*sam_step"):
        trainer(max_steps=2).fit(model, make_loader())
    _assert_same_state(before, _state(model))


class WithHparams(SAMClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()


def test_hyperparameters_and_checkpoints_hold_the_method_as_plain_data(tmp_path):
    import subprocess
    import sys

    import yaml
    from lightning.pytorch.core.saving import load_hparams_from_yaml

    schedule = RhoSchedule("cosine", total_steps=10, rho_min=0.1)
    model = WithHparams(sam=ASAM(0.7, 0.02, rho_schedule=schedule), lr=0.05)
    t = trainer(max_steps=1, logger=pl.loggers.CSVLogger(tmp_path))
    t.fit(model, make_loader())
    t.save_checkpoint(tmp_path / "m.ckpt")
    hparams_file = tmp_path / "lightning_logs" / "version_0" / "hparams.yaml"
    saved = yaml.safe_load(hparams_file.read_text())
    assert saved["sam"]["class_path"] == "lightning_sam.ASAM"
    assert saved["sam"]["init_args"]["eta"] == 0.02 and saved["lr"] == 0.05
    assert load_hparams_from_yaml(str(hparams_file))["sam"] == saved["sam"]
    loaded = WithHparams.load_from_checkpoint(tmp_path / "m.ckpt", hparams_file=str(hparams_file))
    assert loaded.sam == ASAM(0.7, 0.02, rho_schedule=schedule) and loaded.lr == 0.05
    # torch's default (weights_only) in a process that never imported lightning_sam
    code = (
        "import sys, torch; c = torch.load(sys.argv[1], weights_only=True); "
        "assert 'lightning_sam' not in sys.modules; print(c['hyper_parameters']['sam']['class_path'])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.ckpt")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "lightning_sam.ASAM", out.stderr[-2000:]


def test_checkpoint_method_is_restored_without_hyperparameters_and_a_change_warns(tmp_path):
    model = SAMClassifier(sam=ASAM(0.5))
    t = trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(model, make_loader())
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    assert SAMClassifier.load_from_checkpoint(path).sam == ASAM(0.5)  # not the default SAM(0.05)
    resumed = SAMClassifier(sam=SAM(0.1))
    with pytest.warns(UserWarning, match=r"trained with ASAM\(rho=0.5, eta=0.01\); this module trains with SAM"):
        trainer(max_epochs=2).fit(resumed, make_loader(), ckpt_path=path)
    assert resumed.sam == SAM(0.1)
