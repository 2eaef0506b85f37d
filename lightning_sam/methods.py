"""The perturbation rules of SAM and ASAM, in pure torch (no Lightning import).

A method turns the gradient ``g`` at the weights ``w`` into the ascent step ``e(w)``:

* SAM (Foret et al., ICLR 2021): ``e = rho * g / ||g||``.
* ASAM (Kwon et al., ICML 2021): ``e = rho * T^2 g / ||T g||`` with ``T = |w| + eta`` elementwise.

``||.||`` is one global norm over every tensor of every group. A group may carry its own ``rho``
(taken from the optimizer's param group); the norm stays global.

:meth:`SAM.ascent_` leaves in each gradient the direction of ``e`` (``g`` itself for SAM, ``T^2 g``
for ASAM, written in place: no extra parameter-sized buffer) and returns one scale per group, with
``e = scale * direction``. Moving the weights and restoring them is :class:`WeightBackup`'s job,
because restoring must copy saved weights back: ``(w + e) - e`` is not ``w`` in floating point.

Example::

    >>> import torch
    >>> from lightning_sam import SAM, ParamGroup, WeightBackup
    >>> w = torch.tensor([3.0, 4.0], requires_grad=True)
    >>> (w**2).sum().backward()                                # g = 2w = (6, 8), ||g|| = 10
    >>> group = ParamGroup(rho=0.5, params=[w], grads=[w.grad])
    >>> ascent = SAM(rho=0.5).ascent_([group])
    >>> ascent.grad_norm, ascent.eps_norm, ascent.scales       # e = 0.5 * g / 10
    (tensor(10.), tensor(0.5000), [tensor(0.0500)])
    >>> backup = WeightBackup()
    >>> backup.perturb_([group], ascent.scales)                # w <- w + e
    >>> w.data
    tensor([3.3000, 4.4000])
    >>> backup.restore_()                                      # w <- saved w, bit for bit
    >>> w.data
    tensor([3., 4.])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ASAM", "SAM", "Ascent", "ParamGroup", "WeightBackup", "global_norm", "local"]

# Guards the division by ||g||: a zero gradient gives a zero perturbation, not NaN.
_NORM_EPS = 1e-12


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


_LOW_PRECISION = (torch.float16, torch.bfloat16)

try:  # FSDP2 shards parameters as DTensors
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # torch without distributed support, or before 2.5
    DTensor = None


def local(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The local shards of DTensors (FSDP2), other tensors as they are.

    Elementwise in-place work on the shards is exact and needs no communication.

    Example::

        >>> local([torch.ones(2)])
        [tensor([1., 1.])]
    """
    if DTensor is None:
        return list(tensors)
    with torch.no_grad():  # the shard itself, not a differentiable view of it
        return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _global_norm(norms: Sequence[Tensor]) -> Tensor:
    """The norm of a vector of norms (0 when there are none)."""
    return torch.linalg.vector_norm(torch.stack(list(norms))) if norms else torch.zeros(())


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The 2-norm of all ``tensors`` together, without a host sync.

    fp16 and bf16 tensors are reduced in float32 (their squares overflow early); the result is
    float64 if any tensor is, else float32. Sharded DTensors (FSDP2) count whole: their local sums
    of squares are all-reduced over the shards, one collective per mesh and placement.

    Example::

        >>> global_norm([torch.tensor([3.0]), torch.tensor([[4.0]], dtype=torch.float16)])
        tensor(5.)
    """
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        if DTensor is not None and isinstance(t, DTensor):
            groups.setdefault((t.dtype, t.device_mesh, t.placements), []).append(t.to_local())
        else:
            groups.setdefault((t.dtype, None, None), []).append(t)
    out = torch.float64 if any(key[0] == torch.float64 for key in groups) else torch.float32
    squares = []
    for (dtype, mesh, placements), ts in groups.items():
        norms = torch._foreach_norm(ts, 2, dtype=torch.float32 if dtype in _LOW_PRECISION else None)
        square = torch.stack(norms).to(out).square().sum()
        if mesh is not None:  # the shards' squares add up over the mesh dimensions they are split on
            partial = [Partial() if isinstance(p, Shard) else Replicate() for p in placements]
            square = DTensor.from_local(square, mesh, partial).full_tensor()
        squares.append(square)
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=out)


class Ascent(NamedTuple):
    """What :meth:`SAM.ascent_` found: ``e = scales[j] * grads`` of group ``j`` (0-dim tensors, no host sync)."""

    grad_norm: Tensor
    """||g|| (for ASAM: ||T g||)."""
    eps_norm: Tensor
    """||e||."""
    scales: list[Tensor]
    """One per group (groups without gradients are left out)."""


class SAM:
    """Sharpness-Aware Minimization: ``e(w) = rho * g / ||g||``.

    Args:
        rho: the radius of the neighbourhood, a finite non-negative float (the paper uses 0.05 on
            CIFAR-10 and 0.1 on CIFAR-100). A param group of the optimizer may override it with
            its own ``"rho"`` key.

    Example::

        >>> SAM(rho=0.05)
        SAM(rho=0.05)
    """

    def __init__(self, rho: float = 0.05) -> None:
        self.rho = check_non_negative("rho", rho)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()})"

    def _repr_args(self) -> str:
        return f"rho={self.rho}"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    @torch.no_grad()
    def ascent_(self, groups: Sequence[ParamGroup]) -> Ascent:
        """Leave the direction of ``e(w)`` in the gradients and return its scale per group.

        Args:
            groups: the param groups, each with its gradients at ``w``; groups without gradients
                are skipped.

        Returns:
            ``||g||``, ``||e||`` and one scale per group with gradients, as 0-dim tensors
            (float32, or float64 for float64 gradients) computed without a host sync.
        """
        groups = [g for g in groups if g.grads]
        group_norms = [global_norm(g.grads) for g in groups]
        grad_norm = _global_norm(group_norms)
        inv = 1.0 / (grad_norm + _NORM_EPS)
        scales = [inv * g.rho for g in groups]  # e = rho * g / ||g||: the direction is g itself
        return Ascent(grad_norm, _global_norm([n * s for n, s in zip(group_norms, scales)]), scales)


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., ICML 2021): ``e(w) = rho * T^2 g / ||T g||`` with ``T = |w| + eta``.

    The neighbourhood is scaled by the weights, which makes sharpness invariant to rescaling a
    layer's weights. ``eta = 0`` is the ``adaptive=True`` mode of davda54/sam.

    Args:
        rho: the radius in the scaled space, a finite non-negative float (the paper uses 0.5 to 2.0,
            about ten times SAM's rho).
        eta: keeps ``T`` positive for zero weights, a finite non-negative float.

    Example::

        >>> ASAM(rho=0.5, eta=0.01)
        ASAM(rho=0.5, eta=0.01)
    """

    def __init__(self, rho: float = 0.5, eta: float = 0.01) -> None:
        super().__init__(rho)
        self.eta = check_non_negative("eta", eta)

    def _repr_args(self) -> str:
        return f"rho={self.rho}, eta={self.eta}"

    @torch.no_grad()
    def ascent_(self, groups: Sequence[ParamGroup]) -> Ascent:
        """Write ``T^2 g`` into the gradients and return the scales ``rho / ||T g||``."""
        groups = [g for g in groups if g.grads]
        # T = |w| + eta: one temporary the size of the perturbed weights, freed on return
        scalings = [torch._foreach_abs(local(g.params)) for g in groups]
        for group, t in zip(groups, scalings):
            torch._foreach_add_(t, self.eta)
            torch._foreach_mul_(local(group.grads), t)  # g <- T g
        grad_norm = _global_norm([global_norm(g.grads) for g in groups])
        for group, t in zip(groups, scalings):
            torch._foreach_mul_(local(group.grads), t)  # g <- T^2 g
        inv = 1.0 / (grad_norm + _NORM_EPS)
        scales = [inv * g.rho for g in groups]  # e = rho * T^2 g / ||T g||
        eps_norm = _global_norm([global_norm(g.grads) * s for g, s in zip(groups, scales)])
        return Ascent(grad_norm, eps_norm, scales)


class WeightBackup:
    """Moves weights to ``w + e`` and back, restoring them bit for bit.

    The saved copy is the one parameter-sized buffer SAM needs beyond plain training; it is
    allocated on first use and reused while the set of perturbed tensors stays the same. It holds
    ``w`` until :meth:`discard`, so :meth:`restore_` can also undo an optimizer step that failed
    half-way.
    """

    def __init__(self) -> None:
        self._params: list[Tensor] = []
        self._saved: list[Tensor] = []
        self._holds_copy = False

    def perturb_(self, groups: Sequence[ParamGroup], scales: Sequence[Tensor]) -> None:
        """Save ``w``, then ``w <- w + scale * direction`` per group (see :meth:`SAM.ascent_`).

        On CPU the scale is read to the host, which is free there and saves a pass over the
        gradients; elsewhere the direction is scaled in place, without a host sync.
        """
        groups = [g for g in groups if g.grads]
        params = local([p for g in groups for p in g.params])
        if len(params) != len(self._params) or any(a is not b for a, b in zip(params, self._params)):
            self._params = params
            self._saved = [torch.empty_like(p) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(self._saved, params)
            self._holds_copy = True
            for group, scale in zip(groups, scales):
                weights, directions = local(group.params), local(group.grads)
                if scale.device.type == "cpu":
                    torch._foreach_add_(weights, directions, alpha=scale.item())
                else:
                    torch._foreach_mul_(directions, scale)
                    torch._foreach_add_(weights, directions)

    def restore_(self) -> None:
        """``w <- saved w``; does nothing when no copy is held."""
        if self._holds_copy:
            with torch.no_grad():
                torch._foreach_copy_(self._params, self._saved)

    def discard(self) -> None:
        """Forget the copy (the step is over); the buffer is kept for the next step."""
        self._holds_copy = False
