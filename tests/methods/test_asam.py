"""ASAM's ascent: the weight-scaled formula, and davda54/sam's adaptive mode at eta 0."""

import torch

from lightning_sam import ASAM, ParamGroup


def _group(params, rho):
    return ParamGroup(rho, params, [p.grad for p in params])


def _eps(method, groups):
    """Run the method's ascent and return (||g||, ||e||, e per tensor)."""
    grad_norm, eps_norm, scales = method.ascent_(groups)
    return grad_norm, eps_norm, [s * d for g, s in zip(groups, scales) for d in g.grads]


def test_asam_formula():
    torch.manual_seed(1)
    w1, w2 = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    g1, g2 = torch.randn(4, 3), torch.randn(3)
    w1.grad, w2.grad = g1.clone(), g2.clone()
    rho, eta = 0.5, 0.01
    t1, t2 = w1.detach().abs() + eta, w2.detach().abs() + eta
    tg_norm = torch.cat([(t1 * g1).flatten(), t2 * g2]).norm()
    grad_norm, eps_norm, (e1, e2) = _eps(ASAM(rho=rho, eta=eta), [_group([w1, w2], rho)])
    torch.testing.assert_close(e1, rho * t1**2 * g1 / tg_norm)
    torch.testing.assert_close(e2, rho * t2**2 * g2 / tg_norm)
    torch.testing.assert_close(grad_norm, tg_norm)
    torch.testing.assert_close(eps_norm, torch.cat([e1.flatten(), e2]).norm())


def test_asam_with_eta_zero_is_davda54_adaptive_mode():
    # davda54/sam adaptive: e = rho * w^2 g / ||w g||
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    g = torch.tensor([0.3, 0.1, -1.0])
    w.grad = g.clone()
    _, _, (e,) = _eps(ASAM(rho=2.0, eta=0.0), [_group([w], 2.0)])
    wd = w.detach()
    torch.testing.assert_close(e, 2.0 * wd**2 * g / (wd * g).norm())
