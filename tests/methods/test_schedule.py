"""RhoSchedule: its shapes at chosen steps, in training, following the learning rate; its arguments."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_sam import GSAM, SAM, RhoSchedule
from tests.helpers import SAMClassifier, make_loader, trainer


def test_rho_schedules_at_chosen_steps():
    cosine = RhoSchedule("cosine", total_steps=110, rho_min=0.01, warmup_steps=10)
    assert cosine.rho(0, 0.05) == pytest.approx(0.005)  # warm-up: 1/10 of the way
    assert cosine.rho(9, 0.05) == pytest.approx(0.05)
    assert cosine.rho(60, 0.05) == pytest.approx(0.03)  # half way down
    assert cosine.rho(110, 0.05) == pytest.approx(0.01) == cosine.rho(500, 0.05)
    linear = RhoSchedule("linear", total_steps=100, rho_min=0.0)
    assert [linear.rho(t, 0.1) for t in (0, 25, 100)] == pytest.approx([0.1, 0.075, 0.0])
    assert RhoSchedule().rho(12345, 0.05) == 0.05
    follow = RhoSchedule("lr", rho_min=0.02, lr_max=0.1, lr_min=0.0)
    assert [follow.rho(0, 0.05, lr=lr) for lr in (0.1, 0.05, 0.0)] == pytest.approx([0.05, 0.035, 0.02])


def test_scheduled_rho_is_used_in_training_and_is_a_function_of_the_step():
    seen = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step - 1] = (pl_module.sam_last_step.rho, pl_module.sam_last_step.eps_norm.item())

    schedule = RhoSchedule("linear", total_steps=6, rho_min=0.01)
    trainer(max_steps=6, callbacks=[Record()]).fit(SAMClassifier(sam=SAM(0.05, rho_schedule=schedule)), make_loader())
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]  # every step is checked below
    for step, (rho, eps_norm) in seen.items():
        assert rho == pytest.approx(schedule.rho(step, 0.05))
        assert eps_norm == pytest.approx(rho, rel=1e-4)


def test_rho_follows_the_learning_rate():
    seen = []

    class Decaying(SAMClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module.sam_last_step.rho)

    method = GSAM(0.05, rho_schedule=RhoSchedule("lr", rho_min=0.01, lr_max=0.1))
    trainer(max_epochs=3, callbacks=[Record()]).fit(Decaying(sam=method), make_loader(batch_size=48))
    assert seen == pytest.approx([0.05, 0.05, 0.03, 0.03, 0.02, 0.02])  # lr 0.1, 0.05, 0.025


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(shape="constant", total_steps=-5), ValueError, r"`total_steps` to be an int >= 1, got -5"),
        (dict(shape="constant", lr_max=-3.0), ValueError, r"`lr_max` to be a finite, non-negative float, got -3.0"),
        (dict(shape="cosine", total_steps=10, lr_min=-1.0), ValueError, r"`lr_min` to be a finite, non-negative"),
        (dict(shape="linear", total_steps=10, lr_max=0.1, lr_min=0.2), ValueError, r"`lr_max` to be a float > lr_min"),
        (dict(shape="constant", total_steps=5, warmup_steps=5), ValueError, r"`total_steps` to be an int >= 6"),
        (dict(shape="constant", total_steps=2.5), TypeError, r"`total_steps` to be an int >= 1, got 2.5"),
    ],
)
def test_every_rho_schedule_argument_given_is_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        RhoSchedule(**kwargs)
