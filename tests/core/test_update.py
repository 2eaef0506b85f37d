"""SAMUpdate, the step shared by the mixin and sam_step, driven directly in plain torch."""

import copy

import pytest
import torch
from torch.nn import functional as F

from lightning_sam import ASAM, SAM
from lightning_sam.core.update import SAMUpdate
from tests.helpers import make_loader, make_net, reference_sam


def _sam_steps(net, optimizer, loader, method):
    update = SAMUpdate(method)
    update.bind_(net, optimizer)
    for step, (x, y) in enumerate(loader):
        optimizer.zero_grad()
        update.open_(step, optimizer)
        loss = F.cross_entropy(net(x), y)
        update.ascend_(optimizer, loss, loss.backward)

        def perturbed(x=x, y=y):
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        update.descend_(perturbed)
        assert not update.close_(optimizer)
        optimizer.step()
        update.end_()
    return update


@pytest.mark.parametrize(("method", "eta"), [(SAM(0.05), None), (ASAM(0.5, 0.01), 0.01)], ids=["sam", "asam"])
def test_plain_torch_use_matches_the_reference(method, eta):
    loader = make_loader(batch_size=16)
    net = make_net()
    reference = copy.deepcopy(net)
    _sam_steps(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), loader, method)
    reference_sam(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), loader, method.rho, eta)
    for (key, value), expected in zip(net.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)


def _ascended(method, **sgd):
    """A net at w + e after one clean pass: (net, optimizer, update, batch, state before)."""
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, **sgd)
    before = copy.deepcopy(net.state_dict())
    update = SAMUpdate(method)
    update.bind_(net, optimizer)
    x, y = next(iter(make_loader(batch_size=16)))
    update.open_(0, optimizer)
    loss = F.cross_entropy(net(x), y)
    update.ascend_(optimizer, loss, loss.backward)
    return net, optimizer, update, (x, y), before


def test_nonfinite_perturbed_loss_skips_and_puts_the_buffers_back():
    net, optimizer, update, (x, y), before = _ascended(SAM(0.05), momentum=0.9)

    def perturbed():
        loss = F.cross_entropy(net(x), y) * float("nan")
        loss.backward()
        return loss

    update.descend_(perturbed)
    with pytest.warns(RuntimeWarning, match="skipped the update at global step 0"):
        assert update.close_(optimizer)
    assert all(p.grad is None for p in net.parameters())  # so the optimizer step changes nothing
    optimizer.step()
    update.end_()
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert update.skipped_steps == 1 and not optimizer.state


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_in_one_descent_gradient_with_finite_losses_skips(bad):
    net, optimizer, update, (x, y), before = _ascended(SAM(0.05), momentum=0.9)
    last_bias = list(net.parameters())[-1]
    last_bias.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), bad))  # one element of one tensor

    def perturbed():
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    assert torch.isfinite(update.descend_(perturbed))
    with pytest.warns(RuntimeWarning, match="skipped the update"):
        assert update.close_(optimizer)
    optimizer.step()
    update.end_()
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_finite_extremes_and_mixed_loss_dtypes_do_not_skip():
    net, optimizer, update, (x, y), _ = _ascended(SAM(0.05))

    def perturbed():
        loss = F.cross_entropy(net(x), y).double() + 1e300  # a float64 loss far beyond float32's range
        loss.backward()
        return loss

    update.descend_(perturbed)
    next(iter(net.parameters())).grad[0, 0] = torch.finfo(torch.float32).max  # finite: its square is not
    assert not update.close_(optimizer)


def test_losses_of_other_shapes_are_checked_together():
    net, optimizer, update, (x, y), _ = _ascended(SAM(0.05))

    def perturbed():
        loss = F.cross_entropy(net(x), y).reshape(1)  # [1] here, [] in the clean pass
        loss.backward()
        return loss

    update.descend_(perturbed)
    assert not update.close_(optimizer)


def test_abort_in_the_perturbed_pass_restores_weights_and_buffers():
    net, _, update, (x, _), before = _ascended(SAM(0.5))

    def failing():
        net(x)
        raise MemoryError("injected")

    with pytest.raises(MemoryError):
        update.descend_(failing)
    update.abort_()
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not update.is_open


def test_inside_one_autocast_region_the_perturbed_pass_sees_w_plus_e():
    """torch.autocast caches the low-precision casts of the weights within a region (Lightning's before 2.5, and
    any user's own autocast around sam_step): the perturbed forward must not reuse the casts of w."""
    net = make_net(batchnorm=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = next(iter(make_loader(batch_size=16)))
    update = SAMUpdate(SAM(0.5))
    update.bind_(net, optimizer)
    seen = {}

    def perturbed():
        seen["weights"] = [p.detach().clone() for p in net.parameters()]
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=True), update.step_(0, optimizer):
        loss = F.cross_entropy(net(x), y)
        perturbed_loss = update.passes_(optimizer, loss, loss.backward, perturbed)
        after = F.cross_entropy(net(x), y)  # back at w, in the same region
        update.close_(optimizer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # fresh regions: casts of the weights given
        originals = [p.detach().clone() for p in net.parameters()]
        for p, w in zip(net.parameters(), seen["weights"]):
            p.copy_(w)
        expected = F.cross_entropy(net(x), y)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for p, w in zip(net.parameters(), originals):
            p.copy_(w)
        clean = F.cross_entropy(net(x), y)
    assert torch.equal(perturbed_loss.detach(), expected) and not torch.equal(expected, clean)
    assert torch.equal(after.detach(), clean)
