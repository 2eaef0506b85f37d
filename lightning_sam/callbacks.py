"""Callbacks that report what SAM does."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_sam.module import SAMLightningModule

__all__ = ["SharpnessMonitor"]


class SharpnessMonitor(Callback):
    """Logs the figures of the last SAM step through ``pl_module.log`` (so to any logger).

    Keys: ``sam/sharpness`` (``L(w + e) - L(w)``), ``sam/perturbed_loss``, ``sam/eps_norm``
    (``||e||``), ``sam/grad_norm`` (``||g||``, unscaled under AMP) and ``sam/rho``. It logs on the
    Trainer's logging steps (``Trainer(log_every_n_steps)``) only, from figures the step already
    computed: no extra forward or backward, no host sync on other steps. Under DDP the figures are
    averaged over ranks on those steps.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_sam import SharpnessMonitor
        >>> trainer = pl.Trainer(callbacks=[SharpnessMonitor()], log_every_n_steps=10, logger=False)
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, SAMLightningModule):
            raise TypeError(
                f"SharpnessMonitor needs a SAMLightningModule, got {type(pl_module).__name__}. "
                f"Add the mixin first among its bases: `class {type(pl_module).__name__}(SAMLightningModule, ...)`."
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stats = getattr(pl_module, "sam_last_step", None)
        # `should_update_logs` is the Trainer's own decision to hand step metrics to the loggers.
        if stats is None or not trainer._logger_connector.should_update_logs:
            return
        for key, value in stats.as_dict().items():
            pl_module.log(key, value, on_step=True, on_epoch=False, sync_dist=True)
