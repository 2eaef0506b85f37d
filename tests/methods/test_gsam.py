"""GSAM on a quadratic; methods that use the clean gradient refuse accumulation."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_sam import GSAM, SAM
from tests.helpers import SAMClassifier, fit_quadratic, make_loader, trainer


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a, "an empty state: nothing to compare"
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_gsam_on_a_quadratic(quadratic):
    a, w0 = quadratic
    rho, alpha, lr = 0.1, 0.3, 0.05
    w = w0.clone()
    for _ in range(3):
        g = a @ w
        gp = a @ (w + rho * g / g.norm())
        d = gp - alpha * (g - (g @ gp) / (gp @ gp) * gp)  # minus alpha times g's part orthogonal to g_p
        w = w - lr * d
    torch.testing.assert_close(fit_quadratic(a, w0, GSAM(rho, alpha=alpha), 3, lr), w, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(fit_quadratic(a, w0, SAM(rho), 3, lr), w)


@pytest.mark.parametrize("schedule", [False, True], ids=["trainer", "accumulation-scheduler"])
def test_methods_using_the_clean_gradient_refuse_accumulation_before_training(schedule):
    model = SAMClassifier(sam=GSAM())
    before = _state(model)
    kwargs = (
        {"callbacks": [pl.callbacks.GradientAccumulationScheduler({0: 1, 2: 4})]}
        if schedule
        else {"accumulate_grad_batches": 2}
    )
    with pytest.raises(ValueError, match=r"GSAM combines .* does not support `accumulate_grad_batches=(2|4)`"):
        trainer(**kwargs).fit(model, make_loader())
    _assert_same(before, _state(model))
