"""lightning_sam.optim.SAM, the plain-PyTorch front end: davda54/sam's own file as the reference, the differences
that are on purpose (the skip, the restore after an exception, the base optimizer's state), single-pass methods."""

import copy

import pytest
import torch
from torch.nn import functional as F

from lightning_sam import AESAM, GSAM, MomentumSAM
from lightning_sam import SAM as SAMMethod
from lightning_sam.optim import SAM
from tests.helpers import make_loader, make_net
from tests.reference.davda54_sam import SAM as Davda54SAM


def _sgd(**extra):
    return dict(lr=0.1, momentum=0.9, weight_decay=5e-4, **extra)


def _two_calls(net, opt, batches):
    """davda54's README loop: first_step / second_step around the two passes."""
    for x, y in batches:
        F.cross_entropy(net(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(net(x), y).backward()
        opt.second_step(zero_grad=True)


def _with_closure(net, opt, batches):
    """davda54's step(closure): the clean backward first, then the closure for the perturbed pass."""
    for x, y in batches:

        def closure(x=x, y=y):
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        closure()
        opt.step(closure)
        opt.zero_grad()


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam-eta-0"])
@pytest.mark.parametrize("loop", [_two_calls, _with_closure], ids=["first-second-step", "step-closure"])
def test_one_import_changed_gives_davda54s_trajectory(adaptive, loop):
    batches = list(make_loader(batch_size=16)) * 2
    ours_net, theirs_net = make_net(), make_net()
    rho = 0.5 if adaptive else 0.05
    ours = SAM(ours_net.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, **_sgd())
    theirs = Davda54SAM(theirs_net.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, **_sgd())
    loop(ours_net, ours, batches)
    loop(theirs_net, theirs, batches)
    for (key, value), expected in zip(ours_net.state_dict().items(), theirs_net.state_dict().values()):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)
    assert ours.base_optimizer.state_dict()["state"]  # the momentum is the base optimizer's, as in davda54's
    assert not torch.equal(ours_net[0].weight, make_net()[0].weight)


def test_one_call_per_step_runs_both_passes_when_no_gradient_is_there():
    net, reference = make_net(), make_net()
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, **_sgd())
    theirs = Davda54SAM(reference.parameters(), torch.optim.SGD, rho=0.05, **_sgd())
    batches = list(make_loader(batch_size=16))
    for x, y in batches:

        def closure(x=x, y=y):
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)  # both passes in one call
        assert loss is not None and loss.ndim == 0
        opt.zero_grad()
    _with_closure(reference, theirs, batches)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], atol=1e-6, rtol=0, msg=key)


def test_a_non_finite_step_is_skipped_with_nothing_changed_where_davda54s_writes_nan():
    net = make_net(batchnorm=False)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, module=net, **_sgd())
    x, y = next(iter(make_loader(batch_size=16)))
    (F.cross_entropy(net(x), y)).backward()
    opt.first_step(zero_grad=True)
    opt.second_step(zero_grad=True)  # one ordinary step: momentum exists
    before, state = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    (F.cross_entropy(net(x), y) * float("nan")).backward()
    with pytest.warns(RuntimeWarning, match="skipped the update"):
        opt.first_step(zero_grad=True)
        (F.cross_entropy(net(x), y)).backward()
        assert opt.second_step(zero_grad=True) is True
    assert opt.skipped_steps == 1
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert str(opt.state_dict()["state"]) == str(state["state"])  # the momentum untouched
    theirs_net = make_net(batchnorm=False)
    theirs = Davda54SAM(theirs_net.parameters(), torch.optim.SGD, rho=0.05, **_sgd())
    (F.cross_entropy(theirs_net(x), y) * float("nan")).backward()
    theirs.first_step(zero_grad=True)
    (F.cross_entropy(theirs_net(x), y)).backward()
    theirs.second_step(zero_grad=True)
    assert not torch.isfinite(theirs_net[0].weight).all()  # the difference on purpose


def test_an_exception_in_the_perturbed_pass_puts_w_back():
    net = make_net()
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, module=net, **_sgd())
    x, y = next(iter(make_loader(batch_size=16)))
    before = copy.deepcopy(net.state_dict())
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(closure)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and BatchNorm statistics


def test_any_method_and_the_state_dict_round_trip():
    net = make_net(batchnorm=False)
    opt = SAM(net.parameters(), torch.optim.SGD, method=GSAM(0.05, alpha=0.2), **_sgd())
    _two_calls(net, opt, list(make_loader(batch_size=16))[:3])
    saved = opt.state_dict()
    assert saved["lightning_sam"]["steps"] == 3 and saved["state"]
    other = SAM(make_net(batchnorm=False).parameters(), torch.optim.SGD, method=GSAM(0.05, alpha=0.2), **_sgd())
    other.load_state_dict(saved)
    assert other._steps == 3 and str(other.base_optimizer.state_dict()) == str(opt.base_optimizer.state_dict())
    with pytest.raises(TypeError, match="GSAM takes two passes a step: give `step` a closure"):
        opt.step()


def test_a_single_pass_method_steps_without_a_closure_and_gives_w_back_on_demand():
    """Momentum-SAM with `step()` only: the trajectory of the same method under a closure, w between on demand."""
    batches = list(make_loader(batch_size=16)) * 2
    net, reference = make_net(batchnorm=False), make_net(batchnorm=False)
    opt = SAM(net.parameters(), torch.optim.SGD, method=MomentumSAM(rho=0.5), **_sgd())
    ref_opt = SAM(reference.parameters(), torch.optim.SGD, method=MomentumSAM(rho=0.5), **_sgd())
    for x, y in batches:
        F.cross_entropy(net(x), y).backward()  # at w + e (w on the first step: no momentum yet)
        opt.step()
        opt.zero_grad()

        def closure(x=x, y=y):
            loss = F.cross_entropy(reference(x), y)
            loss.backward()
            return loss

        ref_opt.step(closure)
        ref_opt.zero_grad()
        with opt.unperturbed():  # w, as the closure version holds between steps
            for key, value in net.state_dict().items():
                torch.testing.assert_close(value, reference.state_dict()[key], atol=1e-6, rtol=0, msg=key)
    assert not torch.equal(net[0].weight, reference[0].weight)  # outside: w + e for the next forward
    opt.restore()
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], atol=1e-6, rtol=0, msg=key)
    with pytest.raises(TypeError, match="MomentumSAM takes one pass a step"):
        opt.first_step()


@pytest.mark.parametrize("script", ["plain_loop.py", "migrate_from_davda54.py"])
def test_the_examples_run(script, monkeypatch, capsys):
    import runpy
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / script
    monkeypatch.setattr("sys.argv", [str(path), "--epochs", "1"])
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert ("test accuracy" in out and "skipped steps 0" in out) if script == "plain_loop.py" else "epoch 0" in out


def test_a_closure_that_zeroes_its_own_gradients_gets_both_passes_every_step():
    net, reference = make_net(), make_net()
    batches = list(make_loader(batch_size=16))[:3]
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, **_sgd())
    ref_opt = SAM(reference.parameters(), torch.optim.SGD, rho=0.05, **_sgd())
    losses = []
    for x, y in batches:

        def closure(x=x, y=y):  # torch's idiom: zero_grad inside, none between steps
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        losses.append(opt.step(closure))  # the last step's gradients are not taken for this step's clean ones

        def ref_closure(x=x, y=y):
            loss = F.cross_entropy(reference(x), y)
            loss.backward()
            return loss

        ref_opt.zero_grad()  # zeroed between steps: both passes run in step
        ref_opt.step(ref_closure)
    assert all(loss is not None for loss in losses)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_first_step_after_a_failed_perturbed_pass_starts_again_from_w():
    net = make_net(batchnorm=False)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.0)  # lr 0: w must never move
    x, y = next(iter(make_loader(batch_size=16)))
    w0 = copy.deepcopy(net.state_dict())
    F.cross_entropy(net(x), y).backward()
    opt.first_step(zero_grad=True)  # then the perturbed pass fails (out of memory), the loop goes on
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(net(x), y).backward()
    opt.second_step(zero_grad=True)
    for key, value in net.state_dict().items():
        assert torch.equal(value, w0[key]), key
    assert opt.last_step is not None and opt.last_step.eps_norm.item() == pytest.approx(0.05)


def test_a_skip_in_the_two_call_loop_puts_batchnorm_statistics_back_with_module():
    net = make_net()
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, module=net, **_sgd())
    x, y = next(iter(make_loader(batch_size=16)))
    before = copy.deepcopy(net.state_dict())
    bad = x.clone()
    bad[0, 0] = float("inf")  # the clean forward writes inf into the running statistics
    F.cross_entropy(net(bad), y).backward()
    with pytest.warns(RuntimeWarning, match="skipped the update"):
        opt.first_step(zero_grad=True)
        F.cross_entropy(net(bad), y).backward()
        assert opt.second_step(zero_grad=True)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_loading_a_state_dict_drops_a_pending_perturbation_and_keeps_the_groups_rho():
    net = make_net(batchnorm=False)
    groups = [{"params": net[0].parameters(), "rho": 0.0}, {"params": net[2].parameters()}]
    opt = SAM(groups, torch.optim.SGD, method=MomentumSAM(rho=0.5), **_sgd())
    batches = list(make_loader(batch_size=16))
    for x, y in batches[:2]:
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    with opt.unperturbed():
        saved = copy.deepcopy({"model": net.state_dict(), "optimizer": opt.state_dict()})
    for x, y in batches[2:4]:
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    net.load_state_dict(saved["model"])  # roll back in the same process
    opt.load_state_dict(saved["optimizer"])
    opt.restore()  # nothing pending any more: the loaded weights stay
    for key, value in net.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key
    plain = {k: v for k, v in saved["optimizer"].items() if k != "lightning_sam"}
    plain["param_groups"] = [{k: v for k, v in g.items() if k != "rho"} for g in plain["param_groups"]]
    opt.load_state_dict(plain)  # a base optimizer's own state dict: the groups keep their rho
    assert [g["rho"] for g in opt.param_groups] == [0.0, 0.5]


def test_looking_at_w_between_single_pass_steps_changes_nothing():
    from lightning_sam import RhoSchedule

    runs = []
    for look in (False, True):
        net = make_net(batchnorm=False)
        method = MomentumSAM(rho=0.5, rho_schedule=RhoSchedule("lr", lr_max=0.1))
        opt = SAM(net.parameters(), torch.optim.SGD, method=method, **_sgd())
        scheduler = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
        for x, y in list(make_loader(batch_size=16))[:4]:
            F.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
            scheduler.step()
            if look:
                with opt.unperturbed():
                    pass
        runs.append(copy.deepcopy(net.state_dict()))
    for key, value in runs[0].items():
        assert torch.equal(runs[1][key], value), key


def test_the_two_call_loop_reports_its_step_and_the_closure_free_one_no_made_up_loss():
    net = make_net(batchnorm=False)
    x, y = next(iter(make_loader(batch_size=16)))
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, **_sgd())
    F.cross_entropy(net(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(net(x), y).backward()
    opt.second_step(zero_grad=True)
    stats = opt.last_step
    assert stats.grad_norm.item() > 0 and stats.perturbed_loss is None and stats.sharpness is None
    single = SAM(net.parameters(), torch.optim.SGD, method=MomentumSAM(rho=0.5), **_sgd())
    for _ in range(3):
        F.cross_entropy(net(x), y).backward()
        single.step()
        single.zero_grad()
    assert single.last_step.perturbed_loss is None and single.last_step.eps_norm.item() == pytest.approx(0.5)


@pytest.mark.parametrize("method", [SAMMethod(0.05, interval=2), AESAM(0.05, c=-1.0)], ids=["interval", "aesam"])
def test_a_non_finite_clean_gradient_on_a_plain_step_of_the_two_call_loop_is_skipped(method):
    """first_step(zero_grad=True) on a plain step drops the clean gradient: its non-finite values still count."""
    net = make_net(batchnorm=False)
    opt = SAM(net.parameters(), torch.optim.SGD, method=method, lr=0.1, momentum=0.9)
    x, y = next(iter(make_loader(batch_size=16)))
    for step in range(3):
        before = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.base_optimizer.state_dict())
        loss = F.cross_entropy(net(x), y)
        if step == 1:  # a plain step of interval=2; for AESAM a non-finite norm makes it one
            loss = loss + 0 * torch.sqrt(net[2].weight[0, 0] * 0)  # finite loss, NaN gradient
        loss.backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(net(x), y).backward()  # the second pass is finite
        skipped = opt.second_step(zero_grad=True)
        if step == 1:
            assert skipped and opt.skipped_steps == 1
            for key, value in before[0].items():
                assert torch.equal(value, net.state_dict()[key]), key
            after = opt.base_optimizer.state_dict()["state"]
            assert before[1]["state"].keys() == after.keys() and after
            for i in after:
                assert torch.equal(before[1]["state"][i]["momentum_buffer"], after[i]["momentum_buffer"])


def test_an_optimizer_with_a_rho_of_its_own_keeps_it():
    """Adadelta's rho is its decay rate: the wrapper's groups carry SAM's radius as "sam_rho" there."""
    plain, wrapped = make_net(batchnorm=False), make_net(batchnorm=False)
    base = torch.optim.Adadelta(plain.parameters(), lr=1.0)
    opt = SAM(wrapped.parameters(), torch.optim.Adadelta, rho=0.0, lr=1.0)
    assert opt.param_groups[0]["rho"] == 0.9 and opt.param_groups[0]["sam_rho"] == 0.0
    for x, y in make_loader(batch_size=16):
        base.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        base.step()

        def closure(x=x, y=y):
            loss = F.cross_entropy(wrapped(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
    for a, b in zip(plain.parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(a, b)
    radius = SAM(make_net(batchnorm=False).parameters(), torch.optim.Adadelta, rho=0.05, lr=1.0)
    x, y = next(iter(make_loader(batch_size=16)))
    net = radius.param_groups[0]["params"]
    assert net and radius.param_groups[0]["sam_rho"] == 0.05
