"""Train a small 1-D CNN on MNIST-1D with SAM and print what SAM logs.

MNIST-1D is generated locally (no download). About a minute on two CPU cores:

    python examples/existing_module.py                    # SAM, rho = 0.05
    python examples/existing_module.py --method asam --rho 0.5
    python examples/existing_module.py --method none      # the same model and optimizer without SAM
    python examples/existing_module.py --label-noise 0.4
"""

import argparse
import time

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from lightning_sam import ASAM, SAM, SAMLightningModule, SharpnessMonitor
from lightning_sam.data import MNIST1DDataModule


class LitCNN(pl.LightningModule):
    """An ordinary LightningModule, written for automatic optimization."""

    def __init__(self, lr: float = 0.1, epochs: int = 30, channels: int = 32):
        super().__init__()
        self.lr, self.epochs = lr, epochs
        blocks = []
        for i in range(3):
            blocks += [
                nn.Conv1d(1 if i == 0 else channels, channels, 5, padding=2),
                nn.BatchNorm1d(channels),
                nn.ReLU(),
            ]
            blocks += [nn.MaxPool1d(2)] if i < 2 else [nn.AdaptiveAvgPool1d(1), nn.Flatten()]
        self.net = nn.Sequential(*blocks, nn.Linear(channels, 10))
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log_dict({"train/loss": loss, "train/acc": self.train_acc}, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)]


class SAMLitCNN(SAMLightningModule, LitCNN):
    """The same module with SAM: one added base class."""


class PrintEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        figures = [f"{k.split('/')[1]} {m[k].item():.4f}" for k in ("sam/sharpness", "sam/eps_norm") if k in m]
        print(
            f"epoch {trainer.current_epoch:3d}  train/loss {m['train/loss'].item():.4f}  "
            f"val/acc {m['val/acc'].item():.4f}  " + "  ".join(figures),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["sam", "asam", "none"], default="sam")
    parser.add_argument("--rho", type=float, default=None, help="default 0.05 for SAM, 0.5 for ASAM")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--label-noise", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()

    pl.seed_everything(args.seed, verbose=False)
    data = MNIST1DDataModule(args.data_dir, batch_size=128, label_noise=args.label_noise, seed=args.seed)
    if args.method == "none":
        model, callbacks = LitCNN(lr=args.lr, epochs=args.epochs), []
    else:
        method = SAM(args.rho or 0.05) if args.method == "sam" else ASAM(args.rho or 0.5)
        model, callbacks = SAMLitCNN(sam=method, lr=args.lr, epochs=args.epochs), [SharpnessMonitor()]
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        callbacks=[*callbacks, PrintEpoch()],
        logger=pl.loggers.CSVLogger("lightning_logs", name=f"mnist1d_{args.method}"),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    test = trainer.test(model, data, verbose=False)[0]
    print(
        f"\n{args.method}: test accuracy {test['test/acc']:.4f} after {args.epochs} epochs "
        f"in {time.perf_counter() - start:.0f} s; logs in {trainer.logger.log_dir}"
    )


if __name__ == "__main__":
    main()
