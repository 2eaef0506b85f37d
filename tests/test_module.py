import copy
import dataclasses

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from lightning_sam import ASAM, SAM, RhoSchedule, SAMLightningModule
from tests.helpers import (
    Classifier,
    Quadratic,
    SAMClassifier,
    Snapshots,
    assert_same_state,
    make_loader,
    make_net,
    reference_sam,
    state_copy,
    trainer,
    two_group_sgd,
)

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
    assert_same_state(state_copy(model.net), state_copy(reference), atol=1e-6)
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
    assert_same_state(state_copy(model.net), state_copy(plain.net), atol=1e-6)


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
    before = state_copy(model)
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
        (
            {"sam": 0.05},
            TypeError,
            r"`sam` to be a method object \(one of SAM, ASAM, GSAM, .*, RWP, or a lightning_sam.Method of your own\)",
        ),
        ({"sam": {"class_path": "torch.nn.Linear"}}, ValueError, r"`class_path` to name a Method class"),
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
    assert_same_state({k: state_1[k] for k in weights}, {k: state_2[k] for k in weights})
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
    before = state_copy(model)
    with pytest.raises(TypeError, match=r"needs `training_step` to return the loss.*perturbed pass got NoneType"):
        trainer().fit(model, make_loader())
    assert_same_state(before, state_copy(model))


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
    before = state_copy(model)
    with pytest.raises(RuntimeError, match=r"called `self.manual_backward\(...\)`.*return the loss.*sam_step"):
        trainer(max_steps=2).fit(model, make_loader())
    assert_same_state(before, state_copy(model))


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
    with pytest.warns(UserWarning, match=r"trained with ASAM\(rho=0.5, eta=0.01\); this module trains with SAM"):
        assert SAMClassifier.load_from_checkpoint(path, sam=SAM(0.2)).sam == SAM(0.2)  # what the caller asked for
    resumed = SAMClassifier(sam=SAM(0.1))
    with pytest.warns(UserWarning, match=r"trained with ASAM\(rho=0.5, eta=0.01\); this module trains with SAM"):
        trainer(max_epochs=2).fit(resumed, make_loader(), ckpt_path=path)
    assert resumed.sam == SAM(0.1)


def test_dataloader_iter_training_step_is_refused():
    class Iterating(SAMClassifier):
        def training_step(self, dataloader_iter):
            return super().training_step(*next(dataloader_iter)[:2])

    with pytest.raises(TypeError, match=r"training_step\(dataloader_iter\)` is not supported.*batch, batch_idx"):
        trainer(max_steps=1).fit(Iterating(), make_loader())


class _Adadelta(Classifier):
    """Adadelta keeps a ``rho`` of its own in every param group (a decay rate, 0.9)."""

    def __init__(self, group_rho: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.group_rho = group_rho or {}

    def configure_optimizers(self):
        return torch.optim.Adadelta([{"params": self.parameters(), **self.group_rho}], lr=1.0)


class _SAMAdadelta(SAMLightningModule, _Adadelta):
    pass


def test_an_optimizers_own_rho_is_not_sams():
    plain = _Adadelta()
    trainer(max_epochs=2).fit(plain, make_loader())
    sam = _SAMAdadelta(sam=SAM(rho=0.0))
    trainer(max_epochs=2).fit(sam, make_loader())
    assert_same_state(state_copy(plain), state_copy(sam))  # Adadelta's rho=0.9 was not taken for SAM's radius
    assert float(sam.sam_last_step.eps_norm) == 0.0
    own = _SAMAdadelta(sam=SAM(rho=0.0), group_rho={"sam_rho": 0.1})  # such groups take "sam_rho"
    trainer(max_steps=1).fit(own, make_loader())
    assert float(own.sam_last_step.eps_norm) == pytest.approx(0.1)


def test_a_trained_module_pickles_and_its_copy_trains_on():
    import pickle

    model = SAMClassifier(sam=SAM(rho=0.05))
    trainer(max_epochs=1).fit(model, make_loader())
    copied = pickle.loads(pickle.dumps(model))  # torch.save(model) pickles it too
    assert_same_state(state_copy(model), state_copy(copied))
    before = state_copy(copied)
    trainer(max_epochs=1).fit(copied, make_loader())
    assert not torch.equal(before["net.0.weight"], copied.net[0].weight) and copied.sam_last_step is not None


class _PopsLabels(Classifier):
    """Takes its labels out of a dict batch, as Hugging Face models are fed."""

    def training_step(self, batch, batch_idx):
        labels = batch.pop("labels")
        inputs = batch["inputs"]
        return F.cross_entropy(self(inputs[0]), labels)


class _SAMPopsLabels(SAMLightningModule, _PopsLabels):
    pass


@pytest.mark.parametrize("container", [dict, __import__("collections").UserDict])
def test_a_training_step_that_pops_from_its_batch_gets_it_whole_in_the_perturbed_pass(container):
    def loader():
        collate = lambda rows: container(  # noqa: E731
            inputs=[torch.stack([r[0] for r in rows])], labels=torch.stack([r[1] for r in rows])
        )
        return torch.utils.data.DataLoader(make_loader().dataset, batch_size=16, collate_fn=collate)

    plain = _PopsLabels()
    trainer(max_epochs=1).fit(plain, loader())
    sam = _SAMPopsLabels(sam=SAM(rho=0.0))
    trainer(max_epochs=1).fit(sam, loader())
    assert_same_state(state_copy(plain), state_copy(sam))


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor
    y: torch.Tensor


class _HalvesItsInputs(Classifier):
    """Reassigns a field of a dataclass batch (no tensor changed in place)."""

    def training_step(self, batch, batch_idx):
        batch.x = batch.x * 0.5
        return F.cross_entropy(self(batch.x), batch.y)


class _SAMHalvesItsInputs(SAMLightningModule, _HalvesItsInputs):
    pass


class _Rows(list):
    pass


class _PopsFromAListSubclass(Classifier):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1].pop("y"))


class _SAMPopsFromAListSubclass(SAMLightningModule, _PopsFromAListSubclass):
    pass


@pytest.mark.parametrize("case", ["dataclass-field", "list-subclass"])
def test_the_perturbed_pass_gets_the_batch_as_the_clean_pass_got_it(case):
    if case == "dataclass-field":
        plain, sam, collate = _HalvesItsInputs(), _SAMHalvesItsInputs(sam=SAM(rho=0.0)), lambda rows: _Batch(
            torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))  # fmt: skip
    else:
        plain, sam = _PopsFromAListSubclass(), _SAMPopsFromAListSubclass(sam=SAM(rho=0.0))
        collate = lambda rows: _Rows([torch.stack([r[0] for r in rows]), {"y": torch.stack([r[1] for r in rows])}])  # noqa: E731
    for module in (plain, sam):
        trainer(max_epochs=1).fit(module, torch.utils.data.DataLoader(make_loader().dataset, batch_size=16,
                                                                      collate_fn=collate))  # fmt: skip
    assert_same_state(state_copy(plain), state_copy(sam))


def test_the_mixin_leaves_the_order_of_the_trainers_callbacks_as_it_was():
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Spy(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(len(trainer.checkpoint_callbacks[0].best_k_models) if trainer.checkpoint_callbacks else 0)

    def run(module, tmp):
        t = trainer(max_steps=3, enable_checkpointing=True)
        t.callbacks.append(ModelCheckpoint(dirpath=tmp, every_n_train_steps=1, save_top_k=-1))  # after the Trainer
        spy = Spy()
        t.callbacks.append(spy)
        t.fit(module, make_loader())
        return spy.seen, [type(c).__name__ for c in t.callbacks if type(c).__name__ != "_UndoOnException"]

    import tempfile

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        assert run(Classifier(), a) == run(SAMClassifier(sam=SAM(0.05)), b)
