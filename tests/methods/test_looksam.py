"""LookSAM on a quadratic, its one-pass steps, and its stored direction after a skipped step."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_sam import LookSAM
from tests.helpers import SAMClassifier, fit_quadratic, make_loader, trainer


def test_looksam_on_a_quadratic(quadratic):
    a, w0 = quadratic
    rho, k, alpha, lr = 0.1, 3, 0.7, 0.05
    w, gv = w0.clone(), None
    for step in range(7):
        g = a @ w
        if step % k == 0:
            gs = a @ (w + rho * g / g.norm())
            gv = gs - (g @ gs) / (g @ g) * g  # the part of g_s orthogonal to g
            d = gs
        else:
            d = g + alpha * g.norm() / gv.norm() * gv
        w = w - lr * d
    torch.testing.assert_close(fit_quadratic(a, w0, LookSAM(rho, k=k, alpha=alpha), 7, lr), w, rtol=1e-10, atol=1e-12)


def test_plain_steps_take_one_forward():
    calls = []

    class Counted(SAMClassifier):
        def training_step(self, batch, batch_idx):
            calls.append(self.trainer.global_step)
            return super().training_step(batch, batch_idx)

    trainer(max_steps=6).fit(Counted(sam=LookSAM(0.05, k=3)), make_loader(batch_size=16))
    assert calls == [0, 0, 1, 2, 3, 3, 4, 5]


def test_looksam_drops_its_direction_when_a_sam_step_is_skipped():
    class NaNOnce(SAMClassifier):
        calls = 0

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            NaNOnce.calls += 1
            return loss * float("nan") if NaNOnce.calls == 2 else loss  # the perturbed pass of step 0

    stored = {}

    class Stored(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            stored[trainer.global_step] = bool(pl_module.sam.state.gv)

    model = NaNOnce(sam=LookSAM(0.05, k=3, alpha=0.7))
    with pytest.warns(RuntimeWarning, match="skipped the update at global step 0"):
        trainer(max_steps=6, callbacks=[Stored()]).fit(model, make_loader(batch_size=16))
    assert model.sam_skipped_steps == 1
    assert stored == {0: False, 1: False, 2: False, 3: False, 4: True, 5: True}  # dropped until step 3 stores it
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.sam.state.gv and model.sam.state_dict()["gv"] is not None  # stored again by the SAM step at step 3
