"""SAM's ascent in closed form, its global norm, `interval`, and `only=` subsets."""

import math

import pytest
import torch
from torch.nn import functional as F

from lightning_sam import ASAM, SAM, ParamGroup
from tests.helpers import SAMClassifier, fit_quadratic, make_loader, make_net, trainer


def _group(params, rho):
    return ParamGroup(rho, params, [p.grad for p in params])


def _eps(method, groups):
    """Run the method's ascent and return (||g||, ||e||, e per tensor)."""
    grad_norm, eps_norm, scales = method.ascent_(groups)
    return grad_norm, eps_norm, [s * d for g, s in zip(groups, scales) for d in g.grads]


def test_sam_on_quadratic_is_the_closed_form():
    # L(w) = 1/2 w^T A w: g = A w, e = rho A w / ||A w||
    torch.manual_seed(0)
    m = torch.randn(5, 5, dtype=torch.float64)
    a = m @ m.T + torch.eye(5, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (0.5 * w @ a @ w).backward()
    g = (a @ w).detach()
    grad_norm, eps_norm, (e,) = _eps(SAM(rho=0.1), [_group([w], 0.1)])
    torch.testing.assert_close(e, 0.1 * g / g.norm(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_norm.double(), g.norm(), rtol=1e-6, atol=0)
    assert eps_norm.item() == pytest.approx(0.1, rel=1e-6)


def test_sam_norm_is_global_over_groups_with_their_own_rho():
    a = torch.tensor([3.0, 0.0], requires_grad=True)
    b = torch.tensor([[4.0]], requires_grad=True)
    a.grad, b.grad = a.detach().clone(), b.detach().clone()  # g = (3, 0 | 4), ||g|| = 5
    _, eps_norm, (ea, eb) = _eps(SAM(rho=0.5), [_group([a], 0.5), _group([b], 0.25)])
    torch.testing.assert_close(ea, torch.tensor([0.5 * 3 / 5, 0.0]))
    torch.testing.assert_close(eb, torch.tensor([[0.25 * 4 / 5]]))
    assert eps_norm.item() == pytest.approx(math.hypot(0.3, 0.2), rel=1e-6)


def test_zero_gradient_gives_zero_perturbation_not_nan():
    w = torch.ones(3, requires_grad=True)
    w.grad = torch.zeros(3)
    for method in (SAM(0.05), ASAM(0.5, 0.01), ASAM(0.5, 0.0)):
        grad_norm, eps_norm, (e,) = _eps(method, [_group([w], method.rho)])
        assert torch.equal(e, torch.zeros(3))
        assert grad_norm.item() == 0 and eps_norm.item() == 0


def test_fp16_gradients_do_not_overflow_the_norm():
    w = torch.zeros(1000, dtype=torch.float16, requires_grad=True)
    w.grad = torch.full((1000,), 300.0, dtype=torch.float16)  # sum of squares 9e7 > fp16 max
    grad_norm, _, (e,) = _eps(SAM(0.05), [_group([w], 0.05)])
    assert torch.isfinite(grad_norm)
    assert grad_norm.item() == pytest.approx(300 * math.sqrt(1000), rel=1e-3)
    assert torch.isfinite(e).all() and e.abs().max().item() == pytest.approx(0.05 / math.sqrt(1000), rel=1e-2)


def test_sam_every_n_steps_on_a_quadratic(quadratic):
    a, w0 = quadratic
    rho, lr = 0.1, 0.05
    w = w0.clone()
    for step in range(7):
        g = a @ w
        w = w - lr * (a @ (w + rho * g / g.norm()) if step % 3 == 0 else g)
    torch.testing.assert_close(fit_quadratic(a, w0, SAM(rho, interval=3), 7, lr), w, rtol=1e-10, atol=1e-12)


class Recording(SAMClassifier):
    """Records the weights each pass sees."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append({k: v.detach().clone() for k, v in self.net.named_parameters()})
        return super().training_step(batch, batch_idx)


def _perturbed(model):
    clean, perturbed = model.seen[0], model.seen[1]
    return {k for k in clean if not torch.equal(clean[k], perturbed[k])}


def test_only_normalization_layers_are_perturbed():
    model = Recording(sam=SAM(0.05, only="normalization"))
    trainer(max_steps=1).fit(model, make_loader(batch_size=16))
    assert _perturbed(model) == {"1.weight", "1.bias"}
    assert model.sam_last_step.eps_norm.item() == pytest.approx(0.05, rel=1e-5)  # the norm runs over them


def test_only_by_name_and_per_group_rho_zero():
    model = Recording(sam=SAM(0.05, only=r"^net\.3\."))
    trainer(max_steps=1).fit(model, make_loader(batch_size=16))
    assert _perturbed(model) == {"3.weight", "3.bias"}

    class FirstLayerFrozen(Recording):
        def configure_optimizers(self):
            first = list(self.net[0].parameters())
            rest = [p for p in self.parameters() if all(p is not q for q in first)]
            return torch.optim.SGD([{"params": first, "rho": 0.0}, {"params": rest}], lr=0.1)

    model = FirstLayerFrozen(sam=SAM(0.05))
    loader = make_loader(batch_size=16)
    trainer(max_steps=1).fit(model, loader)
    assert _perturbed(model) == {"1.weight", "1.bias", "3.weight", "3.bias"}  # not net.0
    # the rho-0 group's gradient still counts in ||g||: e = 0.05 * g / ||g|| on the other groups
    net = make_net()
    x, y = next(iter(loader))
    grads = dict(zip(model.seen[0], torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))))
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    for name in ("1.weight", "1.bias", "3.weight", "3.bias"):
        e = model.seen[1][name] - model.seen[0][name]
        torch.testing.assert_close(e, 0.05 * grads[name] / norm, rtol=1e-4, atol=1e-7)
    assert model.sam_last_step.eps_norm.item() < 0.05


def test_only_that_selects_nothing():
    with pytest.raises(ValueError, match=r"`only='nothing-here'` selects no parameter of SAMClassifier"):
        trainer(max_steps=1).fit(SAMClassifier(sam=SAM(only="nothing-here")), make_loader())
