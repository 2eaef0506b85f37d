"""The perturbed pass starts where the clean pass started: the same random draws, the same buffers.

With ``rho = 0`` a SAM step is then plain training's, draw for draw, for models whose forward draws
random numbers (dropout, augmentation with torch, NumPy or Python's ``random``) or updates buffers
other than BatchNorm's (spectral norm's power-iteration vectors, a running mean of the user's).
"""

import math
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sam import AESAM, SAM, SAMLightningModule, sam_step
from lightning_sam.optim import SAM as SAMOptimizer
from tests.helpers import SAMClassifier, assert_same_state, make_loader, state_copy, trainer


class Noisy(nn.Module):
    """Dropout, spectral norm, BatchNorm and a running mean of the inputs kept by the forward itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.utils.parametrizations.spectral_norm(nn.Linear(6, 16))
        self.bn, self.drop, self.head = nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 3)
        self.register_buffer("seen_mean", torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.seen_mean.mul_(0.9).add_(x.mean(0), alpha=0.1)
        return self.head(self.drop(F.relu(self.bn(self.first(x - self.seen_mean)))))


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Noise from all three global generators a training_step may draw from."""
    scale = 1 + 0.1 * random.random() + 0.1 * float(np.random.rand())
    return x * scale + 0.05 * torch.randn_like(x)


class Plain(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Noisy()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(_augment(x)), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class SAMPlain(SAMLightningModule, Plain):
    pass


def _seed() -> None:
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)


def _after_fit() -> tuple:
    """Where every generator stands after the fit: the next draws of each."""
    return torch.rand(3), random.random(), float(np.random.rand())


def _assert_same_next(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]  # the generators stand where plain training left them


def _fit(module: pl.LightningModule, **kwargs) -> tuple[dict, tuple]:
    _seed()
    t = trainer(max_epochs=2, deterministic=False, **kwargs)
    t.fit(module, torch.utils.data.DataLoader(make_loader().dataset, batch_size=16, shuffle=True))
    return state_copy(module), _after_fit()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_rho_0_trains_like_plain_lightning_draw_for_draw(accumulate):
    plain, plain_next = _fit(Plain(), accumulate_grad_batches=accumulate)
    model = SAMPlain(sam=SAM(rho=0.0))
    sam, sam_next = _fit(model, accumulate_grad_batches=accumulate)
    assert_same_state(plain, sam)  # weights, BatchNorm, spectral norm's vectors, the user's running mean
    _assert_same_next(plain_next, sam_next)
    assert model.sam_last_step.sharpness == 0  # the perturbed pass saw the same masks and noise


def test_buffers_are_updated_once_per_step_at_w_with_rho_above_0():
    def one_step(module: pl.LightningModule) -> Noisy:
        _seed()
        trainer(max_steps=1, deterministic=False).fit(module, make_loader())
        return module.net

    plain, sam = one_step(Plain()), one_step(SAMPlain(sam=SAM(rho=0.5)))
    assert torch.equal(plain.seen_mean, sam.seen_mean)  # the clean forward's update, at w, once
    assert torch.equal(plain.bn.running_mean, sam.bn.running_mean) and int(sam.bn.num_batches_tracked) == 1
    u, v = "first.parametrizations.weight.0._u", "first.parametrizations.weight.0._v"
    assert torch.equal(plain.get_buffer(u), sam.get_buffer(u)) and torch.equal(plain.get_buffer(v), sam.get_buffer(v))


class Freezing(pl.Callback):
    """Freezes BatchNorm's statistics from epoch 1 the way some finetuning code does."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.net.bn.track_running_stats = False


def test_track_running_stats_switched_off_mid_fit_stays_off():
    plain, _ = _fit(Plain(), callbacks=[Freezing()])
    model = SAMPlain(sam=SAM(rho=0.0))
    sam, _ = _fit(model, callbacks=[Freezing()])
    assert model.net.bn.track_running_stats is False
    assert_same_state(plain, sam)


class ManualPlain(Plain):
    def __init__(self, method=None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.method = method

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()

        def closure():
            return F.cross_entropy(self.net(_augment(x)), y)

        if self.method is not None:
            sam_step(self, opt, closure, self.method)
        else:
            opt.zero_grad()
            self.manual_backward(closure())
            opt.step()


def test_sam_step_with_rho_0_trains_like_a_plain_manual_step():
    plain, plain_next = _fit(ManualPlain())
    sam, sam_next = _fit(ManualPlain(SAM(rho=0.0)))
    assert_same_state(plain, sam)
    _assert_same_next(plain_next, sam_next)


def test_the_optimizer_wrapper_step_with_rho_0_trains_like_its_base_optimizer():
    def run(wrapped: bool) -> tuple[dict, tuple]:
        _seed()
        net = Noisy()
        opt = (SAMOptimizer(net.parameters(), torch.optim.SGD, rho=0.0, module=net, lr=0.1, momentum=0.9) if wrapped
               else torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))  # fmt: skip
        for x, y in torch.utils.data.DataLoader(make_loader().dataset, batch_size=16, shuffle=True):

            def closure(x=x, y=y):
                loss = F.cross_entropy(net(_augment(x)), y)
                loss.backward()
                return loss

            opt.zero_grad()
            opt.step(closure)
        return state_copy(net), _after_fit()

    plain, plain_next = run(False)
    sam, sam_next = run(True)
    assert_same_state(plain, sam)
    _assert_same_next(plain_next, sam_next)


class _DrawsBeforeBackward(pl.Callback):
    """A callback drawing from torch's generator between the clean forward and the perturbed pass."""

    def on_before_backward(self, trainer, pl_module, loss):
        self.last = torch.rand(1)


def test_draws_between_the_passes_are_not_replayed_into_the_next_step():
    plain, plain_next = _fit(Plain(), callbacks=[_DrawsBeforeBackward()])
    sam, sam_next = _fit(SAMPlain(sam=SAM(rho=0.0)), callbacks=[_DrawsBeforeBackward()])
    assert_same_state(plain, sam)
    _assert_same_next(plain_next, sam_next)


class _SavesTheModule(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import io

        torch.save(pl_module, io.BytesIO())  # mid accumulation window: an update is open


@pytest.mark.parametrize("method", [SAM(rho=0.05), AESAM(rho=0.05, c=math.inf)], ids=["sam", "aesam-plain"])
def test_a_module_pickles_in_the_middle_of_an_accumulation_window(method):
    model = SAMClassifier(sam=method)  # (spectral norm's parametrization does not pickle: not Noisy)
    trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[_SavesTheModule()]).fit(model, make_loader())
    assert model.trainer.global_step == 3


class _Replacing(Plain):
    """A forward that replaces its buffer (``self.seen = ...``) instead of updating it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(6))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen = 0.9 * self.seen + 0.1 * x.mean(0)
        return F.cross_entropy(self.net(x - self.seen), y)


class _SAMReplacing(SAMLightningModule, _Replacing):
    pass


def test_a_buffer_the_forward_replaces_is_followed():
    plain, _ = _fit(_Replacing())
    sam, _ = _fit(_SAMReplacing(sam=SAM(rho=0.0)))
    assert_same_state(plain, sam)  # `seen` updated once a step, as in plain training
