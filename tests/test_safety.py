"""Mixed precision, non-finite steps, exceptions and resume: nothing is ever lost."""

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_sam import ASAM, SAM, LatePhaseSAM, MomentumSAM, SAMLightningModule
from tests.helpers import (
    Classifier,
    SAMClassifier,
    Snapshots,
    assert_same_state,
    make_loader,
    state_copy,
    trainer,
)

# ---------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains(precision):
    plugins = [MixedPrecision("16-mixed", "cpu")] if precision == "16-mixed" else []
    kwargs = {"plugins": plugins} if plugins else {"precision": precision}
    model = SAMClassifier(sam=SAM(0.05))
    before = state_copy(model.net)
    norms = []

    class Norms(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            norms.append(pl_module.sam_last_step.grad_norm.item())

    t = trainer(max_epochs=3, callbacks=[Norms()], **kwargs)
    t.fit(model, make_loader(batch_size=16))
    after = state_copy(model.net)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(before["0.weight"], after["0.weight"])
    assert model.sam_last_step.eps_norm.item() == pytest.approx(0.05, rel=1e-2)
    if precision == "16-mixed":
        # grad_norm is reported unscaled: compare with an fp32 evaluation of the same batch
        assert max(norms) < 100  # every step, the first included (before the scaler made its scale tensor)


class _Overflow(Classifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e4 if self.trainer.global_step == 1 else loss  # scaled by 65536: inf in fp16


class _SAMOverflow(SAMLightningModule, _Overflow):
    pass


def _fit_overflowing(model: pl.LightningModule) -> tuple[list, pl.Trainer]:
    states = []

    class Snap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            states.append((state_copy(pl_module.net), copy.deepcopy(trainer.optimizers[0].state_dict())))

    t = trainer(max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu")], callbacks=[Snap()])
    t.fit(model, make_loader(batch_size=16))
    return states, t


def test_fp16_overflow_is_the_grad_scalers_skip_as_in_plain_lightning():
    plain_states, plain = _fit_overflowing(_Overflow())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the scaler's routine: no warning of ours
        states, t = _fit_overflowing(_SAMOverflow(sam=SAM(0.0)))
    assert t.global_step == plain.global_step == 3 and t.lightning_module.sam_skipped_steps == 0
    assert t.precision_plugin.scaler.get_scale() == plain.precision_plugin.scaler.get_scale() == 65536.0 / 2
    for (ours, _), (theirs, _) in zip(states, plain_states, strict=True):
        assert_same_state(ours, theirs)  # BatchNorm statistics kept from the overflowing step's forward too

    states, t = _fit_overflowing(_SAMOverflow(sam=SAM(0.05)))
    weights = [{k: v for k, v in s.items() if "running" not in k and "tracked" not in k} for s, _ in states]
    assert_same_state(weights[1], weights[2])  # the overflowing step changed no weight
    before, after = states[1][1]["state"], states[2][1]["state"]
    assert before and before.keys() == after.keys()
    for i in before:  # nor the optimizer's state
        assert all(torch.equal(v, after[i][k]) for k, v in before[i].items())
    assert all(torch.isfinite(v).all() for v in state_copy(t.lightning_module.net).values())


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
    assert_same_state(params_2, params_3)
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
    assert_same_state(snaps.states[2][0], state_copy(model))


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
    before = state_copy(model)
    with pytest.raises(MemoryError, match="injected"):
        trainer(max_steps=1).fit(model, make_loader(batch_size=16))
    assert_same_state(before, state_copy(model))


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
    assert_same_state(state_copy(full), state_copy(resumed))
    assert resumed.trainer.global_step == full.trainer.global_step == 12


def test_a_checkpoint_written_during_the_perturbed_pass_holds_w(tmp_path):
    # Lightning's SLURM requeue handler calls trainer.save_checkpoint from a signal handler, at any point
    class SavesMidStep(SAMClassifier):
        calls = 0

        def training_step(self, batch, batch_idx):
            self.calls += 1
            if self.calls == 4:  # the perturbed pass of the second step
                self.trainer.save_checkpoint(tmp_path / "mid.ckpt")
            return super().training_step(batch, batch_idx)

    snaps = Snapshots()
    model = SavesMidStep(sam=SAM(0.5))
    trainer(max_steps=2, callbacks=[snaps]).fit(model, make_loader(batch_size=16))
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=True)["state_dict"]
    before_step = snaps.states[1][0]
    for name, _ in model.named_parameters():
        assert torch.equal(saved[name], before_step[name]), name  # w, not w + e


class _ResumableLoader(torch.utils.data.DataLoader):
    """A loader Lightning resumes mid-epoch (``state_dict``/``load_state_dict``): it skips what was consumed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.consumed, self.skip = 0, 0

    def __iter__(self):
        skip, self.skip, self.consumed = self.skip, 0, 0
        for i, batch in enumerate(super().__iter__()):
            self.consumed += 1
            if i >= skip:
                yield batch

    def state_dict(self):
        return {"consumed": self.consumed}

    def load_state_dict(self, state):
        self.skip = state["consumed"]


class _SaveAt(pl.Callback):
    def __init__(self, path, step):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("method", [SAM(rho=0.05), LatePhaseSAM(rho=0.05, start=0.5)], ids=["sam", "late_phase"])
def test_a_mid_epoch_resume_with_a_resumable_loader_is_exact(tmp_path, method):
    """The training data is not loaded before the checkpoint's loader position is restored."""
    path = tmp_path / "mid.ckpt"

    def fit(callbacks, ckpt_path=None):
        model = SAMClassifier(sam=copy.deepcopy(method))
        t = trainer(max_epochs=2, callbacks=callbacks)
        t.fit(model, _ResumableLoader(make_loader().dataset, batch_size=16), ckpt_path=ckpt_path)  # 6 batches
        return state_copy(model), t

    whole, _ = fit([_SaveAt(path, 4)])
    resumed, t = fit([], ckpt_path=path)
    assert t.global_step == 12
    assert_same_state(whole, resumed)


class _RaiseBeforeBackward(pl.Callback):
    """Raises in on_before_backward of batch 2: the first micro-batch of the second accumulation window."""

    def __init__(self):
        self.batch_idx, self.before = -1, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_idx = batch_idx
        if batch_idx == 2:
            self.before = state_copy(pl_module)

    def on_before_backward(self, trainer, pl_module, loss):
        if self.batch_idx == 2:
            raise RuntimeError("injected")


@pytest.mark.parametrize("method", [SAM(0.05), MomentumSAM(0.5)], ids=["sam", "msam"])
def test_an_exception_between_the_passes_of_an_earlier_micro_batch_puts_everything_back(method):
    """Lightning runs micro-batches before the last outside optimizer_step: the mixin's callback undoes them too."""
    raising = _RaiseBeforeBackward()
    model = SAMClassifier(sam=method)
    with pytest.raises(RuntimeError, match="injected"):
        trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[raising]).fit(model, make_loader())
    assert_same_state(raising.before, state_copy(model))  # single-pass: not left at w + e; BatchNorm: as before
