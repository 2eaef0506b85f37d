import csv

import lightning.pytorch as pl
import pytest
import torch

from lightning_sam import SAM, SharpnessMonitor
from tests.helpers import Classifier, SAMClassifier, make_loader, trainer

KEYS = ["sam/eps_norm", "sam/grad_norm", "sam/perturbed_loss", "sam/rho", "sam/sharpness"]


def _rows(tmp_path):
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_logs_every_log_every_n_steps_through_any_logger(tmp_path):
    model = SAMClassifier(sam=SAM(0.05))
    t = trainer(
        max_epochs=2, callbacks=[SharpnessMonitor()], logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=2
    )
    t.fit(model, make_loader(batch_size=16))  # 6 steps an epoch, 12 in all
    rows = [r for r in _rows(tmp_path) if r["sam/sharpness"]]
    assert [int(r["step"]) for r in rows] == [1, 3, 5, 7, 9, 11]  # Lightning's logging steps
    for r in rows:
        assert float(r["sam/rho"]) == pytest.approx(0.05)
        assert float(r["sam/eps_norm"]) == pytest.approx(0.05, rel=1e-4)
        assert float(r["sam/sharpness"]) == pytest.approx(float(r["sam/perturbed_loss"]) - float(r["train/loss"]))
        assert float(r["sam/grad_norm"]) > 0
    assert set(KEYS) <= set(t.logged_metrics)


def test_values_are_the_steps_own_figures():
    class Check(pl.Callback):
        def __init__(self):
            self.checked = []  # the keys compared, per step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stats, compared = pl_module.sam_last_step, []
            for key, value in stats.as_dict().items():
                torch.testing.assert_close(trainer.callback_metrics[key], torch.as_tensor(value, dtype=torch.float32))
                compared.append(key)
            self.checked.append(sorted(compared))

    check = Check()
    trainer(max_steps=3, callbacks=[SharpnessMonitor(), check], log_every_n_steps=1).fit(SAMClassifier(), make_loader())
    assert check.checked == [KEYS] * 3  # every step, every figure


def test_monitor_adds_no_forward_or_backward_and_changes_nothing():
    calls = {"with": 0, "without": 0}
    finals = {}
    for name, callbacks in (("with", [SharpnessMonitor()]), ("without", [])):

        class Counted(SAMClassifier):
            def forward(self, x, _name=name):
                calls[_name] += 1
                return super().forward(x)

        model = Counted()
        trainer(max_steps=4, callbacks=callbacks, log_every_n_steps=1).fit(model, make_loader())
        finals[name] = model.net[0].weight.detach().clone()
    assert calls["with"] == calls["without"] == 8
    assert torch.equal(finals["with"], finals["without"])


def test_monitor_on_a_plain_module_warns_once_and_logs_nothing(tmp_path):
    # one callback list for a baseline and a SAM run: the baseline trains, the monitor stays silent
    t = trainer(
        max_epochs=2, callbacks=[SharpnessMonitor()], logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1
    )
    message = r"SharpnessMonitor does nothing for Classifier: .*`class SAMClassifier\(SAMLightningModule, Classifier\)`"
    with pytest.warns(UserWarning, match=message) as record:
        t.fit(Classifier(), make_loader(batch_size=16))
    assert sum("SharpnessMonitor does nothing" in str(w.message) for w in record) == 1
    assert t.global_step == 12  # it trained all its steps
    assert "train/loss" in t.callback_metrics  # the module's own logging goes through
    assert not [k for k in t.callback_metrics if k.startswith("sam/")]
    rows = _rows(tmp_path)
    assert len([r for r in rows if r.get("train/loss")]) == 12
    assert not [k for k in rows[0] if k.startswith("sam/")]
