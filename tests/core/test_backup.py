import torch
import torchmetrics

from lightning_sam import ParamGroup, WeightBackup
from lightning_sam.core.backup import BufferBackup, GradientStash, MetricStates


def _group(params, rho):
    return ParamGroup(rho, params, [p.grad for p in params])


def test_weight_backup_restores_bit_for_bit():
    # 0.1 + 3e7 rounds to 3e7 in float32, so subtracting e would give 0, not 0.1
    w = torch.tensor([0.1, 1.0, -2.5], requires_grad=True)
    original = w.detach().clone()
    w.grad = torch.tensor([3.0e7, 1e-3, 0.1])
    backup = WeightBackup()
    group = _group([w], 1.0)
    backup.perturb_([group], [torch.tensor(1.0)])
    assert not torch.equal(w.detach(), original)
    assert not torch.equal(w.detach() - w.grad, original)
    backup.restore_()
    assert torch.equal(w.detach(), original)
    # the copy is kept until discarded, so a second restore (e.g. after a failed step) is exact too
    with torch.no_grad():
        w.add_(5.0)
    backup.restore_()
    assert torch.equal(w.detach(), original)
    backup.discard()
    with torch.no_grad():
        w.add_(5.0)
    backup.restore_()
    assert torch.equal(w.detach(), original + 5.0)


def test_weight_backup_reuses_its_buffer():
    w = torch.ones(3, requires_grad=True)
    w.grad = torch.ones(3)
    backup = WeightBackup()
    backup.perturb_([_group([w], 1.0)], [torch.tensor(1.0)])
    buffer = backup._saved[0]
    backup.restore_()
    backup.perturb_([_group([w], 1.0)], [torch.tensor(1.0)])
    assert backup._saved[0] is buffer


def test_buffer_backup_undoes_batchnorm_updates_and_reuses_storage():
    bn = torch.nn.BatchNorm1d(3)
    backup = BufferBackup()
    backup.save_(list(bn.buffers()))
    saved = backup._saved[0]
    bn(torch.randn(8, 3) + 5)
    backup.restore_()
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0
    backup.save_(list(bn.buffers()))
    assert backup._saved[0] is saved
    backup.discard()
    bn(torch.randn(8, 3) + 5)
    backup.restore_()  # nothing held: no effect
    assert int(bn.num_batches_tracked) == 1


def test_metric_states_put_shared_compute_group_states_back():
    metrics = torchmetrics.MetricCollection(
        [torchmetrics.classification.MulticlassPrecision(3), torchmetrics.classification.MulticlassRecall(3)]
    )
    preds, target = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])
    metrics.update(preds, target)
    before = {k: v.item() for k, v in metrics.compute().items()}
    saved = MetricStates(list(metrics.values(copy_state=False)))
    metrics.update(torch.tensor([0, 0, 0, 0]), torch.tensor([2, 2, 2, 2]))
    saved.restore()
    assert {k: v.item() for k, v in metrics.compute().items()} == before


def test_gradient_stash_gives_back_sums_and_none_elsewhere():
    a, b, c = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    a.grad, b.grad = torch.full((2,), 2.0), torch.full((2,), 3.0)
    stash = GradientStash()
    stash.take_([a, b, c])
    assert a.grad is None and b.grad is None and c.grad is None
    (a * 5 + c * 7).sum().backward()  # a new micro-batch's own gradient; b unused
    stash.give_back_([a, b, c])
    assert torch.equal(a.grad, torch.full((2,), 2.0)) and torch.equal(b.grad, torch.full((2,), 3.0))
    assert c.grad is None  # no earlier sum: no gradient, so a pass that misses c leaves it without one
    stash.discard()
    stash.give_back_([a])
    assert a.grad is None
