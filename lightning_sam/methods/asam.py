"""ASAM (Kwon et al., ICML 2021): ``e(w) = rho * T^2 g / ||T g||`` with ``T = |w| + eta`` elementwise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from typing_extensions import override

from lightning_sam.core.groups import Ascent, ParamGroup, check_non_negative
from lightning_sam.core.tensors import global_norm, local, norm_of_norms
from lightning_sam.methods.base import NORM_EPS
from lightning_sam.methods.sam import SAM

__all__ = ["ASAM"]


@dataclass(frozen=True, repr=False, eq=False)
class ASAM(SAM):
    """Adaptive SAM (Kwon et al., ICML 2021): ``e(w) = rho * T^2 g / ||T g||`` with ``T = |w| + eta``.

    The neighbourhood is scaled by the weights, which makes sharpness invariant to rescaling a
    layer's weights. ``eta = 0`` is the ``adaptive=True`` mode of davda54/sam.

    Args:
        rho: the radius in the scaled space, a finite non-negative float (the paper uses 0.5 to 2.0,
            about ten times SAM's rho).
        eta: keeps ``T`` positive for zero weights, a finite non-negative float.
        **options: ``interval``, ``rho_schedule``, ``only``, as for :class:`SAM`.

    Example::

        >>> ASAM(rho=0.5, eta=0.01)
        ASAM(rho=0.5, eta=0.01)
    """

    rho: float = 0.5
    eta: float = 0.01

    name = "asam"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("eta", check_non_negative("eta", self.eta))

    @override
    @torch.no_grad()
    def ascent_(self, groups: Sequence[ParamGroup]) -> Ascent:
        """Write ``T^2 g`` into the gradients and return the scales ``rho / ||T g||``."""
        groups = [g for g in groups if g.grads]
        # T = |w| + eta: one temporary the size of the perturbed weights, freed on return
        scalings = [torch._foreach_abs(local(g.params)) for g in groups]
        for group, t in zip(groups, scalings):
            torch._foreach_add_(t, self.eta)
            torch._foreach_mul_(local(group.grads), t)  # g <- T g
        grad_norm = norm_of_norms([global_norm(g.grads) for g in groups])
        for group, t in zip(groups, scalings):
            torch._foreach_mul_(local(group.grads), t)  # g <- T^2 g
        inv = 1.0 / (grad_norm + NORM_EPS)
        scales = [inv * g.rho for g in groups]  # e = rho * T^2 g / ||T g||
        eps_norm = norm_of_norms([global_norm(g.grads) * s for g, s in zip(groups, scales)])
        return Ascent(grad_norm, eps_norm, scales)
