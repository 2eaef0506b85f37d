"""``sam_step``: one SAM step for one optimizer, inside a module's own manual optimization.

For LightningModules that step their optimizers themselves (a GAN, actor-critic, a separate optimizer
for an embedding table): the same update as :class:`~lightning_sam.SAMLightningModule`'s
(:class:`~lightning_sam.core.update.SAMUpdate`: the same perturbation, freezing, finite check, skip and
restore), driven through ``manual_backward`` and ``LightningOptimizer.step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor

from lightning_sam._context import StepContext, check_step_arguments
from lightning_sam.core.update import SAMStepStats, SAMUpdate
from lightning_sam.methods import Method

__all__ = ["sam_step", "sam_step_stats"]

_STATE = "_lightning_sam_manual"  # the module's per-optimizer SAMUpdate objects
_STEP_KEY = "sam_steps"  # this optimizer's SAM-step count, kept in its first param group (so checkpointed)


def sam_step(
    module: pl.LightningModule,
    optimizer: LightningOptimizer,
    closure: Callable[[], Tensor],
    method: Method,
    *,
    sync_perturbation: bool = False,
) -> Tensor:
    """Run one SAM step of ``optimizer`` inside a manual-optimization ``training_step``.

    Zeroes ``optimizer``'s gradients, runs ``closure()`` (the loss at the current weights ``w``, no
    backward) and ``module.manual_backward`` on it, computes ``e`` for the parameters of this optimizer
    only (its param groups, their ``"rho"``), runs ``closure()`` again at ``w + e`` (the same
    random draws, buffers updated by the clean pass only, ``self.log`` silent, torchmetrics put back)
    with its backward, restores ``w`` bit for bit and steps the optimizer through Lightning
    (``LightningOptimizer.step``: AMP, ``global_step``, ``on_before_optimizer_step``).

    A non-finite loss or gradient skips this optimizer's update (weights, buffers and its state
    untouched); an exception in either pass leaves the weights as before, then propagates. Under DDP
    the clean backward does not all-reduce (each replica its own ``e``) unless ``sync_perturbation``.

    ``interval``, rho schedules and LookSAM's ``k`` count this optimizer's own steps, kept in its first
    param group (``"sam_steps"``) so that checkpoints carry them. Gradients the closures give to other
    optimizers' parameters add up twice (detach what another optimizer owns, as GAN code does).

    Args:
        module: the LightningModule, with ``automatic_optimization = False``.
        optimizer: one of ``module.optimizers()``.
        closure: returns the loss at the current weights; called twice.
        method: the perturbation rule (:class:`~lightning_sam.SAM`, ASAM, GSAM, LookSAM, ...); keep one
            object per optimizer (LookSAM and GSAM hold state).
        sync_perturbation: under DDP, ``e`` from the gradient averaged over replicas.

    Returns:
        The clean loss ``L(w)``, detached.

    Example::

        >>> import torch, lightning.pytorch as pl
        >>> from lightning_sam import SAM, sam_step
        >>> class TwoOptimizers(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.automatic_optimization = False
        ...         self.a, self.b, self.sam = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1), SAM(rho=0.05)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         opt_a, opt_b = self.optimizers()
        ...         loss = lambda: torch.nn.functional.mse_loss(self.b(self.a(x)), y)
        ...         sam_step(self, opt_a, loss, self.sam)                  # SAM on a
        ...         opt_b.zero_grad(); self.manual_backward(loss()); opt_b.step()   # plain on b
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(TwoOptimizers(), torch.utils.data.DataLoader(data, batch_size=8))
        >>> trainer.global_step                                            # 4 batches, 2 optimizers
        8
    """
    trainer = _check(module, optimizer, closure, method, sync_perturbation)
    raw = optimizer.optimizer
    index = next(i for i, o in enumerate(trainer.optimizers) if o is raw)
    update = _update_for(module, trainer, index, raw, method)
    strategy = trainer.strategy
    context = StepContext.of(trainer, method, sync_perturbation)
    group = raw.param_groups[0]
    with update.step_(int(group.get(_STEP_KEY, 0)), raw):
        raw.zero_grad(set_to_none=True)
        if not update.is_sam_step:
            loss = closure()
            update.note_loss(loss)
            module.manual_backward(loss)
        elif method.single_pass:  # Momentum-SAM, RWP: one pass, at w + e

            def forward_backward() -> Tensor:
                loss = closure()
                module.manual_backward(loss)
                return loss

            loss = update.single_pass_(raw, forward_backward, lr=group["lr"])
        else:

            def local() -> Any:  # the clean pass stays on this replica (each its own e) unless it is averaged
                parallel = isinstance(strategy, ParallelStrategy) and not context.syncs_clean
                return strategy.block_backward_sync() if parallel else nullcontext()

            update.begin_clean_()  # the perturbed pass draws the same random numbers, from the same buffers
            with local():
                loss = closure()

            def clean_backward() -> None:
                with local():
                    module.manual_backward(loss)

            def perturbed_pass() -> Tensor:
                with _silent_log(module):
                    perturbed_loss = closure()
                module.manual_backward(perturbed_loss)
                return perturbed_loss

            params = [p for g in raw.param_groups for p in g["params"]]
            context.passes_(update, raw, loss, clean_backward, perturbed_pass, plain_step_params=params)
        context.close_(update, raw)
        optimizer.step()
    group[_STEP_KEY] = int(group.get(_STEP_KEY, 0)) + 1
    return loss.detach()


def sam_step_stats(module: pl.LightningModule) -> dict[int, SAMStepStats]:
    """The figures of the last SAM step of each optimizer that :func:`sam_step` ran, by optimizer index."""
    updates: dict[int, tuple[Any, SAMUpdate, int]] = module.__dict__.get(_STATE, {})
    return {i: u.last for i, (_, u, _) in sorted(updates.items()) if u.last is not None}


def _check(module: Any, optimizer: Any, closure: Any, method: Any, sync_perturbation: Any) -> pl.Trainer:
    if not isinstance(module, pl.LightningModule):
        raise TypeError(f"Expected `module` to be a LightningModule, got {type(module).__name__}.")
    if module.automatic_optimization:
        raise ValueError(
            "`sam_step` is for manual optimization: set `self.automatic_optimization = False` in "
            f"`{type(module).__name__}.__init__`, or keep automatic optimization and use SAMLightningModule."
        )
    check_step_arguments(method, closure, sync_perturbation)
    trainer = module._trainer
    if trainer is None:
        raise RuntimeError("`sam_step` runs inside a Trainer's fit: call it from `training_step`.")
    if not isinstance(optimizer, LightningOptimizer) or all(o is not optimizer.optimizer for o in trainer.optimizers):
        raise TypeError(
            f"Expected `optimizer` to be one of `{type(module).__name__}.optimizers()`, got {type(optimizer).__name__}."
        )
    return trainer


def _update_for(module: Any, trainer: pl.Trainer, index: int, raw: torch.optim.Optimizer, method: Method) -> SAMUpdate:
    """The SAMUpdate of optimizer `index`, bound anew for each fit, each method object and each finder's trials.

    The Tuner's finders run their trial steps in the same fit with other limits (`max_steps`, ...), then
    put them back: the limits are part of the key, so the fit's own steps are planned by its own length,
    and the steps a finder's trials skipped do not count in the fit's `skipped_steps`.
    """
    updates: dict[int, tuple[Any, SAMUpdate, int]] = module.__dict__.setdefault(_STATE, {})
    limits = (trainer.max_steps, trainer.max_epochs, trainer.limit_train_batches, trainer.accumulate_grad_batches)
    key = (id(trainer), id(raw), id(method), limits)
    found = updates.get(index)
    if found is None or found[0] != key:
        update = SAMUpdate(method)
        if found is not None and found[1].method is method:
            same_fit = found[0][:3] == key[:3]  # only the limits changed: a finder's trials began or ended
            update.skipped_steps = found[2] if same_fit else found[1].skipped_steps
        total = trainer.estimated_stepping_batches  # batches: each optimizer steps once per batch at most
        unfrozen_later = any(isinstance(c, BaseFinetuning) for c in trainer.callbacks)
        update.bind_(module, raw, None if math.isinf(total) else int(total), unfrozen_later=unfrozen_later)
        updates[index] = (key, update, update.skipped_steps)
    return updates[index][1]


@contextmanager
def _silent_log(module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` (and ``log_dict``, which calls it) does nothing inside: logs count once per step."""
    shadowed = "log" in module.__dict__
    previous = module.__dict__.get("log")
    object.__setattr__(module, "log", lambda *args, **kwargs: None)
    try:
        yield
    finally:
        if shadowed:
            object.__setattr__(module, "log", previous)
        else:
            object.__delattr__(module, "log")
