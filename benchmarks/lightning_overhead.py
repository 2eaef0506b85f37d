"""A SAM step inside a Lightning Trainer against a plain-PyTorch foreach SAM loop, same model and data.

Both train copies of the same 2.6M-parameter MLP (80 Linear layers, 160 tensors) with SGD (momentum
0.9, weight decay 5e-4, foreach) on the same batches, each drawing them from its own DataLoader over
the same dataset (a plain loop is `for x, y in loader: step(x, y)`, so batch loading counts on both
sides). The two are interleaved step by step: after each Lightning step, a callback runs one step of
the plain loop (its next batch included) and times it apart, so both see the same state of this
shared, noisy machine (round-to-round swings here are +-10-20%, step-to-step interleaving cancels
them). A Lightning step is timed from one batch's start
to the next one's, data loading and every hook included, minus the plain step run in between.

The SAM comparison runs ``--rounds`` times (a fresh Trainer each); every round's ratio is printed
and their median is the figure. Further runs interleave plain (non-SAM) Lightning training with the
same plain SAM loop, which gives the SAM / no-SAM ratio against the same reference, and with a plain
SGD loop, which gives what Lightning's own loop costs on a plain step; then the single-pass methods
(Momentum-SAM, RWP) against the same plain SGD loop, whose ratio over plain Lightning's is their
cost per step over an ordinary step (target: at most 1.05x). The last runs the recipe users
write today without this library: a manual-optimization LightningModule stepping
``pytorch_optimizer.SAM`` (pip ``pytorch-optimizer``, a dev extra) through ``LightningOptimizer.step(closure)``.

Usage: python benchmarks/lightning_overhead.py [--steps 100 --rounds 3 --batch-size 128 --device cpu|cuda]
"""

import argparse
import copy
import statistics
import time

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sam import RWP, SAM, MomentumSAM, SAMLightningModule

WARMUP = 3
CLOCK = time.perf_counter
DEVICE = torch.device("cpu")


def now() -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return CLOCK()


def mlp(width: int = 180, layers: int = 80) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())][:-1])


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)


class Plain(pl.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return sgd(self.parameters())


class WithSAM(SAMLightningModule, Plain):
    pass


class ManualPytorchOptimizerSAM(Plain):
    """The usual recipe: manual optimization with pytorch_optimizer's SAM wrapper optimizer."""

    def __init__(self, net: nn.Module):
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch

        def closure():
            loss = F.mse_loss(self.net(x), y)
            self.manual_backward(loss)
            return loss

        loss = closure()
        opt.step(closure=closure)  # first_step (w + e), closure at w + e, second_step (w, base SGD step)
        opt.zero_grad()
        return loss

    def configure_optimizers(self):
        from pytorch_optimizer import SAM as OutsideSAM

        return OutsideSAM(
            self.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True
        )


def plain_sam_loop(net: nn.Module, loader, rho: float = 0.05):
    """SAM written directly with torch's foreach ops: each call takes the loader's next batch, one step."""
    batches = iter(loader)
    net = net.to(DEVICE)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = sgd(params)
    saved = [torch.empty_like(p) for p in params]

    def step() -> None:
        x, y = (t.to(DEVICE) for t in next(batches))
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        scale = rho / (norm + 1e-12)
        with torch.no_grad():
            torch._foreach_copy_(saved, params)
            if DEVICE.type == "cpu":
                torch._foreach_add_(params, grads, alpha=scale.item())  # w <- w + e (.item() is free on CPU)
            else:
                torch._foreach_add_(params, torch._foreach_mul(grads, scale))
        torch._foreach_zero_(grads)
        F.mse_loss(net(x), y).backward()
        with torch.no_grad():
            torch._foreach_copy_(params, saved)  # w <- saved w
        opt.step()

    return step


def plain_sgd_loop(net: nn.Module, loader):
    """Plain training without SAM, the same optimizer: one forward/backward and one step per call."""
    batches = iter(loader)
    net = net.to(DEVICE)
    opt = sgd(net.parameters())

    def step() -> None:
        x, y = (t.to(DEVICE) for t in next(batches))
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        opt.step()

    return step


class Interleaved(pl.Callback):
    """Times Lightning steps and, between them, steps of a reference loop on its own copy of the data."""

    def __init__(self, reference_step) -> None:
        self.reference_step = reference_step
        self.lightning: list[float] = []
        self.reference: list[float] = []
        self.mark: float | None = None
        self.reference_time = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        t = now()
        if self.mark is not None and batch_idx > WARMUP:
            self.lightning.append(t - self.mark - self.reference_time)
        self.mark = t

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        start = now()
        self.reference_step()
        self.reference_time = now() - start
        if batch_idx >= WARMUP:
            self.reference.append(self.reference_time)


def interleaved_ratio(
    module: pl.LightningModule, net: nn.Module, loader, average: str = "median", reference=None
) -> tuple[float, float, float]:
    """(Lightning step, reference step, their ratio): medians (or means) in seconds.

    ``reference``: the loop interleaved with Lightning (default: :func:`plain_sam_loop`).
    """
    own_loader = torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size)  # the same batches
    timer = Interleaved((reference or plain_sam_loop)(copy.deepcopy(net), own_loader))
    trainer = pl.Trainer(
        accelerator="gpu" if DEVICE.type == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, loader)
    n = min(len(timer.lightning), len(timer.reference))
    mean = statistics.median if average == "median" else statistics.fmean
    ours, ref = mean(timer.lightning[:n]), mean(timer.reference[:n])
    return ours, ref, ours / ref


def make_loader(steps: int, batch_size: int):
    torch.manual_seed(0)
    n = (steps + WARMUP + 1) * batch_size
    data = torch.utils.data.TensorDataset(torch.randn(n, 180), torch.randn(n, 180))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="repeats of the SAM comparison (median reported)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    global CLOCK, DEVICE
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    loader = make_loader(args.steps, args.batch_size)
    net = mlp()
    rounds = [
        interleaved_ratio(WithSAM(copy.deepcopy(net), sam=SAM(0.05)), net, loader) for _ in range(max(1, args.rounds))
    ]
    sam_ms, ref_ms, sam_ratio = sorted(rounds, key=lambda r: r[2])[len(rounds) // 2]  # the median round
    plain_ms, _, plain_ratio = interleaved_ratio(Plain(copy.deepcopy(net)), net, loader)
    _, sgd_ms, lightning_ratio = interleaved_ratio(Plain(copy.deepcopy(net)), net, loader, reference=plain_sgd_loop)
    # the single-pass methods against the same plain SGD loop: their step over Lightning's plain step
    single = {
        name: interleaved_ratio(WithSAM(copy.deepcopy(net), sam=method), net, loader, reference=plain_sgd_loop)
        for name, method in (("MomentumSAM", MomentumSAM(rho=3.0)), ("RWP", RWP(sigma=0.01)))
    }
    try:
        outside = interleaved_ratio(ManualPytorchOptimizerSAM(copy.deepcopy(net)), net, loader)
    except ImportError:
        outside = None
    params = sum(p.numel() for p in net.parameters())
    print(
        f"MLP {params / 1e6:.2f}M parameters, batch {args.batch_size}, {args.steps} steps interleaved step by step, "
        f"{args.clock} clock, {DEVICE}; torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print(f"  Lightning + SAMLightningModule   {1e3 * sam_ms:8.2f} ms/step (median; the median round)")
    print(f"  plain-PyTorch foreach SAM loop   {1e3 * ref_ms:8.2f} ms/step (median, interleaved)")
    print(f"  Lightning, no SAM                {1e3 * plain_ms:8.2f} ms/step (median)")
    print(f"  plain-PyTorch SGD loop, no SAM   {1e3 * sgd_ms:8.2f} ms/step (median, interleaved)")
    for name, (ms, _, _) in single.items():
        print(f"  Lightning + {name:<20} {1e3 * ms:8.2f} ms/step (median)")
    if outside is not None:
        print(f"  Lightning manual + pytorch_optimizer.SAM {1e3 * outside[0]:8.2f} ms/step (median)")
    each = ", ".join(f"{r[2]:.3f}x" for r in rounds)
    print(f"\n  Lightning SAM / plain SAM loop     {sam_ratio:6.3f}x   (target <= 1.03x; median of rounds: {each})")
    print(f"  Lightning SAM / Lightning no SAM   {sam_ratio / plain_ratio:6.3f}x   (two passes: ~2x)")
    print(f"  Lightning no SAM / plain SGD loop  {lightning_ratio:6.3f}x   (Lightning's own loop, no SAM)")
    for name, (_, _, ratio) in single.items():  # both over the same plain SGD loop
        print(f"  {name} / Lightning no SAM {ratio / lightning_ratio:6.3f}x   (one pass: target <= 1.05x)")
    if outside is not None:
        print(f"  manual + pytorch_optimizer.SAM / ours {outside[2] / sam_ratio:6.3f}x   (each / the same plain loop)")
    else:
        print("  (pytorch-optimizer not installed: pip install -e '.[dev]' for the comparison)")


if __name__ == "__main__":
    main()
