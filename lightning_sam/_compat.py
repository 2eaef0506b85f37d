"""Every access to a private name of Lightning, torch or torchmetrics, gathered in one place.

Checked against the supported range, both ends tested in CI: lightning 2.4.0 and 2.6.6 (2.5.6 by
hand), torch 2.4.1 and 2.13.0, torchmetrics 1.1.2 and 1.9.0. Each function says what it relies on;
``tests/test_compat.py`` pins each of them down, so an upgrade that breaks one fails there first.
torch's ``torch._foreach_*`` kernels are used throughout the package as the documented fast path for
lists of tensors (``torch.optim`` uses them the same way) and are not repeated here; ``core/tensors.py``
imports DTensor from its private path on torch 2.4 (public from 2.5).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "active_scaler",
    "flag_non_finite_",
    "grad_sync",
    "loss_scale",
    "metric_counters",
    "set_metric_counters",
    "should_update_logs",
    "tensor_version",
]


def should_update_logs(trainer: Any) -> bool:
    """Whether the Trainer hands step metrics to its loggers now (``log_every_n_steps``).

    Lightning keeps this decision on its private logger connector.
    """
    return bool(trainer._logger_connector.should_update_logs)


def active_scaler(precision_plugin: Any) -> Any:
    """The precision plugin's GradScaler if it scales losses, else ``None``.

    A scaler built with ``enabled=False`` (or what some builds hand a CPU ``16-mixed`` run) neither scales
    nor skips steps on inf/NaN: it counts as none (public ``GradScaler.is_enabled``).
    """
    scaler = getattr(precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def loss_scale(scaler: Any) -> Tensor | float:
    """A GradScaler's current scale, without a host sync (``GradScaler._get_scale_async``).

    The scaler makes its scale tensor at its first ``scale()``; before that (the run's first step, asked
    before the clean backward), the scale it is about to use: its initial one (public ``get_scale``, no sync then).
    """
    scale = scaler._get_scale_async()
    return scaler.get_scale() if scale is None else scale


def tensor_version(tensor: Tensor) -> int:
    """How many times ``tensor`` was written in place (``Tensor._version``, autograd's counter)."""
    return tensor._version


def flag_non_finite_(tensors: list[Tensor], found: Tensor, one: Tensor) -> None:
    """Set ``found`` (a float 0-dim tensor) to 1 if any of ``tensors`` holds an inf or a NaN.

    torch's fused check behind ``GradScaler.unscale_`` (``torch._amp_foreach_non_finite_check_and_unscale_``),
    one kernel launch for the list, with the unscaling factor ``one`` (a tensor holding 1.0), which leaves
    every value bit for bit as it is. The tensors must be strided and on ``found``'s device.
    """
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)


def metric_counters(metric: Any) -> tuple[int, Any]:
    """What a torchmetrics ``Metric`` counts besides its states: its update count and cached result."""
    return metric._update_count, metric._computed


def set_metric_counters(metric: Any, counters: tuple[int, Any]) -> None:
    """Put back what :func:`metric_counters` returned."""
    metric._update_count, metric._computed = counters


@contextmanager
def grad_sync(model: Any, enabled: bool) -> Iterator[None]:
    """Switch DistributedDataParallel's gradient all-reduce on or off for the forward/backward inside.

    ``DistributedDataParallel.no_sync`` only switches it off; the SAM step needs it on again for the
    perturbed pass of the last micro-batch, which Lightning runs inside its own ``no_sync`` when
    accumulating. Both read the public attribute ``require_backward_grad_sync`` at forward time.
    Models that are not DDP are left alone (FSDP2 reduce-scatters in every backward).
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        yield
        return
    previous = model.require_backward_grad_sync
    model.require_backward_grad_sync = enabled
    try:
        yield
    finally:
        model.require_backward_grad_sync = previous
