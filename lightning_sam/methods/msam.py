"""Momentum-SAM (Becker et al.): SAM's ascent along the optimizer's momentum, one forward/backward a step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from typing_extensions import override

from lightning_sam.core.groups import Ascent, ParamGroup
from lightning_sam.core.tensors import global_norm, norm_of_norms
from lightning_sam.methods.base import NORM_EPS, Method

__all__ = ["MomentumSAM"]

#: where torch's optimizers keep their momentum (SGD) or first moment (Adam, AdamW, NAdam, RAdam, Adamax)
_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


@dataclass(frozen=True, repr=False, eq=False)
class MomentumSAM(Method):
    """Momentum-SAM (MSAM, Becker et al., "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead").

    One forward/backward a step: the gradient is taken at ``w + e`` with ``e = -rho * v / ||v||``, ``v``
    the base optimizer's momentum (SGD's ``momentum_buffer``; the first moment ``exp_avg`` of Adam and
    AdamW), one global norm; ``w`` is restored and the optimizer steps as usual. Between steps (so for
    validation, checkpoints, EMA/SWA and logging) the module holds ``w``, not ``w + e`` as the official
    code does. With ``weight_decay=0`` the trajectory is the official algorithm's; with weight decay, the
    decay and the step are taken at ``w`` (the official code takes the decay at ``w + e``). The first
    step, before the optimizer has a momentum, is a plain step. rho is read once per step, so a rho
    schedule never moves ``w`` (the official code shifts ``w`` when rho changes between steps).

    Under DDP the momentum is the same on every replica (it follows the averaged gradient), so ``e`` is
    too, with no extra all-reduce.

    Args:
        rho: the radius, a finite non-negative float. The paper's default is 3 (much larger than SAM's,
            since ``v`` is not the current gradient), with rho 0 during a learning-rate warm-up on ViTs.
        **options: ``interval``, ``rho_schedule``, ``only``, as for :class:`SAM`.

    Example::

        >>> MomentumSAM(rho=3.0)
        MomentumSAM(rho=3.0)
    """

    rho: float = 3.0

    name = "msam"
    single_pass = True

    @override
    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer that keeps a momentum: SGD with ``momentum > 0``, or one with a first moment (``betas``)."""
        for i, group in enumerate(optimizer.param_groups):
            if isinstance(optimizer, torch.optim.SGD) and not group.get("momentum"):
                raise ValueError(
                    f"MomentumSAM perturbs along the optimizer's momentum, but param_groups[{i}] of SGD has "
                    f"`momentum` {group.get('momentum')}. Give SGD a momentum (0.9), or use SAM."
                )
            if not isinstance(optimizer, torch.optim.SGD) and "betas" not in group:
                raise ValueError(
                    f"MomentumSAM perturbs along the optimizer's momentum: expected SGD with momentum or an "
                    f"optimizer with a first moment (Adam, AdamW), got {type(optimizer).__name__}."
                )

    @torch.no_grad()
    @override
    def perturbation_(
        self, groups: Sequence[ParamGroup], optimizer: torch.optim.Optimizer, step: int
    ) -> tuple[list[ParamGroup], Ascent] | None:
        """``e = -rho * v / ||v||`` per group's rho, over the parameters that have a momentum already."""
        found = []
        for group in groups:
            pairs = [(p, _momentum(optimizer, p)) for p in group.params]
            pairs = [(p, v) for p, v in pairs if v is not None]
            if pairs:
                found.append(ParamGroup(group.rho, [p for p, _ in pairs], [v for _, v in pairs]))
        if not found:
            return None  # the first step: no momentum yet
        norms = [global_norm(g.grads) for g in found]
        norm = norm_of_norms(norms)
        inv = -1.0 / (norm + NORM_EPS)  # against the momentum: the direction the loss rises along
        scales = [inv * g.rho for g in found]
        return found, Ascent(norm, norm_of_norms([n * s.abs() for n, s in zip(norms, scales)]), scales)


def _momentum(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor | None:
    state = optimizer.state.get(p)
    if not state:
        return None
    for key in _MOMENTUM_KEYS:
        if state.get(key) is not None:
            return state[key]
    return None
