"""The app's LightningModule: an ordinary classifier, and the same with the SAM mixin."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_sam.module import SAMLightningModule

__all__ = ["Classifier", "SAMClassifier"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class Classifier(pl.LightningModule):
    """Cross-entropy classification with accuracy on train, validation and test (torchmetrics).

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` and ``test/acc``.

    Args:
        net: maps a batch of inputs to logits.
        num_classes: the number of classes.
        optimizer: builds the optimizer from the parameters (a Hydra ``_partial_``).
        scheduler: builds the LR scheduler from the optimizer, or ``None``.
        scheduler_interval: ``"epoch"`` or ``"step"``.

    Example::

        >>> from functools import partial
        >>> from lightning_sam.models import Classifier, ConvNet1D
        >>> model = Classifier(ConvNet1D(), 10, partial(torch.optim.SGD, lr=0.1))
        >>> model(torch.randn(4, 1, 40)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__()
        # the factories are Hydra partials, which checkpoints loaded with weights_only cannot hold
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def logged_keys(self, sam_steps: bool = False) -> set[str]:
        """The metric names this module logs during ``fit`` (with ``sam_steps``: also SharpnessMonitor's)."""
        keys = {"train/loss", "train/acc", "val/loss", "val/acc"}
        if sam_steps:
            keys |= {"sam/sharpness", "sam/perturbed_loss", "sam/eps_norm", "sam/grad_norm", "sam/rho"}
        return keys

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": self.scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class SAMClassifier(SAMLightningModule, Classifier):
    """:class:`Classifier` trained with SAM: ``SAMClassifier(net, num_classes, optimizer, sam=SAM(0.05))``."""
