"""Tiny models, data and a plain-PyTorch SAM loop written straight from the paper's equations.

The reference loop is deliberately naive (per-parameter Python, no foreach, no Lightning) so that it
checks the library rather than repeating it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sam import SAMLightningModule


def make_data(n: int = 96, features: int = 6, classes: int = 3, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] * 2 + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return torch.utils.data.TensorDataset(x, y.clamp(max=classes - 1))


def make_loader(batch_size: int = 16, **kwargs) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(make_data(**kwargs), batch_size=batch_size, shuffle=False)


def make_net(features: int = 6, classes: int = 3, seed: int = 0, batchnorm: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(features, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, classes)]
    return nn.Sequential(*layers)


def two_group_sgd(net: nn.Module, lr: float = 0.1, rho2: float | None = 0.02) -> torch.optim.SGD:
    """First layer in one group, the rest in another with half the lr and (optionally) its own rho."""
    first = list(net[0].parameters())
    ids = {id(p) for p in first}
    rest = [p for p in net.parameters() if id(p) not in ids]
    second: dict = {"params": rest, "lr": lr / 2}
    if rho2 is not None:
        second["rho"] = rho2
    return torch.optim.SGD([{"params": first}, second], lr=lr, momentum=0.9, weight_decay=5e-4)


class Classifier(pl.LightningModule):
    """An ordinary LightningModule, written for automatic optimization."""

    def __init__(self, lr: float = 0.1, batchnorm: bool = True, two_groups: bool = False, seed: int = 0):
        super().__init__()
        self.lr = lr
        self.two_groups = two_groups
        self.net = make_net(batchnorm=batchnorm, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        if self.two_groups:
            return two_group_sgd(self.net, self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


class SAMClassifier(SAMLightningModule, Classifier):
    pass


class Quadratic(SAMLightningModule):
    """L(w) = 1/2 w^T A w: the SAM step has a closed form. Also uses the mixin as the only base."""

    def __init__(self, a: torch.Tensor, w0: torch.Tensor, lr: float, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("a", a)
        self.w = nn.Parameter(w0.clone())
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return 0.5 * self.w @ self.a @ self.w

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a, "an empty state: nothing to compare"
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


class Snapshots(pl.Callback):
    """The module's state and the optimizer's at the start of every training batch."""

    def __init__(self):
        self.states = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append((state_copy(pl_module), copy.deepcopy(trainer.optimizers[0].state_dict())))


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def reference_sam(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    rho: float,
    adaptive_eta: float | None = None,
    clip_norm: float | None = None,
    accumulate: int = 1,
    loss_fn: Callable = F.cross_entropy,
) -> None:
    """SAM as written in Foret et al. (Algorithm 1), one parameter at a time.

    e = rho * g / ||g||  (SAM), or e = rho * T^2 g / ||T g||, T = |w| + eta (ASAM, when adaptive_eta is set).
    A param group's "rho" key overrides rho. BatchNorm statistics are updated by the clean pass only.
    With accumulation, each micro-batch gets its own e and the descent gradients of loss / accumulate add up.
    """
    net.train()
    batches = list(batches)
    optimizer.zero_grad()
    for i, (x, y) in enumerate(batches):
        clean_grads = {}
        saved_grads = {p: (p.grad.clone() if p.grad is not None else None) for p in net.parameters()}
        for p in net.parameters():
            p.grad = None
        loss_fn(net(x), y).backward()
        with torch.no_grad():
            for p in net.parameters():
                if p.grad is not None:  # a parameter this micro-batch does not use is not perturbed
                    clean_grads[p] = p.grad.clone()
            scale_t = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    t = torch.ones_like(p) if adaptive_eta is None else p.abs() + adaptive_eta
                    scale_t[p] = t
            norm = torch.sqrt(sum(((scale_t[p] * g) ** 2).sum() for p, g in clean_grads.items()))
            saved = {}
            for group in optimizer.param_groups:
                group_rho = group.get("rho", rho)
                for p in group["params"]:
                    if p in clean_grads:
                        saved[p] = p.clone()
                        p.add_(group_rho * scale_t[p] ** 2 * clean_grads[p] / (norm + 1e-12))
        buffers = {name: b.clone() for name, b in net.named_buffers()}
        for p in net.parameters():
            p.grad = None
        (loss_fn(net(x), y) / accumulate).backward()
        with torch.no_grad():
            for p in net.parameters():
                if p in saved:
                    p.copy_(saved[p])
                if saved_grads[p] is not None:
                    p.grad = saved_grads[p] if p.grad is None else p.grad + saved_grads[p]
            for name, b in net.named_buffers():
                b.copy_(buffers[name])
        if (i + 1) % accumulate == 0 or i + 1 == len(batches):
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(net.parameters()), clip_norm)
            optimizer.step()
            optimizer.zero_grad()


def fit_quadratic(a: torch.Tensor, w0: torch.Tensor, method, steps: int, lr: float = 0.05) -> torch.Tensor:
    """Train :class:`Quadratic` for ``steps`` optimizer steps with ``method``; return the weights."""
    model = Quadratic(a, w0, lr, sam=method)
    trainer(max_steps=steps).fit(model, torch.utils.data.DataLoader(range(100)))
    return model.w.detach()
