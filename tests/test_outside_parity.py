"""The SAM step against plain-PyTorch references written from the equations of outside implementations.

Regression tests for three defects of the core step, through the public API only: a real ``Trainer``
on CPU and a module subclassing ``SAMLightningModule``. Each reference is per-parameter Python keyed
by parameter name, imports nothing from lightning_sam, and uses the paper's notation:

* SAM (Foret et al. 2021): ``e = rho g / ||g||`` over the parameters with a clean gradient,
  ``w <- w + e``, ``g_p`` at ``w + e``, ``w`` restored from a copy, the optimizer steps with ``g_p``.
* LookSAM (Liu et al. 2022): every ``k``-th step a SAM step storing
  ``g_v = g_s - (g . g_s / ||g||^2) g``; between, ``g + alpha ||g|| / ||g_v|| g_v``, each parameter
  with its own part of ``g_v``.
* GSAM (Zhuang et al. 2022): ``d = g_p - alpha (g - (g . g_p / ||g_p||^2) g_p)`` over the whole
  model, a missing gradient counting as 0.
"""

import copy
from collections.abc import Callable
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_sam import GSAM, SAM, LookSAM, SAMLightningModule
from tests.helpers import trainer as make_trainer

STEPS = 10
BATCH = 8
ATOL = 1e-6
EPS = 1e-12  # added to the norms in denominators, as the methods do

Grads = dict[str, Tensor]
MakeOptimizer = Callable[..., torch.optim.Optimizer]


def fit(module: pl.LightningModule, loader: torch.utils.data.DataLoader, callbacks: list | None = None) -> None:
    trainer = make_trainer(callbacks=callbacks, max_steps=STEPS)
    trainer.fit(module, loader)
    assert trainer.global_step == STEPS


def make_loader(
    classes_b: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.utils.data.DataLoader:
    """``(x, y)`` batches, or ``(x, y_a, y_b)`` with a second label space of ``classes_b`` classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS * BATCH, 6, generator=g).to(dtype)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()  # 3 classes
    tensors = (x, y) if classes_b is None else (x, y, torch.randint(0, classes_b, (len(x),), generator=g))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=BATCH, shuffle=False)


def assert_matches(net: nn.Module, ref: nn.Module) -> None:
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def assert_moved(net: nn.Module, start: nn.Module, names: list[str], moved: bool = True) -> None:
    now, before = dict(net.named_parameters()), dict(start.named_parameters())
    for name in names:
        assert torch.equal(now[name], before[name]) != moved, f"{name} {'did not move' if moved else 'moved'}"


# ---------------------------------------------------------------- the plain-torch reference


def gradients(net: nn.Module, loss_fn: Callable[[], Tensor]) -> Grads:
    """The gradient of ``loss_fn()`` at the current weights; a parameter it does not reach is absent."""
    for p in net.parameters():
        p.grad = None
    loss_fn().backward()
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def norm(v: Grads) -> Tensor:
    return torch.sqrt(sum((t**2).sum() for t in v.values()))


def dot(a: Grads, b: Grads) -> Tensor:
    return sum((a[n] * b[n]).sum() for n in a if n in b)


def sam_gradients(
    net: nn.Module, clean_loss: Callable[[], Tensor], perturbed_loss: Callable[[], Tensor], rho: float
) -> tuple[Grads, Grads]:
    """One SAM ascent: ``(g, g_p)``, the gradients at ``w`` and at ``w + e``; ``w`` is restored."""
    params = dict(net.named_parameters())
    g = gradients(net, clean_loss)  # g = dL/dw at w
    scale = rho / (norm(g) + EPS)
    saved = {}
    with torch.no_grad():
        for n, g_n in g.items():  # every parameter with a clean gradient, and only those
            saved[n] = params[n].clone()
            params[n].add_(scale * g_n)  # w <- w + e, e = rho g / ||g||
    g_p = gradients(net, perturbed_loss)  # g_p = dL/dw at w + e
    with torch.no_grad():
        for n, w in saved.items():
            params[n].copy_(w)  # w <- w from the copy: (w + e) - e is not w in floating point
    return g, g_p


def optimizer_step(net: nn.Module, optimizer: torch.optim.Optimizer, d: Grads) -> None:
    """Step along ``d``; a parameter absent from ``d`` has no gradient, so torch's optimizers skip it."""
    for n, p in net.named_parameters():
        p.grad = d.get(n)
    optimizer.step()


# ---------------------------------------------------------------- D1: LookSAM's stored direction


class TwoHeads(nn.Module):
    """A shared trunk and two heads, as in multi-task training."""

    def __init__(self, classes_b: int = 3):
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.head_a = nn.Linear(8, 3)
        self.head_b = nn.Linear(8, classes_b)


def two_head_loss(net: TwoHeads, batch: list[Tensor], batch_idx: int) -> Tensor:
    """Head a on even batches, head b (its own label space) on odd ones."""
    x, y_a, y_b = batch
    h = torch.tanh(net.trunk(x))
    if batch_idx % 2 == 0:
        return F.cross_entropy(net.head_a(h), y_a)
    return F.cross_entropy(net.head_b(h), y_b)


class TwoHeadModule(SAMLightningModule, pl.LightningModule):
    def __init__(self, method: SAM, net: TwoHeads, make_optimizer: MakeOptimizer):
        super().__init__(sam=method)
        self.net, self.make_optimizer = net, make_optimizer

    def training_step(self, batch, batch_idx):
        return two_head_loss(self.net, batch, batch_idx)

    def configure_optimizers(self):
        return self.make_optimizer(self.net.parameters())


def reference_looksam(
    net: TwoHeads,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    rho: float,
    k: int,
    alpha: float,
) -> None:
    g_v: Grads = {}  # the stored direction, one part per parameter of the last SAM step
    for t, batch in enumerate(loader):  # t: the optimizer step, here also the batch index
        loss = partial(two_head_loss, net, batch, t)
        if t % k == 0:
            g, g_s = sam_gradients(net, loss, loss, rho)
            assert g.keys() == g_s.keys()  # both passes use the same head
            # g_v = g_s - (g . g_s / ||g||^2) g: the part of g_s orthogonal to g
            c = dot(g, g_s) / (norm(g) ** 2 + EPS)
            g_v = {n: g_s[n] - c * g[n] for n in g}
            d = g_s  # descend along the SAM gradient
        else:
            g = gradients(net, loss)  # one forward/backward
            scale = alpha * norm(g) / (norm(g_v) + EPS)  # ||g|| over the parameters with a gradient now
            # g + alpha ||g|| / ||g_v|| g_v, each parameter with its own part of g_v (none stored: g alone)
            d = {n: g[n] + scale * g_v[n] if n in g_v else g[n] for n in g}
        optimizer_step(net, optimizer, d)


def _looksam_parity(classes_b: int, make_optimizer: MakeOptimizer) -> None:
    torch.manual_seed(0)
    # float64: g_v = g_s - c g cancels most of g_s, so float32 rounding alone comes near ATOL in 10 steps
    net = TwoHeads(classes_b).double()
    ref, start = copy.deepcopy(net), copy.deepcopy(net)
    loader = make_loader(classes_b, torch.float64)
    # k=2: the SAM steps (t even) use head_a, the plain steps (t odd) head_b
    fit(TwoHeadModule(LookSAM(rho=0.05, k=2, alpha=0.7), net, make_optimizer), loader)
    reference_looksam(ref, make_optimizer(ref.parameters()), loader, rho=0.05, k=2, alpha=0.7)
    assert_moved(ref, start, ["trunk.weight", "head_a.weight", "head_b.weight"])
    assert_matches(net, ref)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "sgd-momentum"])
def test_looksam_adds_to_each_parameter_its_own_stored_direction(momentum):
    # same-shaped heads: adding head_a's g_v to head_b's gradient would go unnoticed by shape checks
    _looksam_parity(3, partial(torch.optim.SGD, lr=0.1, momentum=momentum))


def test_looksam_with_heads_of_different_sizes():
    _looksam_parity(5, partial(torch.optim.SGD, lr=0.1))


# ---------------------------------------------------------------- D2, D3: routes that differ between the passes


class Routed(nn.Module):
    """A trunk and a head, with two residual layers that a route may use or skip."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.extra1 = nn.Linear(8, 8)
        self.extra2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)


CLEAN, PERTURBED = 0, 1
Route = Callable[[int, int], str | None]  # (optimizer step, pass) -> the extra layer used, or none


def routed_loss(net: Routed, batch: list[Tensor], extra: str | None) -> Tensor:
    x, y = batch
    h = torch.tanh(net.trunk(x))
    if extra is not None:
        h = h + torch.tanh(getattr(net, extra)(h))
    return F.cross_entropy(net.head(h), y)


class RoutedModule(SAMLightningModule, pl.LightningModule):
    """Data-dependent routing that differs between the passes of a step.

    ``training_step`` counts its calls: call ``2t`` is the clean pass of step ``t``, call ``2t + 1`` its
    perturbed pass.
    """

    def __init__(self, method: SAM, net: Routed, make_optimizer: MakeOptimizer, route: Route):
        super().__init__(sam=method)
        self.net, self.make_optimizer, self.route = net, make_optimizer, route
        self.calls = 0

    def training_step(self, batch, batch_idx):
        extra = self.route(self.calls // 2, self.calls % 2)
        self.calls += 1
        return routed_loss(self.net, batch, extra)

    def configure_optimizers(self):
        return self.make_optimizer(self.net.parameters())


def routed_sam_gradients(net: Routed, batch: list[Tensor], t: int, route: Route, rho: float) -> tuple[Grads, Grads]:
    clean, perturbed = (
        partial(routed_loss, net, batch, route(t, CLEAN)),
        partial(routed_loss, net, batch, route(t, PERTURBED)),
    )
    return sam_gradients(net, clean, perturbed, rho)


def reference_sam_routed(
    net: Routed, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader, rho: float, route: Route
) -> None:
    for t, batch in enumerate(loader):
        # e comes from every clean gradient: a layer of the clean pass only is perturbed and counts in ||g||
        _, g_p = routed_sam_gradients(net, batch, t, route, rho)
        optimizer_step(net, optimizer, g_p)  # no perturbed gradient: no gradient, not updated


def extra1_in_the_clean_pass_only_after_step_0(step: int, pass_: int) -> str | None:
    # step 0 gives extra1 optimizer state (momentum, Adam's moments), so a zero gradient would move it later
    return "extra1" if pass_ == CLEAN or step == 0 else None


class AfterStep0(pl.Callback):
    """Keeps the module's weights as they are after the first optimizer step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.weights = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}


@pytest.mark.parametrize(
    "make_optimizer",
    [partial(torch.optim.Adam, lr=1e-3), partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)],
    ids=["adam", "sgd-momentum-wd"],
)
def test_sam_leaves_a_parameter_without_perturbed_gradient_without_gradient(make_optimizer):
    route = extra1_in_the_clean_pass_only_after_step_0
    torch.manual_seed(0)
    net = Routed()
    ref, start = copy.deepcopy(net), copy.deepcopy(net)
    loader = make_loader()
    module, after_step_0 = RoutedModule(SAM(rho=0.05), net, make_optimizer, route), AfterStep0()
    fit(module, loader, callbacks=[after_step_0])
    assert module.calls == 2 * STEPS  # a clean and a perturbed pass per step, as the routing assumes
    assert not torch.equal(after_step_0.weights["extra1.weight"], start.extra1.weight)  # step 0 trained it
    for name, p in net.named_parameters():
        if name.startswith("extra1."):  # bit for bit since step 0: the optimizer skipped it
            assert torch.equal(p, after_step_0.weights[name]), f"{name} moved after step 0"
    assert_moved(net, start, ["extra2.weight", "extra2.bias"], moved=False)  # never used at all
    reference_sam_routed(ref, make_optimizer(ref.parameters()), loader, 0.05, route)
    assert_moved(ref, start, ["trunk.weight", "extra1.weight", "head.weight"])
    assert_matches(net, ref)


def reference_gsam_routed(
    net: Routed,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    rho: float,
    alpha: float,
    route: Route,
) -> None:
    params = dict(net.named_parameters())
    for t, batch in enumerate(loader):
        g, g_p = routed_sam_gradients(net, batch, t, route, rho)
        # whole-model vectors over the parameters with a gradient in either pass, a missing one counting as 0
        names = [n for n in params if n in g or n in g_p]
        g = {n: g[n] if n in g else torch.zeros_like(params[n]) for n in names}
        g_p = {n: g_p[n] if n in g_p else torch.zeros_like(params[n]) for n in names}
        # d = g_p - alpha g_perp, g_perp = g - (g . g_p / ||g_p||^2) g_p: the part of g orthogonal to g_p
        c = dot(g, g_p) / (norm(g_p) ** 2 + EPS)
        d = {n: g_p[n] - alpha * (g[n] - c * g_p[n]) for n in names}
        optimizer_step(net, optimizer, d)


def extra1_clean_extra2_perturbed(step: int, pass_: int) -> str | None:
    return "extra1" if pass_ == CLEAN else "extra2"


def test_gsam_descent_over_the_whole_model_with_missing_gradients_as_zero():
    route = extra1_clean_extra2_perturbed
    make_optimizer = partial(torch.optim.SGD, lr=0.1)
    torch.manual_seed(0)
    net = Routed()
    ref, start = copy.deepcopy(net), copy.deepcopy(net)
    loader = make_loader()
    module = RoutedModule(GSAM(rho=0.05, alpha=0.3), net, make_optimizer, route)
    fit(module, loader)
    assert module.calls == 2 * STEPS
    # extra1 descends along -alpha g (its g_p is 0), extra2 along (1 + alpha c) g_p
    reference_gsam_routed(ref, make_optimizer(ref.parameters()), loader, 0.05, 0.3, route)
    assert_moved(ref, start, ["trunk.weight", "extra1.weight", "extra2.weight", "head.weight"])
    assert_matches(net, ref)
