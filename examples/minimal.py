"""The smallest complete use of lightning-sam: a LightningModule trained with SAM (no Hydra).

python examples/minimal.py
"""

import lightning.pytorch as pl
import torch
from torch.nn import functional as F

from lightning_sam import SAM, SAMLightningModule, SharpnessMonitor


class Regressor(SAMLightningModule):  # the mixin as the only base
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):  # written as for automatic optimization
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):  # the ordinary optimizer: no wrapper
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


if __name__ == "__main__":
    x = torch.randn(512, 8)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    model = Regressor(sam=SAM(rho=0.05))
    trainer = pl.Trainer(  # the Trainer as always: clipping, accumulation, precision, callbacks
        max_epochs=5, gradient_clip_val=1.0, callbacks=[SharpnessMonitor()], logger=False, enable_checkpointing=False
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=32, shuffle=True))
    print({k: round(v.item(), 4) for k, v in trainer.callback_metrics.items()})
