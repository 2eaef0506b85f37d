"""Step time of 2-process DDP (CPU, gloo): SAM with per-replica e, SAM with a synchronized e, no SAM.

Each measurement is a separate ``Trainer(strategy="ddp", devices=2)`` run of this script in worker
mode; the three kinds alternate over rounds and the medians are compared. Times are wall-clock per
step on rank 0 after a warm-up, data loading and every hook included.

Usage: python benchmarks/ddp_step.py [--rounds 3 --steps 20]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sam import SAM, SAMLightningModule

WARMUP = 3
KINDS = ("no SAM", "SAM, each replica its own e", "SAM, synchronized e")


class Plain(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(*[m for _ in range(40) for m in (nn.Linear(256, 256), nn.Tanh())])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)


class WithSAM(SAMLightningModule, Plain):
    pass


class StepTimer(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == WARMUP:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end, self.steps = time.perf_counter(), batch_idx + 1 - WARMUP


def worker(kind: str, steps: int, out: Path) -> None:
    model = Plain() if kind == KINDS[0] else WithSAM(sam=SAM(0.05), sync_perturbation=kind == KINDS[2])
    n = 2 * (steps + WARMUP) * 64
    data = torch.utils.data.TensorDataset(torch.randn(n, 256), torch.randn(n, 256))
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=64))
    if trainer.global_rank == 0:
        out.write_text(json.dumps({"seconds_per_step": (timer.end - timer.start) / timer.steps}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.out)
        return
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, kind in enumerate(KINDS):
                out = Path(tmp) / f"{r}-{i}.json"
                cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--out", str(out)]
                subprocess.run(cmd, check=True, capture_output=True, cwd=tmp)
                times[kind].append(json.loads(out.read_text())["seconds_per_step"])
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(
        f"2 CPU processes (gloo) on this machine; MLP 40 x 256x256, "
        f"batch 64 per replica; {args.steps} timed steps x {args.rounds} rounds (median)\n"
    )
    for k, v in med.items():
        print(f"  {k:<32s} {v:8.2f} ms/step")
    base, local, synced = med.values()
    print(f"\n  per-replica e / no SAM          {local / base:6.2f}x")
    print(f"  synchronized e / no SAM         {synced / base:6.2f}x")
    print(f"  synchronized e / per-replica e  {synced / local:6.2f}x   (one all-reduce more per step)")


if __name__ == "__main__":
    main()
