"""Friendly SAM (F-SAM, Li et al., CVPR 2024): the ascent without the full-gradient component."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_sam.core.groups import Ascent, ParamGroup, check_non_negative
from lightning_sam.core.tensors import local
from lightning_sam.methods.base import Method
from lightning_sam.methods.sam import SAM
from lightning_sam.methods.state import ParameterState

__all__ = ["FriendlySAM"]


@dataclass(frozen=True, repr=False, eq=False)
class FriendlySAM(SAM):
    """Friendly SAM (F-SAM, Li et al., CVPR 2024): the ascent without the full-gradient component.

    The full gradient is estimated by an exponential moving average of the batch gradients,
    ``m <- lam * m + (1 - lam) * g``; the ascent follows ``d = g - sigma * m``:
    ``e = rho * d / ||d||``. ``sigma = 0`` is SAM. ``m`` (one more parameter-sized buffer) is kept per
    parameter and saved in checkpoints, so a resumed run continues exactly.

    Args:
        rho: SAM's radius.
        sigma: how much of the estimated full gradient is removed, finite and non-negative (the paper: 1).
        lam: the decay of the moving average, in ``[0, 1)`` (the paper: 0.9 or higher; here 0.9).
        **options: ``interval``, ``rho_schedule``, ``only``, as for :class:`SAM`.

    Example::

        >>> FriendlySAM(rho=0.05, sigma=1.0, lam=0.9)
        FriendlySAM(rho=0.05, sigma=1.0, lam=0.9)
    """

    sigma: float = 1.0
    lam: float = 0.9

    name = "fsam"

    class State(Method.State):
        """SAM's, and ``m`` per parameter."""

        def __init__(self) -> None:
            super().__init__()
            self.m = ParameterState("FriendlySAM")  # the moving average of the gradient, per parameter

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("sigma", check_non_negative("sigma", self.sigma))
        lam = check_non_negative("lam", self.lam)
        if lam >= 1:
            raise ValueError(f"Expected `lam` to be a float in [0, 1), got {lam!r}.")
        self._set("lam", lam)

    @override
    def bind_(self, params: Sequence[Tensor]) -> None:
        self.state.m.bind_(params)

    @override
    @torch.no_grad()
    def ascent_(self, groups: Sequence[ParamGroup]) -> Ascent:
        """``m <- lam m + (1 - lam) g``; ``g <- g - sigma m`` (the direction ``d``); then SAM's ascent along ``d``."""
        stored = self.state.m.lookup()
        params = [p for g in groups for p in g.params]
        grads = [d for g in groups for d in g.grads]
        for p, grad in zip(params, grads):
            if id(p) not in stored:  # m starts at 0
                stored[id(p)] = torch.zeros_like(grad)
        ms = [stored[id(p)] for p in params]
        if ms:
            torch._foreach_mul_(local(ms), self.lam)
            torch._foreach_add_(local(ms), local(grads), alpha=1 - self.lam)
            if self.sigma:
                torch._foreach_add_(local(grads), local(ms), alpha=-self.sigma)  # d = g - sigma m
        owners = {id(p): p for p in [*self.state.m.params, *params]}
        self.state.m.set_([owners[i] for i in stored], list(stored.values()))
        return super().ascent_(groups)

    @override
    def skip_(self) -> None:
        """Drop ``m``, which may hold the non-finite gradient of a skipped step; it starts again from 0."""
        self.state.m.reset_()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"m": self.state.m.to_checkpoint()}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.m.load_(state.get("m"))
