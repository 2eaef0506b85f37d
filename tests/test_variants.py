import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sam import GSAM, SAM, LookSAM, RhoSchedule
from tests.helpers import SAMClassifier, fit_quadratic, make_loader, make_net, trainer


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a, "an empty state: nothing to compare"
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize("method", [GSAM(0.05, alpha=0.0), LookSAM(0.05, k=1, alpha=0.7)], ids=["gsam0", "looksam1"])
def test_limits_are_exactly_sam(method):
    loader = make_loader(batch_size=16)
    runs = {}
    for name, m in (("sam", SAM(0.05)), ("variant", method)):
        model = SAMClassifier(sam=m)
        trainer(max_epochs=2).fit(model, loader)
        runs[name] = _state(model)
    _assert_same(runs["sam"], runs["variant"])


# ---------------------------------------------------------------------------------------------- closed forms


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


def test_looksam_on_a_quadratic(quadratic):
    a, w0 = quadratic
    rho, k, alpha, lr = 0.1, 3, 0.7, 0.05
    w, gv = w0.clone(), None
    for step in range(7):
        g = a @ w
        if step % k == 0:
            gs = a @ (w + rho * g / g.norm())
            gv = gs - (g @ gs) / (g @ g) * g  # the part of g_s orthogonal to g
            d = gs
        else:
            d = g + alpha * g.norm() / gv.norm() * gv
        w = w - lr * d
    torch.testing.assert_close(fit_quadratic(a, w0, LookSAM(rho, k=k, alpha=alpha), 7, lr), w, rtol=1e-10, atol=1e-12)


def test_sam_every_n_steps_on_a_quadratic(quadratic):
    a, w0 = quadratic
    rho, lr = 0.1, 0.05
    w = w0.clone()
    for step in range(7):
        g = a @ w
        w = w - lr * (a @ (w + rho * g / g.norm()) if step % 3 == 0 else g)
    torch.testing.assert_close(fit_quadratic(a, w0, SAM(rho, interval=3), 7, lr), w, rtol=1e-10, atol=1e-12)


def test_plain_steps_take_one_forward():
    calls = []

    class Counted(SAMClassifier):
        def training_step(self, batch, batch_idx):
            calls.append(self.trainer.global_step)
            return super().training_step(batch, batch_idx)

    trainer(max_steps=6).fit(Counted(sam=LookSAM(0.05, k=3)), make_loader(batch_size=16))
    assert calls == [0, 0, 1, 2, 3, 3, 4, 5]


# ---------------------------------------------------------------------------------------------- rho schedules


def test_rho_schedules_at_chosen_steps():
    cosine = RhoSchedule("cosine", total_steps=110, rho_min=0.01, warmup_steps=10)
    assert cosine.rho(0, 0.05) == pytest.approx(0.005)  # warm-up: 1/10 of the way
    assert cosine.rho(9, 0.05) == pytest.approx(0.05)
    assert cosine.rho(60, 0.05) == pytest.approx(0.03)  # half way down
    assert cosine.rho(110, 0.05) == pytest.approx(0.01) == cosine.rho(500, 0.05)
    linear = RhoSchedule("linear", total_steps=100, rho_min=0.0)
    assert [linear.rho(t, 0.1) for t in (0, 25, 100)] == pytest.approx([0.1, 0.075, 0.0])
    assert RhoSchedule().rho(12345, 0.05) == 0.05
    follow = RhoSchedule("lr", rho_min=0.02, lr_max=0.1, lr_min=0.0)
    assert [follow.rho(0, 0.05, lr=lr) for lr in (0.1, 0.05, 0.0)] == pytest.approx([0.05, 0.035, 0.02])


def test_scheduled_rho_is_used_in_training_and_is_a_function_of_the_step():
    seen = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step - 1] = (pl_module.sam_last_step.rho, pl_module.sam_last_step.eps_norm.item())

    schedule = RhoSchedule("linear", total_steps=6, rho_min=0.01)
    trainer(max_steps=6, callbacks=[Record()]).fit(SAMClassifier(sam=SAM(0.05, rho_schedule=schedule)), make_loader())
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]  # every step is checked below
    for step, (rho, eps_norm) in seen.items():
        assert rho == pytest.approx(schedule.rho(step, 0.05))
        assert eps_norm == pytest.approx(rho, rel=1e-4)


def test_rho_follows_the_learning_rate():
    seen = []

    class Decaying(SAMClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module.sam_last_step.rho)

    method = GSAM(0.05, rho_schedule=RhoSchedule("lr", rho_min=0.01, lr_max=0.1))
    trainer(max_epochs=3, callbacks=[Record()]).fit(Decaying(sam=method), make_loader(batch_size=48))
    assert seen == pytest.approx([0.05, 0.05, 0.03, 0.03, 0.02, 0.02])  # lr 0.1, 0.05, 0.025


# ---------------------------------------------------------------------------------------------- subsets


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


def test_looksam_drops_its_direction_when_a_sam_step_is_skipped():
    class NaNOnce(SAMClassifier):
        calls = 0

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            NaNOnce.calls += 1
            return loss * float("nan") if NaNOnce.calls == 2 else loss  # the perturbed pass of step 0

    model = NaNOnce(sam=LookSAM(0.05, k=3, alpha=0.7))
    with pytest.warns(RuntimeWarning, match="skipped the update at global step 0"):
        trainer(max_steps=6).fit(model, make_loader(batch_size=16))
    assert model.sam_skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.sam.__dict__.get("_gv") is not None  # stored again by the SAM step at step 3


# ---------------------------------------------------------------------------------------------- resume


def test_resume_with_looksam_state_is_exact(tmp_path):
    loader = make_loader(batch_size=16)  # 6 steps an epoch: the boundary falls between SAM steps (k = 4)

    def run(ckpt_path=None, drop_state=False):
        model = SAMClassifier(sam=LookSAM(0.05, k=4, alpha=0.7))
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
        if ckpt_path and drop_state:
            state = torch.load(ckpt_path, weights_only=False)
            del state["lightning_sam"]
            ckpt_path = tmp_path / "dropped.ckpt.bak"
            torch.save(state, ckpt_path)
        trainer(max_epochs=3, enable_checkpointing=True, callbacks=[ckpt]).fit(model, loader, ckpt_path=ckpt_path)
        return _state(model)

    full = run()
    resumed = run(tmp_path / "epoch=0-step=6.ckpt")
    _assert_same(full, resumed)
    without_state = run(tmp_path / "epoch=0-step=6.ckpt", drop_state=True)
    assert not torch.equal(without_state["net.0.weight"], full["net.0.weight"])


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: GSAM(alpha=-0.1), ValueError, r"`alpha` to be a finite, non-negative float, got -0.1"),
        (lambda: LookSAM(k=0), ValueError, r"`k` to be an int >= 1, got 0"),
        (lambda: LookSAM(k=2.5), TypeError, r"`k` to be an int >= 1, got 2.5"),
        (lambda: LookSAM(interval=2), ValueError, r"LookSAM takes a SAM step every `k` steps"),
        (lambda: SAM(interval=0), ValueError, r"`interval` to be an int >= 1, got 0"),
        (lambda: SAM(only=3), TypeError, r"`only` to be 'normalization', a regular expression or None"),
        (lambda: SAM(only="("), ValueError, r"`only` to be 'normalization' or a valid regular expression"),
        (lambda: SAM(rho_schedule="cosine"), TypeError, r"`rho_schedule` to be a RhoSchedule or None"),
        (lambda: RhoSchedule("exp"), ValueError, r"`shape` to be one of \('constant', 'linear', 'cosine', 'lr'\)"),
        (lambda: RhoSchedule("cosine"), TypeError, r"`total_steps` to be an int >= 1"),
        (lambda: RhoSchedule("linear", total_steps=5, warmup_steps=5), ValueError, r"`total_steps` to be an int >= 6"),
        (lambda: RhoSchedule("lr"), ValueError, r"`lr_max` to be a float > lr_min"),
        (lambda: RhoSchedule(rho_min=-1.0), ValueError, r"`rho_min` to be a finite, non-negative float"),
    ],
)
def test_invalid_arguments(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


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


def test_only_that_selects_nothing():
    with pytest.raises(ValueError, match=r"`only='nothing-here'` selects no parameter of SAMClassifier"):
        trainer(max_steps=1).fit(SAMClassifier(sam=SAM(only="nothing-here")), make_loader())


def test_methods_are_picklable_and_compare_by_configuration():
    import pickle

    method = GSAM(0.05, alpha=0.2, rho_schedule=RhoSchedule("lr", lr_max=0.1))
    method.clean_gradient_([torch.ones(3)], [torch.ones(3)])  # a buffer is not part of the configuration
    clone = pickle.loads(pickle.dumps(method))
    assert clone == method == GSAM(0.05, alpha=0.2, rho_schedule=RhoSchedule("lr", lr_max=0.1))
    assert "_clean" not in vars(clone)
    assert LookSAM(k=3) != LookSAM(k=4) and hash(LookSAM(k=3)) == hash(LookSAM(k=3))
    assert math.isclose(LookSAM().alpha, 0.7)
    assert copy.deepcopy(method) == method
