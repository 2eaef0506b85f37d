"""AE-SAM's decision rule, its statistics, its limits and its one-pass steps."""

import math

import pytest
import torch

from lightning_sam import AESAM, SAM, SharpnessMonitor
from tests.helpers import Classifier, SAMClassifier, make_loader, state_copy, trainer


def _fit(method, epochs=2, **kwargs):
    model = SAMClassifier(sam=method) if method is not None else Classifier()
    trainer(max_epochs=epochs, **kwargs).fit(model, make_loader(batch_size=16))
    return state_copy(model)


def _same(a, b):
    assert a and b, "an empty state: nothing to compare"
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_aesam_decision_rule_and_its_statistics():
    method, beta, c = AESAM(rho=0.05, c=1.0, beta=0.5), 0.5, 1.0
    mean, var, expected = None, 0.0, []
    for x in [4.0, 1.0, 9.0, 9.5, 1.0, 30.0]:  # squared gradient norms
        if mean is None:
            mean = x
        expected.append(x > mean + c * math.sqrt(var))
        delta = x - mean
        mean += (1 - beta) * delta
        var = beta * (var + (1 - beta) * delta**2)
        assert method.wants_sam_(torch.tensor(x).sqrt()) == expected[-1]
    assert method.state_dict()["stats"]["mean"] == pytest.approx(mean)
    assert method.sam_fraction == pytest.approx(sum(expected) / len(expected))
    assert True in expected and False in expected


def test_aesam_limits_are_sam_and_plain_training():
    assert _same(_fit(AESAM(0.05, c=-math.inf)), _fit(SAM(0.05)))
    plain, never = _fit(None), _fit(AESAM(0.05, c=math.inf))
    assert all(torch.allclose(plain[k].float(), never[k].float(), atol=1e-6) for k in plain)


def test_aesam_plain_steps_take_one_forward_and_the_fraction_is_logged():
    class Counting(SAMClassifier):
        calls = 0

        def training_step(self, batch, batch_idx):
            self.calls += 1
            return super().training_step(batch, batch_idx)

    model = Counting(sam=AESAM(0.05, c=0.0))
    t = trainer(max_epochs=3, callbacks=[SharpnessMonitor()], log_every_n_steps=1)
    t.fit(model, make_loader(batch_size=16))
    sam_steps = model.sam.state_dict()["stats"]["sam_steps"]
    assert 0 < sam_steps < 18 and model.calls == 18 + sam_steps
    assert t.callback_metrics["sam/sam_fraction"].item() == pytest.approx(sam_steps / 18)


def test_aesam_ignores_a_non_finite_gradient_norm():
    method = AESAM(rho=0.05, c=-1.0)
    for x in (1.0, 2.0, 1.5):
        method.wants_sam_(torch.tensor(x))
    before = dict(method.state_dict()["stats"])
    assert method.wants_sam_(torch.tensor(float("inf"))) is False  # that step is skipped anyway
    assert method.state_dict()["stats"] == before
    assert method.wants_sam_(torch.tensor(1.6)) is True  # and the rule still works afterwards


@pytest.mark.parametrize("fault", ["nan", "exception"])
def test_a_skipped_or_failed_update_leaves_the_statistics_as_they_were(fault):
    from lightning_sam.optim import SAM as SAMOptimizer

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = SAMOptimizer(net.parameters(), torch.optim.SGD, method=AESAM(0.05, c=-math.inf), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    calls = []

    def closure(bad: bool = False):
        calls.append(1)
        loss = torch.nn.functional.mse_loss(net(x), y)
        if bad and len(calls) % 2 == 0:  # the perturbed pass
            if fault == "exception":
                raise RuntimeError("injected")
            loss = loss * float("nan")
        loss.backward()
        return loss

    opt.zero_grad()
    opt.step(closure)
    before = dict(opt.method.state.stats)
    opt.zero_grad()
    try:
        opt.step(lambda: closure(bad=True))
    except RuntimeError:
        assert fault == "exception"
    assert opt.method.state.stats == before and before["steps"] == 1
