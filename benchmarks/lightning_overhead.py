"""A SAM step inside a Lightning Trainer against a plain-PyTorch foreach SAM loop, same model and data.

Both train the same 2.6M-parameter MLP (80 Linear layers, 160 tensors) with SGD (momentum 0.9,
weight decay 5e-4, foreach) on the same batches. Rounds alternate between the two (and a plain
non-SAM Lightning run, for the 2x reference); per-step times are medians (and bests) over rounds,
measured from the first timed batch's start to the last batch's end (data loading and every hook
included), in the process's CPU time by default: on a shared machine wall time swings by +-20%
between rounds, CPU time by a few percent (``--clock wall`` for wall time).

Usage: python benchmarks/lightning_overhead.py [--steps 20 --rounds 7 --batch-size 128]
"""

import argparse
import copy
import statistics
import time

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sam import SAM, SAMLightningModule

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


class StepTimer(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == WARMUP:
            self.start = now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = now()
        self.steps = batch_idx + 1 - WARMUP


def lightning_step_time(module: pl.LightningModule, loader) -> float:
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="gpu" if DEVICE.type == "cuda" else "cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, loader)
    return (timer.end - timer.start) / timer.steps


def plain_sam_step_time(net: nn.Module, loader, rho: float = 0.05) -> float:
    """SAM written directly with torch's foreach ops: the loop the Trainer is measured against."""
    net = net.to(DEVICE)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = sgd(params)
    saved = [torch.empty_like(p) for p in params]
    for i, (x, y) in enumerate(loader):
        x, y = x.to(DEVICE), y.to(DEVICE)
        if i == WARMUP:
            start = now()
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
    return (now() - start) / (len(loader) - WARMUP)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="cpu",
        help="cpu: the process's CPU time, less sensitive to other load on a shared machine",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    global CLOCK, DEVICE
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    DEVICE = torch.device(args.device)
    torch.manual_seed(0)
    n = (args.steps + WARMUP) * args.batch_size
    data = torch.utils.data.TensorDataset(torch.randn(n, 180), torch.randn(n, 180))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    net = mlp()
    times: dict[str, list[float]] = {
        "plain-PyTorch SAM loop": [],
        "Lightning + SAMLightningModule": [],
        "Lightning, no SAM": [],
    }
    for _ in range(args.rounds):
        times["plain-PyTorch SAM loop"].append(plain_sam_step_time(copy.deepcopy(net), loader))
        times["Lightning + SAMLightningModule"].append(
            lightning_step_time(WithSAM(copy.deepcopy(net), sam=SAM(0.05)), loader)
        )
        times["Lightning, no SAM"].append(lightning_step_time(Plain(copy.deepcopy(net)), loader))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    best = {k: min(v) * 1e3 for k, v in times.items()}
    params = sum(p.numel() for p in net.parameters())
    print(
        f"MLP {params / 1e6:.2f}M parameters, batch {args.batch_size}, {args.steps} timed steps x {args.rounds} "
        f"rounds, {args.clock} clock, {DEVICE}; torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print(f"  {'ms/step':<34s} {'median':>8s} {'best':>8s}")
    for k in med:
        print(f"  {k:<34s} {med[k]:8.2f} {best[k]:8.2f}")
    for name, t in (("median", med), ("best", best)):
        plain, ours, no_sam = t.values()
        print(f"\n  {name}: Lightning SAM / plain SAM loop     {ours / plain:6.3f}x   (target <= 1.05x)")
        print(f"  {name}: Lightning SAM / Lightning no SAM   {ours / no_sam:6.3f}x   (two passes: ~2x)")


if __name__ == "__main__":
    main()
