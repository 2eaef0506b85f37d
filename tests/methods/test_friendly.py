"""Friendly SAM on a quadratic."""

import torch

from lightning_sam import SAM, FriendlySAM
from tests.helpers import fit_quadratic


def test_friendly_sam_on_a_quadratic(quadratic):
    a, w0 = quadratic
    rho, sigma, lam, lr = 0.1, 1.0, 0.6, 0.05
    w, m = w0.clone(), torch.zeros(4)
    for _ in range(6):
        g = a @ w
        m = lam * m + (1 - lam) * g  # the full gradient, estimated
        d = g - sigma * m  # its component removed from the ascent
        w = w - lr * a @ (w + rho * d / d.norm())
    method = FriendlySAM(rho, sigma=sigma, lam=lam)
    torch.testing.assert_close(fit_quadratic(a, w0, method, 6, lr), w, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(fit_quadratic(a, w0, SAM(rho), 6, lr), w)
