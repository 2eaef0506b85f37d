"""Momentum-SAM against its algorithm written from the paper's equations; w between steps; its refusals."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.nn import functional as F

from lightning_sam import MomentumSAM, RhoSchedule, SAMLightningModule
from tests.helpers import Classifier, SAMClassifier, assert_same_state, make_loader, state_copy, trainer


class SGDMomentum(SAMClassifier):
    def __init__(self, weight_decay=0.0, **kwargs):
        super().__init__(batchnorm=False, **kwargs)
        self.weight_decay = weight_decay

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=self.weight_decay)


def _official(net, batches, rho, lr=0.1, mu=0.9):
    """The official algorithm's trajectory without weight decay: the gradient at w - rho v / ||v||, then
    v <- mu v + g, w <- w - lr v (v starts as the first gradient, taken at w)."""
    params = list(net.parameters())
    v = None
    for x, y in batches:
        with torch.no_grad():
            norm = None if v is None else torch.sqrt(sum((c**2).sum() for c in v))
            e = [torch.zeros_like(p) for p in params] if v is None else [-rho * b / norm for b in v]
            for p, d in zip(params, e):
                p.add_(d)
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        with torch.no_grad():
            for p, d in zip(params, e):
                p.sub_(d)
            v = [g.clone() for g in grads] if v is None else [mu * b + g for b, g in zip(v, grads)]
            for p, b in zip(params, v):
                p.sub_(lr * b)
    return net


def test_without_weight_decay_the_trajectory_is_the_official_algorithms():
    model = SGDMomentum(sam=MomentumSAM(rho=0.5))
    reference = _official(copy.deepcopy(model.net), list(make_loader(batch_size=16)) * 2, rho=0.5)
    trainer(max_epochs=2).fit(model, make_loader(batch_size=16))
    for (key, value), expected in zip(model.net.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)
    plain = _official(copy.deepcopy(SGDMomentum().net), list(make_loader(batch_size=16)) * 2, rho=0.0)
    assert not torch.allclose(model.net[0].weight, plain[0].weight)  # rho 0.5 did move the trajectory


class Seen(SGDMomentum):
    """The weights each training_step sees, and those at the start of each batch."""

    def training_step(self, batch, batch_idx):
        self.seen.append(self.net[0].weight.detach().clone())
        return super().training_step(batch, batch_idx)


def test_the_pass_sees_w_plus_e_and_the_module_holds_w_between_steps():
    model = Seen(sam=MomentumSAM(rho=0.5, rho_schedule=RhoSchedule("linear", total_steps=6, rho_min=0.1)))
    model.seen, starts = [], []

    class Start(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            starts.append((pl_module.net[0].weight.detach().clone(), copy.deepcopy(trainer.optimizers[0].state)))

    trainer(max_epochs=1, callbacks=[Start()]).fit(model, make_loader(batch_size=16))
    assert len(model.seen) == len(starts) == 6  # one pass a step
    assert torch.equal(model.seen[0], starts[0][0])  # the first step: no momentum yet, a plain step
    for step in range(1, 6):
        w, state = starts[step]
        v = [s["momentum_buffer"] for s in state.values()]
        norm = torch.sqrt(sum((b**2).sum() for b in v))
        rho = RhoSchedule("linear", total_steps=6, rho_min=0.1).rho(step, 0.5)
        first = next(iter(state.values()))["momentum_buffer"]  # net.0.weight's, the first parameter
        torch.testing.assert_close(model.seen[step], w - rho * first / norm, atol=1e-6, rtol=0)
    last_rho = RhoSchedule("linear", total_steps=6, rho_min=0.1).rho(5, 0.5)
    assert model.sam_last_step.eps_norm.item() == pytest.approx(last_rho, rel=1e-5)
    assert model.sam_last_step.loss is None and "sam/sharpness" not in model.sam_last_step.as_dict()


def test_adam_perturbs_along_its_first_moment():
    class WithAdam(SAMClassifier):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    model = WithAdam(batchnorm=False, sam=MomentumSAM(rho=0.3))
    net = copy.deepcopy(model.net)
    reference = torch.optim.Adam(net.parameters(), lr=0.01)
    for x, y in make_loader(batch_size=16):
        state = [reference.state[p].get("exp_avg") for p in net.parameters()]
        with torch.no_grad():
            e = [torch.zeros_like(p) for p in net.parameters()] if state[0] is None else state
            norm = torch.sqrt(sum((m**2).sum() for m in e)) if state[0] is not None else torch.tensor(1.0)
            e = [-0.3 * m / norm for m in e]
            for p, d in zip(net.parameters(), e):
                p.add_(d)
        reference.zero_grad()
        F.cross_entropy(net(x), y).backward()
        with torch.no_grad():
            for p, d in zip(net.parameters(), e):
                p.sub_(d)
        reference.step()
    trainer(max_epochs=1).fit(model, make_loader(batch_size=16))
    for (key, value), expected in zip(model.net.state_dict().items(), net.state_dict().values()):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)


def test_an_optimizer_without_momentum_is_refused_before_training():
    class NoMomentum(SAMClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = NoMomentum(sam=MomentumSAM(rho=1.0))
    before = state_copy(model)
    with pytest.raises(ValueError, match=r"MomentumSAM perturbs along the optimizer's momentum, but param_groups"):
        trainer(max_steps=2).fit(model, make_loader())
    assert_same_state(before, state_copy(model))
    with pytest.raises(ValueError, match=r"expected SGD with momentum or an optimizer with a first moment"):
        MomentumSAM().check_optimizer(torch.optim.Adagrad([torch.nn.Parameter(torch.ones(1))]))


class Plain(Classifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


class SAMPlain(SAMLightningModule, Plain):
    pass


def test_rho_zero_is_plain_training_bit_for_bit():
    runs = []
    for model in (Plain(), SAMPlain(sam=MomentumSAM(rho=0.0))):
        trainer(max_epochs=2).fit(model, make_loader(batch_size=16))
        runs.append(state_copy(model))
    assert_same_state(*runs)
