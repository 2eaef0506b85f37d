"""Random weight perturbation (RWP, Li et al., TMLR 2024): the gradient at a random nearby point, one pass a step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_sam.core.groups import Ascent, ParamGroup, check_int, check_non_negative
from lightning_sam.core.tensors import global_norm, local
from lightning_sam.methods.base import Method
from lightning_sam.methods.state import ParameterState

__all__ = ["RWP"]


@dataclass(frozen=True, repr=False, eq=False)
class RWP(Method):
    """Random weight perturbation (RWP and its adaptive form ARWP; Li et al., TMLR 2024, code nblt/mARWP).

    One forward/backward a step, at ``w + e`` with filter-wise Gaussian noise: for a weight of two or
    more dimensions each output filter ``j`` (row ``w_j``) gets ``e_j ~ N(0, sigma^2 ||w_j||^2)``; a 1-D
    parameter gets ``N(0, sigma^2 ||w||^2)``. ``w`` is restored and the optimizer steps with the gradient
    at ``w + e``. With ``eta > 0`` (ARWP) the noise is divided by ``sqrt(1 + eta F_j)``, ``F`` a moving sum
    of squared gradients (``F <- beta F + g^2``, summed over each filter), which shrinks the noise along
    directions of high curvature; ``F`` is saved in checkpoints.

    The authors increase sigma along a cosine over the run (their ``CosineInc``, by a factor ``1 + inc``):
    ``rho_schedule=RhoSchedule("cosine", total_steps=T, rho_min=sigma * (1 + inc))`` is exactly that (a
    ``rho_min`` above the method's radius makes the cosine rise).

    The noise of step ``t`` is drawn from a generator seeded with ``(seed, t)``, so a resumed run draws the
    same noise. ``seed=None`` takes the process's torch seed when training starts (the one
    ``seed_everything`` set): under DDP every replica then draws the same noise, so the gradients they
    average are taken at one perturbed point, as on a single device with the global batch.

    Args:
        sigma: the noise's scale relative to each filter's norm, finite and non-negative (the authors:
            0.01 to 0.015 for ResNets on CIFAR).
        eta: the adaptive form's weight of ``F``; 0 is plain RWP.
        beta: the decay of ``F``'s moving sum, in ``[0, 1)`` (the authors: 0.99 with eta 0.1).
        seed: seeds the noise; ``None``: the torch seed when training starts.
        **options: ``interval``, ``rho_schedule`` (sigma's), ``only``, as for :class:`SAM`.

    Example::

        >>> RWP(sigma=0.01)
        RWP(sigma=0.01, eta=0.0, beta=0.99, seed=None)
    """

    sigma: float = 0.01
    eta: float = 0.0
    beta: float = 0.99
    seed: int | None = None

    name = "rwp"
    radius_name = "sigma"
    single_pass = True
    descent_unscales = True

    class State(Method.State):
        """The moving sum ``F`` of squared gradients per parameter (ARWP), and the seed in use."""

        def __init__(self) -> None:
            super().__init__()
            self.fisher = ParameterState("RWP")
            self.seed: int | None = None

    @override
    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("eta", check_non_negative("eta", self.eta))
        beta = check_non_negative("beta", self.beta)
        if beta >= 1:
            raise ValueError(f"Expected `beta` to be a float in [0, 1), got {beta!r}.")
        self._set("beta", beta)
        if self.seed is not None:
            check_int("seed", self.seed, 0)

    @override
    def bind_(self, params: Sequence[Tensor]) -> None:
        self.state.fisher.bind_(params)
        if self.state.seed is None:
            self.state.seed = self.seed if self.seed is not None else int(torch.initial_seed()) % 2**62

    @torch.no_grad()
    @override
    def perturbation_(
        self, groups: Sequence[ParamGroup], optimizer: torch.optim.Optimizer, step: int
    ) -> tuple[list[ParamGroup], Ascent] | None:
        """Filter-wise Gaussian noise with std ``sigma * ||w_j||`` (divided by ``sqrt(1 + eta F_j)`` for ARWP)."""
        seed = self.state.seed if self.state.seed is not None else self.seed or 0
        fisher = self.state.fisher.lookup() if self.eta else {}
        found = []
        generators: dict[torch.device, torch.Generator] = {}
        for group in groups:
            if group.rho <= 0 or not group.params:
                continue
            noise = []
            for p in group.params:
                w = local([p])[0]
                generator = generators.get(w.device)
                if generator is None:
                    generator = generators[w.device] = torch.Generator(device=w.device)
                    generator.manual_seed((seed * 1_000_003 + step) % 2**62)
                e = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
                e.mul_(group.rho * _filter_norms(w))
                f = fisher.get(id(p))
                if f is not None:
                    e.div_(torch.sqrt(1 + self.eta * _filter_sums(local([f])[0])))
                noise.append(e)
            found.append(ParamGroup(group.rho, list(group.params), noise))
        if not found:
            return None
        one = torch.ones((), device=found[0].grads[0].device)
        eps_norm = global_norm([e for g in found for e in g.grads])
        return found, Ascent(None, eps_norm, [one for _ in found])  # type: ignore[arg-type]

    @torch.no_grad()
    @override
    def descent_(self, params: Sequence[Tensor], grad_scale: Tensor | float | None = None) -> None:
        """ARWP: ``F <- beta F + g^2`` with the gradient at ``w + e`` (starting from ``g^2``), unscaled under AMP."""
        if not self.eta:
            return
        stored = self.state.fisher.lookup()
        with_grad = [p for p in params if p.grad is not None]
        for p in with_grad:
            squared = p.grad.square() if grad_scale is None else (p.grad / grad_scale).square()
            f = stored.get(id(p))
            stored[id(p)] = squared if f is None else f.mul_(self.beta).add_(squared)
        owners = {id(p): p for p in [*self.state.fisher.params, *with_grad]}
        self.state.fisher.set_([owners[i] for i in stored], list(stored.values()))

    @override
    def skip_(self) -> None:
        """Drop ``F``, which may hold the non-finite gradient of a skipped step; it starts again."""
        self.state.fisher.reset_()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.state.fisher.to_checkpoint()} if self.eta else {}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.fisher.load_(state.get("fisher"))


def _filter_norms(w: Tensor) -> Tensor:
    """``||w_j||`` broadcast over each output filter (rows of a weight of 2+ dims); ``||w||`` for a 1-D one."""
    if w.dim() < 2:
        return torch.linalg.vector_norm(w)
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).reshape(-1, *([1] * (w.dim() - 1)))


def _filter_sums(f: Tensor) -> Tensor:
    """``F_j``: the sum over each output filter, broadcast (elementwise for a 1-D parameter)."""
    if f.dim() < 2:
        return f
    return f.reshape(f.shape[0], -1).sum(dim=1).reshape(-1, *([1] * (f.dim() - 1)))
