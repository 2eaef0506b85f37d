"""HessianMonitor: the top Hessian eigenvalue on fixed batches, on its schedule, without changing training."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sam import SAM
from lightning_sam.callbacks import HessianMonitor
from tests.helpers import SAMClassifier, make_data, trainer


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


class WithUnusedHead(nn.Module):
    """A body the loss goes through and a trainable head it never reaches (as in multi-task models)."""

    def __init__(self, body: nn.Module, head: bool = True):
        super().__init__()
        self.body = body
        self.head = nn.Linear(4, 5) if head else None  # registered after the body: same start vector there

    def forward(self, x):
        return self.body(x)


class UnusedHeadClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.aux_head = nn.Linear(8, 2)  # trainable, never used by the loss

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_hessian_monitor_on_a_module_with_an_unused_head():
    monitor = HessianMonitor(num_batches=2, iters=10)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    t = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, callbacks=[monitor], logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    t.fit(UnusedHeadClassifier(), torch.utils.data.DataLoader(data, batch_size=8, shuffle=False))
    assert [epoch for epoch, _ in monitor.history] == [0, 1]
    assert monitor.history[-1][1] > 0
    assert t.callback_metrics["sharpness/hessian_max_eig"].item() == pytest.approx(monitor.history[-1][1])


class RecordLogged(pl.Callback):
    def __init__(self):
        self.logged = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.logged.append("sharpness/hessian_max_eig" in trainer.callback_metrics)


def test_hessian_monitor_logs_on_schedule_and_leaves_training_unchanged():
    loader = torch.utils.data.DataLoader(make_data(), batch_size=16, shuffle=True)  # draws from the global RNG
    finals = {}
    for name in ("with", "without"):
        monitor = HessianMonitor(every_n_epochs=2, num_batches=2, iters=10)
        record = RecordLogged()

        pl.seed_everything(0)
        model = SAMClassifier(sam=SAM(0.05))
        callbacks = [monitor, record] if name == "with" else []
        trainer(max_epochs=5, callbacks=callbacks).fit(model, loader)
        finals[name] = _weights(model) + [b.clone() for b in model.buffers()]
        if name == "with":
            assert [epoch for epoch, _ in monitor.history] == [1, 3, 4]  # every 2nd epoch and the last
            assert all(value > 0 for _, value in monitor.history)
            assert record.logged == [False, True, True, True, True]
    assert all(torch.equal(a, b) for a, b in zip(finals["with"], finals["without"]))


def test_hessian_monitor_arguments():
    with pytest.raises(ValueError, match=r"`every_n_epochs` to be an int >= 1, got 0"):
        HessianMonitor(every_n_epochs=0)
