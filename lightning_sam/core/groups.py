"""The tensors of a param group as the SAM step sees them, what a method's ascent returns, and argument checks.

Pure torch (no Lightning import).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Ascent", "ParamGroup", "check_int", "check_non_negative", "check_param_groups", "group_rho"]


class ParamGroup(NamedTuple):
    """The tensors of one optimizer param group that have a gradient in this step.

    Attributes:
        rho: the radius of this group's perturbation (``0`` leaves the group unperturbed).
        params: the weights ``w``.
        grads: their gradients ``g``, index for index.
    """

    rho: float
    params: list[Tensor]
    grads: list[Tensor]


class Ascent(NamedTuple):
    """What a method's ``ascent_`` found: ``e = scales[j] * grads`` of group ``j`` (0-dim tensors, no host sync)."""

    grad_norm: Tensor
    """||g|| (for ASAM: ||T g||)."""
    eps_norm: Tensor
    """||e||."""
    scales: list[Tensor]
    """One per group (groups without gradients are left out)."""


def check_non_negative(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite, non-negative real number, else raise.

    Example::

        >>> check_non_negative("rho", 0.05)
        0.05
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a non-negative float, got {value!r} of type {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Expected `{name}` to be a finite, non-negative float, got {value!r}.")
    return float(value)


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) ``>= minimum``, else raise.

    Example::

        >>> check_int("k", 5, 1)
        5
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int >= {minimum}, got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}, got {value}.")
    return value


def _rho_key(optimizer: torch.optim.Optimizer, group: dict) -> str | None:
    """The key of ``group`` that holds its SAM radius, if any (see :func:`group_rho`)."""
    if "sam_rho" in group:
        return "sam_rho"
    if "rho" in group and "rho" not in optimizer.defaults:
        return "rho"
    return None


def group_rho(optimizer: torch.optim.Optimizer, group: dict, default: float) -> float:
    """A param group's own SAM radius: its ``"sam_rho"``, else its ``"rho"``, else ``default``.

    ``"rho"`` counts only where the optimizer has no ``rho`` of its own (Adadelta's is a decay rate):
    such an optimizer's groups take ``"sam_rho"``.

    Example::

        >>> w = torch.zeros(1, requires_grad=True)
        >>> group_rho(torch.optim.SGD([{"params": [w], "rho": 0.1}], lr=0.1), {"rho": 0.1}, 0.05)
        0.1
        >>> adadelta = torch.optim.Adadelta([w])
        >>> group_rho(adadelta, adadelta.param_groups[0], 0.05)   # Adadelta's rho=0.9 is not SAM's
        0.05
    """
    key = _rho_key(optimizer, group)
    return group[key] if key is not None else default


def check_param_groups(optimizer: torch.optim.Optimizer) -> None:
    """Raise if a param group carries an invalid SAM radius (``"sam_rho"``, or ``"rho"``: see :func:`group_rho`)."""
    for i, group in enumerate(optimizer.param_groups):
        key = _rho_key(optimizer, group)
        if key is not None:
            check_non_negative(f"param_groups[{i}][{key!r}]", group[key])
