"""A small GAN on synthetic 2-D data (a ring of 8 Gaussians), with SAM on the discriminator only.

The module keeps its own manual optimization (two optimizers); `sam_step` runs the SAM step of
one of them. No download; trains in well under a minute on a laptop CPU:

    python examples/gan_sam.py [--no-sam] [--epochs 30]

It prints how many of the 8 modes the generator covers and the share of its samples that land near
a mode ("high quality": within 3 standard deviations).
"""

import argparse
import math

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sam import SAM, SharpnessMonitor, sam_step

MODES = torch.tensor([[math.cos(2 * math.pi * k / 8), math.sin(2 * math.pi * k / 8)] for k in range(8)]) * 2.0
STD = 0.05


def ring(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MODES[torch.randint(0, 8, (n,), generator=g)] + STD * torch.randn(n, 2, generator=g)


def mlp(inputs: int, outputs: int, width: int = 128) -> nn.Module:
    layers = [nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, outputs)]
    return nn.Sequential(*layers)


class GAN(pl.LightningModule):
    def __init__(self, use_sam: bool = True, rho: float = 0.05, latent: int = 8):
        super().__init__()
        self.automatic_optimization = False  # two optimizers, stepped here
        self.latent = latent
        self.generator, self.discriminator = mlp(latent, 2), mlp(2, 1)
        self.sam = SAM(rho=rho) if use_sam else None

    def sample(self, n: int) -> torch.Tensor:
        return self.generator(torch.randn(n, self.latent, device=self.device))

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)
        loss = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
        loss = loss + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        self.log("train/loss_d", loss, prog_bar=True)  # logged once per step, also under SAM
        return loss

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        fake = self.sample(len(real)).detach()  # D's loss must not reach G's parameters
        if self.sam is not None:
            sam_step(self, opt_d, lambda: self.discriminator_loss(real, fake), self.sam)  # SAM on D
        else:
            opt_d.zero_grad()
            self.manual_backward(self.discriminator_loss(real, fake))
            opt_d.step()
        d_fake = self.discriminator(self.sample(len(real)))  # plain step on G
        loss_g = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.log("train/loss_g", loss_g, prog_bar=True)

    def configure_optimizers(self):
        betas = (0.5, 0.999)
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-3, betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=1e-3, betas=betas),
        )


@torch.no_grad()
def quality(model: GAN, n: int = 2000) -> tuple[int, float]:
    """(modes covered, share of samples within 3 standard deviations of a mode)."""
    torch.manual_seed(1)
    samples = model.sample(n)
    distance, nearest = torch.cdist(samples, MODES).min(dim=1)
    good = distance < 3 * STD
    return len(nearest[good].unique()), good.float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-sam", action="store_true", help="plain Adam on the discriminator")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    pl.seed_everything(0)
    data = torch.utils.data.TensorDataset(ring(8192))
    model = GAN(use_sam=not args.no_sam)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[SharpnessMonitor()],
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=256, shuffle=True))
    modes, share = quality(model)
    method = "SAM" if model.sam else "no SAM"
    print(f"\n{method} on D: {modes}/8 modes covered, {100 * share:.1f}% high-quality samples")


if __name__ == "__main__":
    main()
