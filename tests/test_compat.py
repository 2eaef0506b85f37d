"""Pins down every private access in lightning_sam/_compat.py: an upgrade that breaks one fails here."""

import lightning.pytorch as pl
import torch
import torchmetrics

from lightning_sam._compat import (
    flag_non_finite_,
    grad_sync,
    loss_scale,
    metric_counters,
    set_metric_counters,
    should_update_logs,
    tensor_version,
)
from tests.helpers import Classifier, make_loader, trainer


def test_should_update_logs_follows_log_every_n_steps():
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append((trainer.global_step, should_update_logs(trainer)))

    trainer(max_steps=4, log_every_n_steps=2, callbacks=[Record()]).fit(Classifier(), make_loader())
    assert seen == [(1, False), (2, True), (3, False), (4, True)]


def test_loss_scale_is_the_scalers_scale_as_a_tensor():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert loss_scale(scaler) == 1024.0  # before its first scale(): the scale it will use
    scaler.scale(torch.ones(()))  # the scale tensor is created lazily
    assert isinstance(loss_scale(scaler), torch.Tensor) and loss_scale(scaler).item() == 1024.0


def test_flag_non_finite_sets_found_and_leaves_the_values():
    found, one = torch.zeros(()), torch.ones(())
    tensors = [torch.tensor([1.5, -0.0]), torch.tensor([3.0], dtype=torch.float64)]
    flag_non_finite_(tensors, found, one)
    assert found.item() == 0.0 and tensors[0].tolist() == [1.5, -0.0] and tensors[0][1].signbit()
    tensors[1][0] = float("inf")
    flag_non_finite_(tensors, found, one)
    assert found.item() == 1.0


def test_metric_counters_round_trip():
    metric = torchmetrics.SumMetric()
    counters = metric_counters(metric)
    metric.update(torch.tensor(2.0))
    metric.compute()
    assert metric_counters(metric) != counters
    set_metric_counters(metric, counters)
    assert metric_counters(metric) == counters and metric.update_count == 0


def test_grad_sync_toggles_ddp_and_leaves_other_models_alone(tmp_path):
    plain = torch.nn.Linear(2, 2)
    with grad_sync(plain, enabled=False):
        assert not hasattr(plain, "require_backward_grad_sync")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        assert ddp.require_backward_grad_sync
        with grad_sync(ddp, enabled=False):
            assert not ddp.require_backward_grad_sync
            with grad_sync(ddp, enabled=True):
                assert ddp.require_backward_grad_sync
            assert not ddp.require_backward_grad_sync
        assert ddp.require_backward_grad_sync
    finally:
        torch.distributed.destroy_process_group()


def test_tensor_version_counts_in_place_writes():
    t = torch.zeros(3)
    before = tensor_version(t)
    t.add_(1)
    assert tensor_version(t) == before + 1
    t.clone()
    assert tensor_version(t) == before + 1
