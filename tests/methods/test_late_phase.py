"""Late-phase SAM: plain steps, then SAM; its start as a step or a fraction of the run."""

import pytest
import torch

from lightning_sam import SAM, LatePhaseSAM, RhoSchedule
from tests.helpers import Classifier, SAMClassifier, fit_quadratic, make_loader, state_copy, trainer


def _fit(method, epochs=2, **kwargs):
    model = SAMClassifier(sam=method) if method is not None else Classifier()
    trainer(max_epochs=epochs, **kwargs).fit(model, make_loader(batch_size=16))
    return state_copy(model)


def _same(a, b):
    assert a and b, "an empty state: nothing to compare"
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_late_phase_on_a_quadratic_is_gradient_descent_then_sam(quadratic):
    a, w0 = quadratic
    rho, lr = 0.1, 0.05
    w = w0.clone()
    for step in range(8):  # start 0.5 of the 8 steps: plain on 0-3, SAM on 4-7
        g = a @ w
        w = w - lr * (a @ (w + rho * g / g.norm()) if step >= 4 else g)
    torch.testing.assert_close(fit_quadratic(a, w0, LatePhaseSAM(rho, start=0.5), 8, lr), w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fit_quadratic(a, w0, LatePhaseSAM(rho, start=4), 8, lr), w, rtol=1e-10, atol=1e-12)


def test_late_phase_limits():
    assert _same(_fit(LatePhaseSAM(0.05, start=0)), _fit(SAM(0.05)))
    plain, late = _fit(None), _fit(LatePhaseSAM(0.05, start=1.0))
    assert all(torch.allclose(plain[k].float(), late[k].float(), atol=1e-6) for k in plain)


def test_late_phase_needs_the_length_of_the_run_for_a_fraction():
    with pytest.raises(ValueError, match=r"LatePhaseSAM\(start=0.5\) is a fraction of the run.*max_epochs or"):
        trainer(max_epochs=-1, max_steps=-1, limit_train_batches=2).fit(
            SAMClassifier(sam=LatePhaseSAM(start=0.5)), make_loader()
        )


def test_late_phase_rho_schedule_counts_from_start():

    method = LatePhaseSAM(0.1, start=4, rho_schedule=RhoSchedule("linear", total_steps=4))
    assert [round(method.rho_at(t), 6) for t in (4, 6, 8)] == [0.1, 0.05, 0.0]
