"""HessianMonitor: the top Hessian eigenvalue of the training loss, on fixed batches, every n epochs."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_sam.analysis import batch_loss, top_hessian_eigenvalue

__all__ = ["HessianMonitor"]


class HessianMonitor(Callback):
    """Logs ``sharpness/hessian_max_eig``, the top Hessian eigenvalue of the training loss.

    Measured every ``every_n_epochs`` epochs and after the last on a fixed set of training batches (the first
    ``num_batches`` of training, kept on their device), with the model in eval mode (BatchNorm
    running statistics, no dropout) by power iteration (:func:`~lightning_sam.analysis.top_hessian_eigenvalue`).
    It takes no randomness from training and changes neither weights, buffers nor gradients, so
    training goes exactly as without it. Works with any LightningModule.

    Args:
        every_n_epochs: measure after every this many training epochs (and after the last one).
        num_batches: training batches in the fixed set.
        iters: at most this many Hessian-vector products per measurement.
        tol: relative change that ends the power iteration.
        loss: ``loss(outputs, targets)`` of ``(inputs, targets)`` batches; cross-entropy by default.

    Example::

        >>> from lightning_sam.callbacks import HessianMonitor
        >>> HessianMonitor(every_n_epochs=5).every_n_epochs
        5
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_batches: int = 2,
        iters: int = 20,
        tol: float = 1e-3,
        loss: Any = None,
    ) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("num_batches", num_batches), ("iters", iters)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be an int >= 1, got {value!r}.")
        self.every_n_epochs, self.num_batches, self.iters, self.tol = every_n_epochs, num_batches, iters, tol
        self.loss = loss
        self.batches: list[Any] = []
        self.history: list[tuple[int, float]] = []

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if len(self.batches) < self.num_batches:
            self.batches.append([t.detach() if hasattr(t, "detach") else t for t in batch])

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if not self.batches or (epoch % self.every_n_epochs and not last):
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.enable_grad():
                value = top_hessian_eigenvalue(
                    pl_module, batch_loss(pl_module, self.batches, self.loss), iters=self.iters, tol=self.tol
                )
        finally:
            pl_module.train(was_training)
        self.history.append((trainer.current_epoch, value))
        pl_module.log("sharpness/hessian_max_eig", value, on_step=False, on_epoch=True, sync_dist=True)
