"""lightning_sam.fabric.sam_step with real Fabric objects on CPU: the paper's reference loop, param-group rho and
``only=``, the skip, the restore after an exception, 16-mixed with a GradScaler, and 2-process gloo DDP against the
one-process simulations of tests/test_ddp.py."""

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import MixedPrecision
from torch.nn import functional as F

from lightning_sam import SAM, MomentumSAM
from lightning_sam.fabric import sam_step, sam_step_stats, skipped_steps
from tests.helpers import make_loader, make_net, reference_sam, two_group_sgd

ROOT = Path(__file__).resolve().parents[1]


def _fabric(**kwargs) -> Fabric:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Fabric(accelerator="cpu", devices=1, **kwargs)


def _loop(fabric, net, optimizer, method, batches, **kwargs):
    model, optimizer = fabric.setup(net, optimizer)
    losses = []
    for x, y in batches:
        loss = lambda x=x, y=y: F.cross_entropy(model(x), y)  # noqa: E731
        losses.append(sam_step(fabric, model, optimizer, loss, method, **kwargs))
    return model, optimizer, losses


def test_it_is_the_papers_update_with_param_group_rho_and_batchnorm_frozen():
    batches = list(make_loader(batch_size=16))
    net, reference = make_net(), make_net()
    _, optimizer, losses = _loop(_fabric(), net, two_group_sgd(net), SAM(0.05), batches)
    reference_sam(reference, two_group_sgd(reference), batches, rho=0.05)  # the second group's rho is 0.02
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
    assert optimizer.param_groups[0]["sam_steps"] == len(batches)  # counted in the (checkpointed) groups
    assert len(losses) == len(batches) and all(loss.ndim == 0 and not loss.requires_grad for loss in losses)
    assert 0.02 < sam_step_stats(optimizer).eps_norm.item() < 0.05  # two groups: rho 0.05 and 0.02


def test_only_perturbs_the_selected_parameters_by_their_own_norm():
    net = make_net(batchnorm=False)
    x, y = next(iter(make_loader(batch_size=16)))
    expected = copy.deepcopy(net)  # one step by hand: e on the last layer only, from that layer's gradient
    F.cross_entropy(expected(x), y).backward()
    last = list(expected[2].parameters())
    norm = torch.sqrt(sum((p.grad**2).sum() for p in last))
    perturbed = copy.deepcopy(expected)
    with torch.no_grad():
        for p, q in zip(last, perturbed[2].parameters()):
            q.add_(0.05 * p.grad / norm)
    perturbed.zero_grad()
    F.cross_entropy(perturbed(x), y).backward()
    with torch.no_grad():
        for p, q in zip(expected.parameters(), perturbed.parameters()):
            p.sub_(0.1 * q.grad)
    _loop(_fabric(), net, torch.optim.SGD(net.parameters(), lr=0.1), SAM(0.05, only=r"^2\."), [(x, y)])
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_a_non_finite_loss_skips_the_update_with_nothing_changed():
    fabric = _fabric()
    net = make_net()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    x, y = next(iter(make_loader(batch_size=16)))
    method = SAM(0.05)
    sam_step(fabric, model, optimizer, lambda: F.cross_entropy(model(x), y), method)  # a momentum exists
    before, state = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        return loss * float("inf") if len(calls) == 2 else loss  # the perturbed pass overflows

    with pytest.warns(RuntimeWarning, match="skipped the update"):
        sam_step(fabric, model, optimizer, closure, method)
    assert skipped_steps(optimizer) == 1
    for key, value in net.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(value, before[key]), key
    assert str(optimizer.state_dict()["state"]) == str(state["state"])


def test_an_exception_in_the_perturbed_pass_leaves_weights_and_buffers_as_before():
    fabric = _fabric()
    net = make_net()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    x, y = next(iter(make_loader(batch_size=16)))
    before = copy.deepcopy(net.state_dict())
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return F.cross_entropy(model(x), y)

    with pytest.raises(RuntimeError, match="out of memory"):
        sam_step(fabric, model, optimizer, closure, SAM(0.05))
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_16_mixed_with_a_grad_scaler_unscales_the_norm_and_skips_an_overflow():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    fabric = _fabric(plugins=MixedPrecision("16-mixed", "cpu", scaler=scaler))
    net = make_net(batchnorm=False)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    x, y = next(iter(make_loader(batch_size=16)))
    probe = copy.deepcopy(net)
    F.cross_entropy(probe(x), y).backward()
    expected_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in probe.parameters()))
    method = SAM(0.05)
    before = copy.deepcopy(net.state_dict())
    sam_step(fabric, model, optimizer, lambda: F.cross_entropy(model(x), y), method)
    stats = sam_step_stats(optimizer)
    torch.testing.assert_close(stats.grad_norm.float(), expected_norm, rtol=2e-2, atol=0)  # unscaled: not 4096x
    assert not torch.equal(net[0].weight, before["0.weight"]) and scaler.get_scale() == 2.0**12
    before = copy.deepcopy(net.state_dict())
    calls = []

    def overflowing():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        return loss * 1e30 if len(calls) == 2 else loss  # inf in float16 once scaled: the perturbed pass

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an overflow is the scaler's routine skip: no warning
        sam_step(fabric, model, optimizer, overflowing, method)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert scaler.get_scale() == 2.0**11  # the scaler saw the inf and lowered its scale
    assert skipped_steps(optimizer) == 0  # not a skip of ours: the losses were finite


def test_a_single_pass_method_runs_the_closure_once():
    fabric = _fabric()
    net = make_net(batchnorm=False)
    calls = []

    def count(x, y):
        calls.append(1)
        return F.cross_entropy(model(x), y)

    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    method = MomentumSAM(rho=0.5)
    for x, y in list(make_loader(batch_size=16))[:3]:
        sam_step(fabric, model, optimizer, lambda x=x, y=y: count(x, y), method)
    assert len(calls) == 3 and sam_step_stats(optimizer).eps_norm.item() == pytest.approx(0.5, rel=1e-5)


def test_bad_arguments_are_named():
    fabric = _fabric()
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model, optimizer = fabric.setup(net, opt)
    loss = lambda: F.cross_entropy(model(torch.randn(4, 6)), torch.zeros(4, dtype=torch.long))  # noqa: E731
    with pytest.raises(TypeError, match=r"`model` to be the module `fabric.setup` returned"):
        sam_step(fabric, net, optimizer, loss, SAM(0.05))
    with pytest.raises(TypeError, match=r"`optimizer` to be the optimizer `fabric.setup` returned"):
        sam_step(fabric, model, opt, loss, SAM(0.05))
    with pytest.raises(TypeError, match=r"`method` to be a method object"):
        sam_step(fabric, model, optimizer, loss, 0.05)
    with pytest.raises(ValueError, match=r"`total_steps` to be a positive int"):
        sam_step(fabric, model, optimizer, loss, SAM(0.05), total_steps=0)
    with pytest.raises(TypeError, match=r"`fabric` to be a lightning.fabric.Fabric"):
        sam_step(None, model, optimizer, loss, SAM(0.05))


def test_ddp_matches_the_simulations_with_the_expected_allreduces(tmp_path):
    from tests.test_ddp import _simulate

    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fabric_ddp_run.py"), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for mode, allreduces in [("local", 4), ("sync", 8)]:  # each replica its own e; one e from the mean gradient
        ranks = [torch.load(tmp_path / f"{mode}_rank{r}.pt") for r in (0, 1)]
        for key, value in ranks[0]["state"].items():
            assert torch.equal(value, ranks[1]["state"][key]), (mode, key)  # both replicas end identical
        assert ranks[0]["allreduces"] == allreduces, mode  # one bucket: one all-reduce per synchronized backward
        expected = _simulate(mode).state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(ranks[0]["state"][key], value, atol=1e-6, rtol=0, msg=f"{mode} {key}")
    local, sync = (torch.load(tmp_path / f"{m}_rank0.pt")["state"]["0.weight"] for m in ("local", "sync"))
    assert not torch.allclose(local, sync, atol=1e-6)  # the two modes really differ
    # a buffer the forward updates in place: the perturbed pass starts from the one DDP broadcast, on each rank
    assert [torch.load(tmp_path / f"buffers_rank{r}.pt")["same"] for r in (0, 1)] == [True, True]


def test_a_resume_from_fabric_save_is_exact(tmp_path):
    from lightning_sam import LookSAM

    batches = list(make_loader(batch_size=16))  # 6 steps; LookSAM reuses its stored direction between SAM steps

    def start():
        net = make_net()
        fabric = _fabric()
        model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
        return fabric, net, model, optimizer, LookSAM(0.05, k=4)

    def train(fabric, model, optimizer, method, part):
        for x, y in part:
            sam_step(fabric, model, optimizer, lambda x=x, y=y: F.cross_entropy(model(x), y), method)

    fabric, straight, model, optimizer, method = start()
    train(fabric, model, optimizer, method, batches)
    fabric, _, model, optimizer, method = start()
    train(fabric, model, optimizer, method, batches[:2])
    fabric.save(tmp_path / "ckpt", {"model": model, "optimizer": optimizer, "sam": method.state_dict()})
    fabric, resumed, model, optimizer, method = start()
    state = {"model": model, "optimizer": optimizer}
    rest = fabric.load(tmp_path / "ckpt", state)
    method.load_state_dict(rest["sam"])
    assert optimizer.param_groups[0]["sam_steps"] == 2
    train(fabric, model, optimizer, method, batches[2:])
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_the_example_runs_and_saves_a_checkpoint(tmp_path, monkeypatch, capsys):
    import runpy

    path = ROOT / "examples" / "fabric_loop.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [str(path), "--epochs", "1"])
    runpy.run_path(str(path), run_name="__main__")
    assert "epoch 0: loss" in capsys.readouterr().out
    assert set(torch.load(tmp_path / "fabric_sam.ckpt", weights_only=True)) >= {"model", "optimizer", "sam"}


def test_adaptive_rwp_keeps_its_statistics_unscaled_under_a_grad_scaler():
    from lightning_sam import RWP

    def fisher(**kwargs):
        fabric = _fabric(**kwargs)
        net = make_net(batchnorm=False)
        model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))
        method = RWP(sigma=0.01, eta=0.1, seed=0)
        x, y = next(iter(make_loader(batch_size=16)))
        for _ in range(4):
            sam_step(fabric, model, optimizer, lambda: F.cross_entropy(model(x), y), method)
        return torch.cat([f.flatten() for f in method.state.fisher.lookup().values()])

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled, full = fisher(plugins=MixedPrecision("16-mixed", "cpu", scaler=scaler)), fisher()
    assert ((scaled - full).norm() / full.norm()).item() < 0.05  # float16's rounding, not 2^24 times larger


def test_an_exception_after_the_optimizer_stepped_keeps_the_step():
    class Failing:
        def on_after_optimizer_step(self, strategy, optimizer):
            raise RuntimeError("a logging callback failed")

    fabric = _fabric(callbacks=[Failing()])
    net = make_net(batchnorm=False)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    x, y = next(iter(make_loader(batch_size=16)))
    before = net[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="a logging callback failed"):
        sam_step(fabric, model, optimizer, lambda: F.cross_entropy(model(x), y), SAM(0.05))
    # weights and momentum agree: the step happened and counts
    assert not torch.equal(net[0].weight, before) and optimizer.state[net[0].weight]["momentum_buffer"] is not None
    assert optimizer.param_groups[0]["sam_steps"] == 1


def test_an_optimizer_set_up_and_dropped_is_freed():
    import gc
    import weakref

    fabric = _fabric()
    net = make_net(batchnorm=False)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    x, y = next(iter(make_loader(batch_size=16)))
    loss = F.cross_entropy
    sam_step(fabric, model, optimizer, lambda: loss(model(x), y), SAM(0.05))  # noqa: F821 (deleted below)
    raw = weakref.ref(optimizer.optimizer)
    del model, optimizer
    gc.collect()
    assert raw() is None  # a sweep that sets up many runs in one process does not keep them all


def test_strategies_that_cannot_place_the_two_passes_are_refused_before_any_work():
    from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy

    fabric = _fabric()
    net = make_net(batchnorm=False)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    before = copy.deepcopy(net.state_dict())
    calls = []

    def loss():
        calls.append(1)
        return F.cross_entropy(model(torch.randn(4, 6)), torch.zeros(4, dtype=torch.long))

    static = _fabric(strategy=DDPStrategy(static_graph=True))
    with pytest.raises(ValueError, match=r"static_graph=True.*sync_perturbation=True"):
        sam_step(static, model, optimizer, loss, SAM(0.05))
    sharded = _fabric(strategy=ModelParallelStrategy(parallelize_fn=lambda module, mesh: module))
    with pytest.raises(ValueError, match=r"ModelParallelStrategy.*sync_perturbation=True"):
        sam_step(sharded, model, optimizer, loss, SAM(0.05))
    assert not calls and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
