"""SAM (Foret et al., ICLR 2021): ``e(w) = rho * g / ||g||``, one global norm over every parameter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from typing_extensions import override

from lightning_sam.core.groups import Ascent, ParamGroup
from lightning_sam.core.tensors import global_norm, norm_of_norms
from lightning_sam.methods.base import NORM_EPS, Method

__all__ = ["SAM"]


@dataclass(frozen=True, repr=False, eq=False)
class SAM(Method):
    """Sharpness-Aware Minimization: ``e(w) = rho * g / ||g||``.

    Args:
        rho: the radius of the neighbourhood, a finite non-negative float (the paper uses 0.05 on
            CIFAR-10 and 0.1 on CIFAR-100). A param group of the optimizer may override it with
            its own ``"rho"`` key; a group with rho 0 is not perturbed.
        interval: perturb on every ``interval``-th optimizer step only, with plain steps (one
            forward/backward) between (MosaicML Composer's ``interval``); 1: every step.
        rho_schedule: how rho changes over training (:class:`RhoSchedule`); ``None``: constant.
        only: perturb a subset of the parameters, ``"normalization"`` (the weights and biases of
            normalization layers, "SAM-ON", Mueller et al. 2023) or a regular expression searched
            in parameter names; ``None``: all. The norm ``||g||`` runs over the perturbed
            parameters.

    Example::

        >>> SAM(rho=0.05)
        SAM(rho=0.05)
        >>> SAM(rho=0.1, interval=10, only="normalization")
        SAM(rho=0.1, interval=10, only='normalization')
    """

    rho: float = 0.05

    name = "sam"

    @override
    @torch.no_grad()
    def ascent_(self, groups: Sequence[ParamGroup]) -> Ascent:
        """``e = rho * g / ||g||``: the direction is ``g`` itself; the scale of group ``j`` is ``rho_j / ||g||``."""
        groups = [g for g in groups if g.grads]
        group_norms = [global_norm(g.grads) for g in groups]
        grad_norm = norm_of_norms(group_norms)
        inv = 1.0 / (grad_norm + NORM_EPS)
        scales = [inv * g.rho for g in groups]
        return Ascent(grad_norm, norm_of_norms([n * s for n, s in zip(group_norms, scales)]), scales)
