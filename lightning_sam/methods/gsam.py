"""GSAM (Zhuang et al., ICLR 2022): SAM's ascent; the descent also shrinks the surrogate gap."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from typing_extensions import override

from lightning_sam.core.groups import check_non_negative
from lightning_sam.core.tensors import global_dot, global_norm, local
from lightning_sam.methods.base import NORM_EPS
from lightning_sam.methods.sam import SAM

__all__ = ["GSAM"]


@dataclass(frozen=True, repr=False, eq=False)
class GSAM(SAM):
    """Surrogate gap guided SAM (Zhuang et al., ICLR 2022).

    The ascent is SAM's. The descent follows the perturbed gradient ``g_p`` minus ``alpha`` times the
    part of the clean gradient ``g`` orthogonal to it, which also shrinks the surrogate gap
    ``L(w + e) - L(w)``::

        d = g_p - alpha * (g - (g . g_p / ||g_p||^2) g_p)

    ``alpha = 0`` is SAM. The paper ties rho to the learning rate:
    ``GSAM(rho=0.05, alpha=0.1, rho_schedule=RhoSchedule("lr", rho_min=0.01, lr_max=0.1))``.
    GSAM keeps a copy of the clean gradient: one more parameter-sized buffer than SAM.

    Args:
        rho: SAM's radius (``rho_max`` when scheduled).
        alpha: the weight of the ascent along the orthogonal component, finite and non-negative.
        **options: ``interval``, ``rho_schedule``, ``only``, as for :class:`SAM`.

    Example::

        >>> GSAM(rho=0.05, alpha=0.1)
        GSAM(rho=0.05, alpha=0.1)
    """

    alpha: float = 0.1

    name = "gsam"
    uses_clean_gradient = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("alpha", check_non_negative("alpha", self.alpha))

    @override
    @torch.no_grad()
    def descent_(self, params: Sequence[Tensor]) -> None:
        """``g_p <- g_p - alpha * g_perp``, written as ``(1 + alpha c) g_p - alpha g``, c = g.g_p / ||g_p||^2.

        On whole-model vectors: a parameter missing from one pass counts as 0 there, so one with a
        clean gradient only descends along ``-alpha g``.
        """
        if self.alpha == 0:
            return
        clean_params, clean_grads = self.state.clean_params, self.state.clean or []
        clean = dict(zip(map(id, clean_params), clean_grads))
        perturbed = [p for p in params if p.grad is not None]
        both = [(clean[id(p)], p.grad) for p in perturbed if id(p) in clean]
        g_p = [p.grad for p in perturbed]
        c = global_dot([g for g, _ in both], [gp for _, gp in both]) / (global_norm(g_p).square() + NORM_EPS)
        if g_p:
            torch._foreach_mul_(local(g_p), 1.0 + self.alpha * c)
        if both:
            torch._foreach_add_(local([gp for _, gp in both]), local([g for g, _ in both]), alpha=-self.alpha)
        reached = {id(p) for p in perturbed}
        for p, g in zip(clean_params, clean_grads):
            if id(p) not in reached:  # g_p = 0 here: d = -alpha g
                p.grad = g * -self.alpha
