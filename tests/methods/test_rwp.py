"""RWP: filter-wise Gaussian noise of the stated scale, the adaptive form's division, seeded draws, sigma's schedule."""

import math

import pytest
import torch
from torch import nn

from lightning_sam import RWP, RhoSchedule
from lightning_sam.core.groups import ParamGroup
from tests.helpers import SAMClassifier, make_loader, trainer


def _noise(method, params, step=0, rho=None):
    method.bind_(params)
    groups = [ParamGroup(method.sigma if rho is None else rho, params, [])]
    directions, ascent = method.perturbation_(groups, torch.optim.SGD(params, lr=0.1), step)
    assert [float(s) for s in ascent.scales] == [1.0]  # the noise is e itself
    return directions[0].grads


def test_each_filter_gets_noise_of_sigma_times_its_norm():
    torch.manual_seed(0)
    layer = nn.Linear(4000, 6)
    with torch.no_grad():
        layer.weight.mul_(torch.arange(1, 7).reshape(-1, 1))  # filters of different norms
    e_weight, e_bias = _noise(RWP(sigma=0.02, seed=3), [layer.weight, layer.bias])
    row_std = e_weight.std(dim=1)
    expected = 0.02 * layer.weight.detach().norm(dim=1)
    torch.testing.assert_close(row_std, expected, rtol=0.05, atol=0)  # 4000 draws a row: about 1% error
    assert e_bias.shape == (6,)
    # a 1-D parameter: one scale, its whole norm (6 draws: only the order of magnitude is testable)
    assert 0.0 < e_bias.abs().max().item() < 6 * 0.02 * layer.bias.detach().norm().item()


def test_the_same_seed_and_step_draw_the_same_noise_and_another_step_other_noise():
    w = nn.Parameter(torch.randn(5, 7))
    first, again = _noise(RWP(seed=11), [w], step=4), _noise(RWP(seed=11), [w], step=4)
    assert torch.equal(first[0], again[0])
    assert not torch.equal(first[0], _noise(RWP(seed=11), [w], step=5)[0])
    assert not torch.equal(first[0], _noise(RWP(seed=12), [w], step=4)[0])


def test_the_adaptive_form_divides_by_sqrt_one_plus_eta_times_each_filters_sum():
    w = nn.Parameter(torch.randn(3, 4))
    f = torch.rand(3, 4)
    plain = _noise(RWP(sigma=0.05, seed=1), [w])[0]
    adaptive = RWP(sigma=0.05, eta=0.1, seed=1)
    adaptive.load_state_dict({"fisher": {"values": [f], "index": [0]}})
    scaled = _noise(adaptive, [w])[0]
    torch.testing.assert_close(scaled, plain / torch.sqrt(1 + 0.1 * f.sum(dim=1, keepdim=True)), rtol=1e-6, atol=0)


def test_the_adaptive_statistics_are_a_moving_sum_of_squared_gradients():
    method = RWP(eta=0.1, beta=0.5, seed=0)
    w = nn.Parameter(torch.ones(2, 2))
    method.bind_([w])
    for g, expected in ((torch.full((2, 2), 2.0), 4.0), (torch.full((2, 2), 1.0), 0.5 * 4.0 + 1.0)):
        w.grad = g
        method.descent_([w])
        assert torch.equal(method.state_dict()["fisher"]["values"][0], torch.full((2, 2), expected))


def test_the_authors_cosine_increase_of_sigma_is_a_rising_cosine_schedule():
    base, inc, total = 0.01, 10, 100
    schedule = RhoSchedule("cosine", total_steps=total, rho_min=base * (1 + inc))
    for t in (0, 25, 50, 100):
        cosine_inc = base * ((-math.cos(t * math.pi / total) * 0.5 + 0.5) * inc + 1)  # their CosineInc
        assert schedule.rho(t, base) == pytest.approx(cosine_inc)


def test_it_trains_in_one_pass_a_step_at_the_stated_noise():
    calls = []

    class Counted(SAMClassifier):
        def training_step(self, batch, batch_idx):
            calls.append(batch_idx)
            return super().training_step(batch, batch_idx)

    model = Counted(sam=RWP(sigma=0.05, seed=0))
    trainer(max_epochs=1).fit(model, make_loader(batch_size=16))
    assert calls == list(range(6))
    assert model.sam_last_step.grad_norm is None and set(model.sam_last_step.as_dict()) == {
        "sam/perturbed_loss", "sam/eps_norm", "sam/rho"
    }  # fmt: skip
    assert model.sam_last_step.eps_norm.item() > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sigma": -0.1}, ValueError, r"`sigma` to be a finite, non-negative float"),
        ({"eta": -1.0}, ValueError, r"`eta` to be a finite, non-negative float"),
        ({"beta": 1.0}, ValueError, r"`beta` to be a float in \[0, 1\)"),
        ({"seed": -1}, ValueError, r"`seed` to be an int >= 0"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RWP(**kwargs)


def test_the_adaptive_statistics_are_unscaled_under_a_grad_scaler():
    from lightning.pytorch.plugins import MixedPrecision

    def fisher(**kwargs):
        method = RWP(sigma=0.01, eta=0.1, seed=0)
        trainer(max_steps=4, **kwargs).fit(SAMClassifier(sam=method, batchnorm=False), make_loader(batch_size=16))
        return torch.cat([f.flatten() for f in method.state.fisher.lookup().values()])

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled, full = fisher(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]), fisher()
    assert ((scaled - full).norm() / full.norm()).item() < 0.05  # float16's rounding, not 2^24 times larger
