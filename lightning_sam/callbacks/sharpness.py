"""SharpnessMonitor: logs what each SAM step measured (sharpness, ||e||, ||g||, rho), from figures it already has."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_sam._compat import should_update_logs
from lightning_sam.manual import sam_step_stats
from lightning_sam.module import SAMLightningModule

__all__ = ["SharpnessMonitor"]


class SharpnessMonitor(Callback):
    """Logs the figures of the last SAM step through ``pl_module.log`` (so to any logger).

    Keys: ``sam/sharpness`` (``L(w + e) - L(w)``), ``sam/perturbed_loss``, ``sam/eps_norm``
    (``||e||``), ``sam/grad_norm`` (``||g||``, unscaled under AMP) and ``sam/rho``. It logs on the
    Trainer's logging steps (``Trainer(log_every_n_steps)``) only, from figures the step already
    computed: no extra forward or backward, no host sync on other steps. Under DDP the figures are
    averaged over ranks on those steps. For a manual-optimization module that calls
    :func:`~lightning_sam.sam_step`, it logs the last SAM step of each optimizer, under
    ``sam/opt{i}/...`` (``i`` the optimizer's index) when several optimizers take SAM steps. On a
    module with automatic optimization but without the :class:`~lightning_sam.SAMLightningModule`
    mixin it warns once per fit and logs nothing.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_sam import SharpnessMonitor
        >>> trainer = pl.Trainer(callbacks=[SharpnessMonitor()], log_every_n_steps=10, logger=False)
    """

    def __init__(self) -> None:
        self._active = False  # whether the module being trained takes SAM steps

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # One callback list may serve a baseline run and a SAM run: on a module without the
        # mixin there is nothing to report, which is worth a warning but not an error.
        # a manual-optimization module may call sam_step: known only once it has
        self._active = isinstance(pl_module, SAMLightningModule) or not pl_module.automatic_optimization
        if not self._active and stage == "fit":
            name = type(pl_module).__name__
            rank_zero_warn(
                f"SharpnessMonitor does nothing for {name}: it is not a SAMLightningModule, so there are no SAM "
                f"steps to report. To train it with SAM, add the mixin first among its bases: "
                f"`class SAM{name}(SAMLightningModule, {name})`.",
                category=UserWarning,
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # `should_update_logs` is the Trainer's own decision to hand step metrics to the loggers.
        if not self._active or not should_update_logs(trainer):
            return
        if isinstance(pl_module, SAMLightningModule):
            stats = {} if pl_module.sam_last_step is None else {None: pl_module.sam_last_step}
        else:
            stats = dict(sam_step_stats(pl_module))
            if len(stats) == 1:
                stats = {None: next(iter(stats.values()))}
        for index, figures in stats.items():
            for key, value in figures.as_dict().items():
                name = key if index is None else key.replace("sam/", f"sam/opt{index}/", 1)
                pl_module.log(name, value, on_step=True, on_epoch=False, sync_dist=True)
        if isinstance(pl_module, SAMLightningModule):  # the method's own figures (AE-SAM: its share of SAM steps)
            for key, value in pl_module.sam.figures().items():
                pl_module.log(key, float(value), on_step=True, on_epoch=False, sync_dist=True)
