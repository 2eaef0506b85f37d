"""Late-phase SAM, AE-SAM and Friendly SAM: closed forms, limits, state in checkpoints, errors."""

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_sam import AESAM, SAM, FriendlySAM, LatePhaseSAM, SharpnessMonitor
from tests.helpers import Classifier, SAMClassifier, fit_quadratic, make_loader, state_copy, trainer


def _fit(method, epochs=2, **kwargs):
    model = SAMClassifier(sam=method) if method is not None else Classifier()
    trainer(max_epochs=epochs, **kwargs).fit(model, make_loader(batch_size=16))
    return state_copy(model)


def _same(a, b):
    assert a and b, "an empty state: nothing to compare"
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- late phase


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


# ---------------------------------------------------------------------------------------------- AE-SAM


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


# ---------------------------------------------------------------------------------------------- F-SAM


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


def test_friendly_sam_with_sigma_zero_is_sam():
    assert _same(_fit(FriendlySAM(0.05, sigma=0.0)), _fit(SAM(0.05)))


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "factory",
    [lambda: FriendlySAM(0.05, sigma=1.0, lam=0.9), lambda: AESAM(0.05, c=0.0), lambda: LatePhaseSAM(0.05, start=0.5)],
    ids=["fsam", "aesam", "late-phase"],
)
def test_resume_at_an_epoch_boundary_is_exact(tmp_path, factory):
    loader = make_loader(batch_size=16)

    def run(ckpt_path=None, drop_state=False):
        model = SAMClassifier(sam=factory())
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
        if ckpt_path and drop_state:
            state = torch.load(ckpt_path, weights_only=False)
            state["lightning_sam"]["method"] = {}
            ckpt_path = tmp_path / "dropped.ckpt.bak"
            torch.save(state, ckpt_path)
        trainer(max_epochs=4, enable_checkpointing=True, callbacks=[ckpt]).fit(model, loader, ckpt_path=ckpt_path)
        return state_copy(model)

    full = run()
    assert _same(full, run(tmp_path / "epoch=1-step=12.ckpt"))
    if not isinstance(factory(), LatePhaseSAM):  # its state is the step, in the loop's own state
        assert not _same(full, run(tmp_path / "epoch=1-step=12.ckpt", drop_state=True))


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: LatePhaseSAM(start=-1), ValueError, r"`start` to be an int step >= 0 or a float fraction in \[0, 1\]"),
        (lambda: LatePhaseSAM(start=1.5), ValueError, r"`start` to be an int step >= 0 or a float fraction"),
        (lambda: LatePhaseSAM(start="half"), TypeError, r"`start` to be an int step >= 0"),
        (lambda: AESAM(c=float("nan")), TypeError, r"`c` to be a float"),
        (lambda: AESAM(beta=1.0), ValueError, r"`beta` to be a float in \[0, 1\)"),
        (lambda: AESAM(interval=2), ValueError, r"AESAM decides every step itself"),
        (lambda: FriendlySAM(sigma=-1), ValueError, r"`sigma` to be a finite, non-negative float"),
        (lambda: FriendlySAM(lam=1.0), ValueError, r"`lam` to be a float in \[0, 1\)"),
    ],
)
def test_invalid_arguments(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


def test_aesam_ignores_a_non_finite_gradient_norm():
    method = AESAM(rho=0.05, c=-1.0)
    for x in (1.0, 2.0, 1.5):
        method.wants_sam_(torch.tensor(x))
    before = dict(method.state_dict()["stats"])
    assert method.wants_sam_(torch.tensor(float("inf"))) is False  # that step is skipped anyway
    assert method.state_dict()["stats"] == before
    assert method.wants_sam_(torch.tensor(1.6)) is True  # and the rule still works afterwards


def test_late_phase_rho_schedule_counts_from_start():
    from lightning_sam import RhoSchedule

    method = LatePhaseSAM(0.1, start=4, rho_schedule=RhoSchedule("linear", total_steps=4))
    assert [round(method.rho_at(t), 6) for t in (4, 6, 8)] == [0.1, 0.05, 0.0]


def test_a_second_load_replaces_pending_per_parameter_state():
    from lightning_sam import LookSAM

    for method, key in ((LookSAM(k=2), "gv"), (FriendlySAM(), "m")):
        w = torch.nn.Parameter(torch.ones(3))
        saved = {"values": [torch.ones(3)], "index": [0]}
        state = {"gv": saved["values"], "index": [0]} if key == "gv" else {"m": saved}
        method.load_state_dict(state)
        method.load_state_dict({key: None})  # e.g. fit(ckpt_path=...) after load_from_checkpoint
        method.bind_([w])
        assert method.state_dict()[key] is None
