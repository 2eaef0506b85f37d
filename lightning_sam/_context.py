"""What the SAM step needs to know from Lightning's Trainer, decided in one place for the mixin and ``sam_step``.

The four decisions the front ends make at each step: how the replicas agree on a flag (a skip, a
SAM step), whether the clean gradient is averaged over them, the AMP loss scale, and whether a
clean gradient kept local must be averaged after an adaptive method chose a plain step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_sam._compat import active_scaler, loss_scale
from lightning_sam.core.tensors import all_reduce_mean_, is_distributed_ddp
from lightning_sam.core.update import SAMUpdate
from lightning_sam.methods import shipped
from lightning_sam.methods.base import Method

__all__ = ["StepContext", "check_step_arguments"]


def check_step_arguments(method: Any, closure: Any, sync_perturbation: Any) -> None:
    """The arguments every ``sam_step`` front end shares, refused before any pass with a message naming each."""
    if not isinstance(method, Method):
        raise TypeError(
            f"Expected `method` to be a method object (one of {shipped()}, or a lightning_sam.Method of your own), "
            f"got {method!r}."
        )
    if not callable(closure):
        raise TypeError(f"Expected `closure` to be a callable returning the loss, got {closure!r}.")
    if not isinstance(sync_perturbation, bool):
        raise TypeError(f"Expected `sync_perturbation` to be True or False, got {sync_perturbation!r}.")


@dataclass(frozen=True)
class StepContext:
    """The Trainer as one SAM step sees it.

    Attributes:
        any_rank: ``any_rank(flag)``: whether any replica's flag is set (the flag itself on one device).
        scaler: the precision plugin's GradScaler, if it scales losses (a disabled one counts as none).
        syncs_clean: the clean gradient is averaged over replicas: ``sync_perturbation`` (one ``e`` for
            all), or a method whose descent uses the clean gradient (every replica must compute the same).
        distributed: DistributedDataParallel over several processes.
    """

    any_rank: Callable[[bool], bool]
    scaler: Any | None
    syncs_clean: bool
    distributed: bool

    @classmethod
    def of(cls, trainer: Any, method: Method, sync_perturbation: bool) -> StepContext:
        """The context of ``trainer``'s current step for ``method``."""
        strategy = trainer.strategy
        return cls(
            any_rank=lambda flag: strategy.reduce_boolean_decision(flag, all=False),
            scaler=active_scaler(trainer.precision_plugin),
            syncs_clean=sync_perturbation or method.uses_clean_gradient,
            distributed=is_distributed_ddp(strategy.model),
        )

    def loss_scale(self) -> Tensor | float | None:
        """The AMP scale of the losses now (``None`` without a scaler), without a host sync."""
        return loss_scale(self.scaler) if self.scaler is not None else None

    def average_(self, params: Iterable[Tensor]) -> None:
        """Average the gradients of ``params`` over the replicas, in one collective (nothing on one process)."""
        if self.distributed:
            all_reduce_mean_([p.grad for p in params if p.grad is not None])

    def averaging_local_clean(self, params: Iterable[Tensor]) -> Callable[[], None] | None:
        """What a plain step (an adaptive method's choice) must do when the clean gradient was kept local."""
        if self.syncs_clean or not self.distributed:
            return None
        return lambda: self.average_(params)

    def passes_(
        self,
        update: SAMUpdate,
        optimizer: Any,
        loss: Tensor,
        clean_backward: Callable[[], None],
        perturbed_pass: Callable[[], Tensor],
        plain_step_params: Iterable[Tensor] | None,
    ) -> None:
        """Run ``update``'s two passes in this context.

        ``plain_step_params``: what a plain step chosen by an adaptive method must average when the clean
        gradient was kept local (``None``: nothing to average).
        """
        update.passes_(
            optimizer,
            loss,
            clean_backward,
            perturbed_pass,
            lr=optimizer.param_groups[0]["lr"],
            any_rank=self.any_rank,
            loss_scale=self.loss_scale(),
            on_plain_step=None if plain_step_params is None else self.averaging_local_clean(plain_step_params),
        )

    def close_(self, update: SAMUpdate, optimizer: Any) -> bool:
        """``update.close_`` in this context: the skip decided over every replica, with the loss scale."""
        return update.close_(
            optimizer, any_rank=self.any_rank, scaler=self.scaler is not None, loss_scale=self.loss_scale()
        )
