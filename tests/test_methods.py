import math

import pytest
import torch

from lightning_sam import ASAM, SAM, ParamGroup


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


def test_fp16_gradients_do_not_overflow_the_norm():
    w = torch.zeros(1000, dtype=torch.float16, requires_grad=True)
    w.grad = torch.full((1000,), 300.0, dtype=torch.float16)  # sum of squares 9e7 > fp16 max
    grad_norm, _, (e,) = _eps(SAM(0.05), [_group([w], 0.05)])
    assert torch.isfinite(grad_norm)
    assert grad_norm.item() == pytest.approx(300 * math.sqrt(1000), rel=1e-3)
    assert torch.isfinite(e).all() and e.abs().max().item() == pytest.approx(0.05 / math.sqrt(1000), rel=1e-2)


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: SAM(rho=-0.1), ValueError, r"`rho` to be a finite, non-negative float, got -0.1"),
        (lambda: SAM(rho=float("nan")), ValueError, r"`rho` to be a finite, non-negative float, got nan"),
        (lambda: SAM(rho=float("inf")), ValueError, r"`rho`.*got inf"),
        (lambda: SAM(rho="0.05"), TypeError, r"`rho` to be a non-negative float, got '0.05' of type str"),
        (lambda: SAM(rho=True), TypeError, r"`rho` to be a non-negative float, got True"),
        (lambda: SAM(rho=None), TypeError, r"`rho` to be a non-negative float, got None"),
        (lambda: ASAM(rho=-1.0), ValueError, r"`rho`"),
        (lambda: ASAM(rho=0.5, eta=-0.01), ValueError, r"`eta` to be a finite, non-negative float, got -0.01"),
        (lambda: ASAM(rho=0.5, eta=[0.1]), TypeError, r"`eta` to be a non-negative float"),
    ],
)
def test_invalid_arguments(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


def test_methods_compare_and_print_by_value():
    assert SAM(0.05) == SAM(0.05) != ASAM(0.05)
    assert ASAM(0.5, 0.01) == ASAM(0.5, 0.01) != ASAM(0.5, 0.0)
    assert len({SAM(0.1), SAM(0.1)}) == 1
    assert repr(ASAM(1, 0)) == "ASAM(rho=1.0, eta=0.0)"
    assert SAM(2).rho == 2.0 and isinstance(SAM(2).rho, float)
