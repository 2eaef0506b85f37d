"""SAM in a Lightning Fabric loop: one call per training step, on the same core as the mixin.

For a loop written with :class:`lightning.fabric.Fabric` (``fabric.setup``, ``fabric.backward``, Fabric's
precision and strategies). :func:`sam_step` runs both passes with ``fabric.backward`` (so Fabric's precision
plugin scales the losses, and its GradScaler skips a step with an inf), keeps the clean backward on each
replica under DDP (``fabric.no_backward_sync``) unless ``e`` is synchronized, and steps the optimizer that
``fabric.setup`` returned: the update of :class:`~lightning_sam.core.update.SAMUpdate`, with its freezing
of BatchNorm statistics in the perturbed pass, its finite check and skip, and its exact restore.

What a step counts (``interval``, rho schedules, LookSAM's ``k``) is kept in the optimizer's first param
group (``"sam_steps"``), so a checkpoint of the optimizer carries it. The method's own state (LookSAM's
direction, GSAM's and F-SAM's statistics) goes beside it: ``fabric.save(path, {"model": model, "optimizer":
optimizer, "sam": method.state_dict()})`` (Fabric takes no frozen dataclass such as the method itself), and
after ``fabric.load`` ``method.load_state_dict(state["sam"])``: the run then goes on as if never stopped.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.fabric.wrappers import is_wrapped
from torch import Tensor

from lightning_sam._compat import active_scaler
from lightning_sam._context import StepContext, check_step_arguments
from lightning_sam.core.update import SAMStepStats, SAMUpdate
from lightning_sam.methods import Method

__all__ = ["sam_step", "sam_step_stats", "skipped_steps"]

_STEP_KEY = "sam_steps"  # the optimizer's SAM-step count, in its first param group (so checkpointed)
#: each optimizer's update: the key it was bound with, and the SAMUpdate
_UPDATES: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[tuple[int, int, int | None], SAMUpdate]] = (
    weakref.WeakKeyDictionary()
)


def sam_step(
    fabric: Fabric,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    closure: Callable[[], Tensor],
    method: Method,
    *,
    sync_perturbation: bool = False,
    total_steps: int | None = None,
) -> Tensor:
    """Run one SAM step of ``optimizer`` in a Fabric training loop; returns the clean loss ``L(w)``, detached.

    Zeroes the optimizer's gradients, runs ``closure()`` (the loss at the current weights ``w``; no
    backward) and ``fabric.backward`` on it, computes ``e`` for the parameters of ``optimizer`` (its param
    groups, their ``"rho"``; ``method.only``), runs ``closure()`` again at ``w + e`` (the same random
    draws, buffers updated by the clean pass only) with its backward, restores ``w`` bit for bit and
    calls ``optimizer.step()`` (Fabric's
    precision: the GradScaler unscales, skips on inf and updates its scale). Single-pass methods
    (:class:`~lightning_sam.MomentumSAM`, :class:`~lightning_sam.RWP`) run ``closure`` once, at ``w + e``.

    A non-finite loss or gradient on any replica skips the update (weights, buffers and optimizer state
    untouched; under a GradScaler its scale is lowered as for any inf); an exception in either pass or in
    the optimizer step leaves the weights as before, then propagates. Under DDP the clean backward does
    not all-reduce (each replica its own ``e``, as in the paper's m-sharpness) unless ``sync_perturbation``.
    One call is one optimizer step: accumulate by giving the closure a larger batch.

    Args:
        fabric: the :class:`~lightning.fabric.Fabric` that set up ``model`` and ``optimizer``.
        model: the module ``fabric.setup`` returned.
        optimizer: the optimizer ``fabric.setup`` returned (one call per optimizer per step).
        closure: returns the loss at the current weights (calls ``model``); called twice.
        method: the perturbation rule (:class:`~lightning_sam.SAM`, ``ASAM``, ``GSAM``, ...); keep one
            object per optimizer for the whole run (LookSAM and GSAM hold state).
        sync_perturbation: under DDP, ``e`` from the gradient averaged over replicas.
        total_steps: the run's optimizer steps, for methods that plan by it (``LatePhaseSAM(start=0.5)``).

    Example::

        >>> import torch
        >>> from lightning.fabric import Fabric
        >>> from lightning_sam import SAM
        >>> from lightning_sam.fabric import sam_step, sam_step_stats
        >>> fabric = Fabric(accelerator="cpu", devices=1)
        >>> net = torch.nn.Linear(4, 1)
        >>> model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
        >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
        >>> method = SAM(rho=0.05)
        >>> for _ in range(3):
        ...     loss = sam_step(fabric, model, optimizer, lambda: torch.nn.functional.mse_loss(model(x), y), method)
        >>> round(sam_step_stats(optimizer).eps_norm.item(), 4)
        0.05
    """
    raw = _check(fabric, model, optimizer, closure, method, sync_perturbation, total_steps)
    strategy = fabric.strategy
    update = _update_for(model, raw, method, total_steps)
    distributed = isinstance(strategy, DDPStrategy) and fabric.world_size > 1
    context = StepContext(
        any_rank=lambda flag: strategy.reduce_boolean_decision(flag, all=False),
        scaler=active_scaler(strategy.precision),
        syncs_clean=sync_perturbation or method.uses_clean_gradient,
        distributed=distributed,
    )
    group = raw.param_groups[0]
    count = int(group.get(_STEP_KEY, 0))

    def backward(loss: Tensor) -> None:
        fabric.backward(loss, model=model)

    def stepped(*_: Any) -> None:  # the optimizer stepped: an exception after it (a callback) undoes nothing
        update.end_()
        group[_STEP_KEY] = count + 1

    handle = raw.register_step_post_hook(stepped)
    try:
        loss = _passes(fabric, model, raw, optimizer, closure, method, update, context, count, backward)
    finally:
        handle.remove()
    group[_STEP_KEY] = count + 1  # also when the GradScaler skipped the optimizer's step
    return loss.detach()


def _passes(
    fabric: Fabric,
    model: Any,
    raw: torch.optim.Optimizer,
    optimizer: Any,
    closure: Callable[[], Tensor],
    method: Method,
    update: SAMUpdate,
    context: StepContext,
    count: int,
    backward: Callable[[Tensor], None],
) -> Tensor:
    """The passes, the finite check and the optimizer step of one update (an exception puts ``w`` back)."""
    group = raw.param_groups[0]
    with update.step_(count, raw):
        raw.zero_grad(set_to_none=True)
        if not update.is_sam_step:
            loss = closure()
            update.note_loss(loss)
            backward(loss)
        elif method.single_pass:

            def forward_backward() -> Tensor:
                loss = closure()
                backward(loss)
                return loss

            loss = update.single_pass_(raw, forward_backward, lr=group["lr"])
        else:

            def local() -> Any:  # DDP reads its sync flag at forward time: the clean forward goes inside too
                keep_local = context.distributed and not context.syncs_clean
                return fabric.no_backward_sync(model, enabled=True) if keep_local else nullcontext()

            # the perturbed pass draws the same random numbers, from the buffers the clean forward starts from:
            # noted inside the forward, after DDP broadcast rank 0's (the perturbed forward does not broadcast)
            update.begin_clean_(buffers=False)
            noted: list[bool] = []

            def note_buffers(*_: Any) -> None:
                if not noted:
                    noted.append(True)
                    update.begin_clean_forward_()

            hook = model.module.register_forward_pre_hook(note_buffers)
            try:
                with local():
                    loss = closure()
            finally:
                hook.remove()

            def clean_backward() -> None:
                with local():
                    backward(loss)

            def perturbed_pass() -> Tensor:
                perturbed_loss = closure()
                backward(perturbed_loss)
                return perturbed_loss

            params = [p for g in raw.param_groups for p in g["params"]]
            context.passes_(update, raw, loss, clean_backward, perturbed_pass, plain_step_params=params)
        context.close_(update, raw)
        optimizer.step()
    return loss


def sam_step_stats(optimizer: torch.optim.Optimizer) -> SAMStepStats | None:
    """The figures of the last SAM step :func:`sam_step` ran with ``optimizer`` (``None`` before the first)."""
    found = _UPDATES.get(_raw(optimizer))
    return None if found is None else found[1].last


def skipped_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many of ``optimizer``'s updates :func:`sam_step` skipped for a non-finite loss or gradient."""
    found = _UPDATES.get(_raw(optimizer))
    return 0 if found is None else found[1].skipped_steps


def _raw(optimizer: Any) -> Any:
    return optimizer.optimizer if is_wrapped(optimizer) else optimizer


def _update_for(model: Any, raw: torch.optim.Optimizer, method: Method, total_steps: int | None) -> SAMUpdate:
    """``raw``'s SAMUpdate, bound anew when the model, the method object or the run's length changes."""
    key = (id(model), id(method), total_steps)
    found = _UPDATES.get(raw)
    if found is None or found[0] != key:
        update = SAMUpdate(method)
        if found is not None and found[1].method is method:
            update.skipped_steps = found[1].skipped_steps
        update.bind_(model.module, raw, total_steps)
        _UPDATES[raw] = (key, update)
    return _UPDATES[raw][1]


def _check(
    fabric: Any,
    model: Any,
    optimizer: Any,
    closure: Any,
    method: Any,
    sync_perturbation: Any,
    total_steps: Any,
) -> torch.optim.Optimizer:
    if not isinstance(fabric, Fabric):
        raise TypeError(f"Expected `fabric` to be a lightning.fabric.Fabric, got {type(fabric).__name__}.")
    if not (isinstance(model, torch.nn.Module) and is_wrapped(model)):
        raise TypeError(
            f"Expected `model` to be the module `fabric.setup` returned, got {type(model).__name__}: "
            "`model, optimizer = fabric.setup(model, optimizer)`."
        )
    if not (isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and is_wrapped(optimizer)):
        raise TypeError(
            f"Expected `optimizer` to be the optimizer `fabric.setup` returned, got {type(optimizer).__name__}: "
            "`model, optimizer = fabric.setup(model, optimizer)`."
        )
    check_step_arguments(method, closure, sync_perturbation)
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)):
        raise TypeError(f"Expected `total_steps` to be a positive int or None, got {total_steps!r}.")
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"Expected `total_steps` to be a positive int or None, got {total_steps}.")
    strategy = fabric.strategy
    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            "lightning_sam.fabric.sam_step cannot run under FSDPStrategy (FSDP v1): its flattened shards hide the "
            "global gradient norm that e needs. Use FSDP2: `ModelParallelStrategy` with `fully_shard`."
        )
    if isinstance(strategy, DeepSpeedStrategy):
        raise ValueError(
            "lightning_sam.fabric.sam_step cannot run under DeepSpeedStrategy: it runs the optimizer step inside "
            "its own engine, where the two SAM passes cannot be placed. Use DDP (`strategy='ddp'`) or FSDP2."
        )
    if isinstance(strategy, ModelParallelStrategy) and not sync_perturbation:
        raise ValueError(
            "Under ModelParallelStrategy (FSDP2) every backward reduce-scatters the gradients, so e can only come "
            "from the gradient averaged over replicas: pass `sync_perturbation=True`."
        )
    if getattr(strategy, "_ddp_kwargs", {}).get("static_graph") and not sync_perturbation:
        raise ValueError(
            "`DDPStrategy(static_graph=True)` cannot skip the all-reduce of SAM's ascent backward (each replica its "
            "own e). Drop `static_graph=True`, or pass `sync_perturbation=True` (one e from the averaged gradient)."
        )
    return optimizer.optimizer
