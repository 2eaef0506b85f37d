"""sam_step inside a module's own manual optimization, against a plain-torch reference."""

import copy

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.nn import functional as F

from lightning_sam import GSAM, SAM, SharpnessMonitor, sam_step
from lightning_sam.manual import sam_step_stats
from tests.helpers import Snapshots, assert_same_state, make_loader, make_net, state_copy, trainer

RHO = 0.05


class TwoOptimizers(pl.LightningModule):
    """SAM on the first layer's optimizer, a plain step for the rest, as a GAN does with D and G."""

    def __init__(self, method=None, fault=None, at_step=2):
        super().__init__()
        self.automatic_optimization = False
        self.net = make_net()
        self.method = method or SAM(RHO)
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
        self.fault, self.at_step, self.calls, self.seen_rest = fault, at_step, 0, []

    def loss(self, x, y):
        self.calls += 1
        logits = self.net(x)
        self.acc(logits, y)
        self.log("train/loss", F.cross_entropy(logits, y), reduce_fx="sum")
        # the other optimizer's weights as this pass sees them
        self.seen_rest.append(self.net[3].weight.detach().clone())
        loss = F.cross_entropy(logits, y)
        if self.fault and self.trainer.global_step // 2 == self.at_step and self.calls % 2 == 0:
            if self.fault == "nan":
                return loss * float("nan")
            raise RuntimeError("injected")
        return loss

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        sam_step(self, opt_a, lambda: self.loss(x, y), self.method)
        loss_b = F.cross_entropy(self.net(x), y)
        opt_b.zero_grad()
        self.manual_backward(loss_b)
        opt_b.step()

    def configure_optimizers(self):
        first = list(self.net[0].parameters())
        rest = [p for p in self.net.parameters() if all(p is not q for q in first)]
        return (
            torch.optim.SGD(first, lr=0.1, momentum=0.9, weight_decay=5e-4),
            torch.optim.SGD(rest, lr=0.05, momentum=0.9),
        )


def reference(net, loader, rho=RHO, alpha=None, skip=(), epochs=1, autocast=None):
    """SAM (Foret et al.) on the first layer only, one parameter at a time; a plain SGD step on the rest.

    alpha: GSAM's descent (Zhuang et al.), d = g_p - alpha (g - (g . g_p / ||g_p||^2) g_p) over the first
    layer. skip: the batch indices (counted over all epochs) whose SAM update is skipped, as after a
    non-finite loss: the first layer's weights, momentum and the BatchNorm statistics stay as before it.
    autocast: the dtype of a CPU autocast around each batch's passes, as Lightning's mixed precision does.
    """
    first = list(net[0].parameters())
    rest = [p for p in net.parameters() if all(p is not q for q in first)]
    opt_a = torch.optim.SGD(first, lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(rest, lr=0.05, momentum=0.9)
    net.train()
    batches = [batch for _ in range(epochs) for batch in loader]
    for i, (x, y) in enumerate(batches):
        loss = F.cross_entropy if autocast is None else torch.autocast("cpu", dtype=autocast)(F.cross_entropy)
        forward = net if autocast is None else torch.autocast("cpu", dtype=autocast)(net)
        before = [b.clone() for b in net.buffers()]
        net.zero_grad(set_to_none=True)
        loss(forward(x), y).backward()  # clean pass at w (BatchNorm statistics updated)
        with torch.no_grad():
            clean = [p.grad.clone() for p in first]
            norm = torch.sqrt(sum((p.grad**2).sum() for p in first))  # ||g|| over this optimizer's parameters
            saved = [p.clone() for p in first]
            for p in first:
                p.add_(rho * p.grad / (norm + 1e-12))  # w <- w + e
        buffers = [b.clone() for b in net.buffers()]
        net.zero_grad(set_to_none=True)
        loss(forward(x), y).backward()  # perturbed pass at w + e
        with torch.no_grad():
            for p, s in zip(first, saved):
                p.copy_(s)  # w <- w
            for b, s in zip(net.buffers(), buffers):
                b.copy_(s)  # statistics from the clean pass only
            if alpha is not None:
                dot = sum((g * p.grad).sum() for g, p in zip(clean, first))
                sq = sum((p.grad**2).sum() for p in first)
                for g, p in zip(clean, first):
                    p.grad = p.grad - alpha * (g - dot / (sq + 1e-12) * p.grad)
        if i in skip:
            with torch.no_grad():
                for b, s in zip(net.buffers(), before):
                    b.copy_(s)
        else:
            opt_a.step()
        opt_b.zero_grad()
        loss(forward(x), y).backward()
        opt_b.step()


def test_two_optimizers_match_the_reference_and_only_one_is_perturbed(tmp_path):
    loader = make_loader(batch_size=8, n=96)  # 12 steps
    model = TwoOptimizers()
    ref = copy.deepcopy(model.net)
    t = trainer(max_epochs=1, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1)
    t.fit(model, loader)
    assert t.global_step == 24 and model.calls == 24  # two optimizer steps and two closure calls per batch
    reference(ref, loader)
    assert_same_state(state_copy(model.net), state_copy(ref), atol=1e-6)
    for clean, perturbed in zip(model.seen_rest[::2], model.seen_rest[1::2]):
        assert torch.equal(clean, perturbed)  # the other optimizer's parameters are never perturbed
    assert model.net[1].num_batches_tracked.item() == 24  # the clean pass and opt_b's forward, not the perturbed
    assert model.acc.tp.sum() + model.acc.fn.sum() == 96  # torchmetrics count each sample once
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert len([r for r in lines[1:] if r.split(",")[lines[0].split(",").index("train/loss")]]) == 12


def test_nonfinite_skips_that_optimizer_only():
    model = TwoOptimizers(fault="nan", at_step=2)
    ref = copy.deepcopy(model.net)
    snaps = Snapshots()
    loader = make_loader(batch_size=16)
    with pytest.warns(RuntimeWarning, match="skipped the update"):
        trainer(max_steps=8, callbacks=[snaps]).fit(model, loader)
    assert len(snaps.states) == 4 and model.calls == 8  # 4 batches, each with both SAM passes
    (state_2, _), (state_3, _) = snaps.states[2], snaps.states[3]
    assert torch.equal(state_2["net.0.weight"], state_3["net.0.weight"])  # SAM's optimizer skipped
    assert not torch.equal(state_2["net.3.weight"], state_3["net.3.weight"])  # the other one stepped
    # the SAM steps before and after the skipped one are SAM's, and the skip left no trace
    reference(ref, list(loader)[:4], skip={2})
    assert_same_state(state_copy(model.net), state_copy(ref), atol=1e-6)


def test_exception_in_the_perturbed_pass_restores_the_weights():
    model = TwoOptimizers(fault="raise", at_step=1)
    snaps = Snapshots()
    with pytest.raises(RuntimeError, match="injected"):
        trainer(max_steps=8, callbacks=[snaps]).fit(model, make_loader(batch_size=16))
    assert_same_state({k: v for k, v in snaps.states[1][0].items() if "net.0" in k},
                      {k: v for k, v in state_copy(model).items() if "net.0" in k})  # fmt: skip


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision(precision):
    kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu")]} if precision == "16-mixed" else {"precision": precision}
    model = TwoOptimizers()
    ref = copy.deepcopy(model.net)
    before = state_copy(model)
    loader = make_loader(batch_size=16)
    norms = []

    class Norms(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            norms.append(sam_step_stats(pl_module)[0].grad_norm.item())

    trainer(max_epochs=2, callbacks=[Norms()], **kwargs).fit(model, loader)
    after = state_copy(model)
    assert max(norms) < 100  # reported unscaled at every step, the first included (16-mixed scales by 65536)
    assert model.calls == 2 * 6 * 2  # 2 epochs of 6 batches, both SAM passes on each
    assert not torch.equal(before["net.0.weight"], after["net.0.weight"])
    # the plain-torch reference under the same autocast (16-mixed's loss scale, a power of 2, changes nothing)
    reference(ref, loader, epochs=2, autocast=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)
    assert_same_state(state_copy(model.net), state_copy(ref), atol=1e-6)


def test_sharpness_monitor_keys_by_optimizer_when_several_take_sam_steps(tmp_path):
    class BothSAM(TwoOptimizers):
        def __init__(self):
            super().__init__()
            self.method_b = SAM(0.1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt_a, opt_b = self.optimizers()
            sam_step(self, opt_a, lambda: F.cross_entropy(self.net(x), y), self.method)
            sam_step(self, opt_b, lambda: F.cross_entropy(self.net(x), y), self.method_b)

    t = trainer(max_steps=4, callbacks=[SharpnessMonitor()], log_every_n_steps=1)
    t.fit(BothSAM(), make_loader(batch_size=16))
    assert t.callback_metrics["sam/opt0/rho"].item() == pytest.approx(0.05)
    assert t.callback_metrics["sam/opt1/eps_norm"].item() == pytest.approx(0.1, rel=1e-4)
    t = trainer(max_steps=2, callbacks=[SharpnessMonitor()], log_every_n_steps=1)
    t.fit(TwoOptimizers(), make_loader(batch_size=16))
    assert t.callback_metrics["sam/eps_norm"].item() == pytest.approx(RHO, rel=1e-4)


def test_schedules_count_this_optimizers_own_steps():
    model = TwoOptimizers(method=SAM(RHO, interval=2))
    t = trainer(max_steps=8, enable_checkpointing=False)
    t.fit(model, make_loader(batch_size=16))
    assert model.calls == 4 + 2  # 4 steps of opt_a: SAM on steps 0 and 2 (two calls), plain on 1 and 3
    assert t.optimizers[0].param_groups[0]["sam_steps"] == 4


def test_gsam_needs_the_clean_gradient_and_runs():
    model = TwoOptimizers(method=GSAM(RHO, alpha=0.2))
    ref = copy.deepcopy(model.net)
    loader = make_loader(batch_size=16)
    trainer(max_steps=4).fit(model, loader)
    assert model.calls == 4  # 2 batches, 2 passes each
    reference(ref, list(loader)[:2], alpha=0.2)  # GSAM's descent, from the clean and perturbed gradients
    assert_same_state(state_copy(model.net), state_copy(ref), atol=1e-6)


def test_bad_input_is_refused_before_any_work():
    class Automatic(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(6, 3)

        def training_step(self, batch, batch_idx):
            return sam_step(self, self.optimizers(), lambda: self.net(batch[0]).sum(), SAM())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match=r"`sam_step` is for manual optimization"):
        trainer(max_steps=1).fit(Automatic(), make_loader())

    class BadMethod(TwoOptimizers):
        def training_step(self, batch, batch_idx):
            sam_step(self, self.optimizers()[0], lambda: self.net(batch[0]).sum(), 0.05)

    model = BadMethod()
    before = state_copy(model)
    with pytest.raises(TypeError, match=r"`method` to be a method object"):
        trainer(max_steps=1).fit(model, make_loader())
    assert_same_state(before, state_copy(model))
    with pytest.raises(RuntimeError, match="inside a Trainer's fit"):
        sam_step(TwoOptimizers(), None, lambda: None, SAM())


def test_gan_example_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "gan_sam.py"
    result = subprocess.run([sys.executable, str(script), "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SAM on D:" in result.stdout and "modes covered" in result.stdout
