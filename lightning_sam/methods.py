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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from typing_extensions import override

__all__ = [
    "ASAM",
    "GSAM",
    "SAM",
    "Ascent",
    "LookSAM",
    "ParamGroup",
    "RhoSchedule",
    "WeightBackup",
    "global_dot",
    "global_norm",
    "local",
]

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


def _layout(t: Tensor) -> tuple[tuple, Tensor]:
    """``((dtype, device mesh, placements), local tensor)``; plain tensors have no mesh."""
    if DTensor is not None and isinstance(t, DTensor):
        return (t.dtype, t.device_mesh, t.placements), t.to_local()
    return (t.dtype, None, None), t


def _sum_over_shards(partial: Tensor, mesh: Any, placements: Any) -> Tensor:
    """All-reduce a sum over the shards of a DTensor layout (nothing to do for plain tensors)."""
    if mesh is None:
        return partial
    layout = [Partial() if isinstance(p, Shard) else Replicate() for p in placements]
    return DTensor.from_local(partial, mesh, layout).full_tensor()


def _result_dtype(keys: Any) -> torch.dtype:
    return torch.float64 if any(key[0] == torch.float64 for key in keys) else torch.float32


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
        key, x = _layout(t)
        groups.setdefault(key, []).append(x)
    out = _result_dtype(groups)
    squares = []
    for (dtype, mesh, placements), xs in groups.items():
        norms = torch._foreach_norm(xs, 2, dtype=torch.float32 if dtype in _LOW_PRECISION else None)
        squares.append(_sum_over_shards(torch.stack(norms).to(out).square().sum(), mesh, placements))
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=out)


def global_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """The inner product of two lists of tensors, each taken as one vector, like :func:`global_norm`.

    Example::

        >>> global_dot([torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 4.0])])
        tensor(11.)
    """
    groups: dict[tuple, list[Tensor]] = {}
    for x, y in zip(a, b):
        key, x_local = _layout(x)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dot = torch.vdot(x_local.reshape(-1).to(acc), _layout(y)[1].reshape(-1).to(acc))
        groups.setdefault(key, []).append(dot)
    out = _result_dtype(groups)
    sums = [_sum_over_shards(torch.stack(d).to(out).sum(), mesh, pl) for (_, mesh, pl), d in groups.items()]
    return torch.stack(sums).sum() if sums else torch.zeros((), dtype=out)


class Ascent(NamedTuple):
    """What :meth:`SAM.ascent_` found: ``e = scales[j] * grads`` of group ``j`` (0-dim tensors, no host sync)."""

    grad_norm: Tensor
    """||g|| (for ASAM: ||T g||)."""
    eps_norm: Tensor
    """||e||."""
    scales: list[Tensor]
    """One per group (groups without gradients are left out)."""


def _copy_into(buffer: list[Tensor] | None, tensors: list[Tensor]) -> list[Tensor]:
    """Copy ``tensors`` into ``buffer`` (allocated like them when missing or of another layout)."""
    if buffer is None or len(buffer) != len(tensors) or any(b.shape != t.shape for b, t in zip(buffer, tensors)):
        buffer = [torch.empty_like(t) for t in tensors]
    torch._foreach_copy_(local(buffer), local(tensors))
    return buffer


def _add_scaled_(targets: list[Tensor], sources: list[Tensor], scale: Tensor, keep_sources: bool = False) -> None:
    """``targets += scale * sources`` in place, on local shards.

    On CPU the scale is read to the host, which is free there and saves a pass; elsewhere the
    sources are scaled without a host sync, in place unless ``keep_sources`` (then in a temporary).
    """
    targets, sources = local(targets), local(sources)
    if scale.device.type == "cpu":
        torch._foreach_add_(targets, sources, alpha=scale.item())
    elif keep_sources:
        torch._foreach_add_(targets, torch._foreach_mul(sources, scale))
    else:
        torch._foreach_mul_(sources, scale)
        torch._foreach_add_(targets, sources)


_NORM_LAYERS = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.LocalResponseNorm,
    *((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()),
)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int >= {minimum}, got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}, got {value}.")
    return value


@dataclass(frozen=True)
class RhoSchedule:
    """How rho changes over training; rho itself (``rho_max``) is the method's.

    ``rho(t) = ramp(t) * (rho_min + (rho_max - rho_min) * s(t))`` at optimizer step ``t``, with
    ``ramp`` rising linearly from ``1 / warmup_steps`` to 1 over the first ``warmup_steps``, and:

    * ``"constant"``: ``s = 1``;
    * ``"linear"`` / ``"cosine"``: ``s`` falls from 1 to 0 over ``total_steps`` (after the warm-up),
      linearly or along a half cosine, as the LR schedules of the same names;
    * ``"lr"``: ``s = (lr - lr_min) / (lr_max - lr_min)`` with the optimizer's current learning rate:
      rho follows whatever LR schedule is used (GSAM's schedule, Zhuang et al. 2022).

    Every shape but ``"lr"`` is a pure function of the step, so a resumed run gets the same rhos;
    ``"lr"`` follows the LR scheduler, which checkpoints restore.

    Example::

        >>> schedule = RhoSchedule("cosine", total_steps=100, rho_min=0.01)
        >>> [round(schedule.rho(t, rho_max=0.05), 4) for t in (0, 50, 100)]
        [0.05, 0.03, 0.01]
    """

    shape: str = "constant"
    total_steps: int | None = None
    rho_min: float = 0.0
    warmup_steps: int = 0
    lr_max: float | None = None
    lr_min: float = 0.0

    SHAPES: ClassVar[tuple[str, ...]] = ("constant", "linear", "cosine", "lr")

    def __post_init__(self) -> None:
        if self.shape not in self.SHAPES:
            raise ValueError(f"Expected `shape` to be one of {self.SHAPES}, got {self.shape!r}.")
        check_non_negative("rho_min", self.rho_min)
        _check_int("warmup_steps", self.warmup_steps, 0)
        if self.shape in ("linear", "cosine"):
            _check_int("total_steps", self.total_steps, self.warmup_steps + 1)
        if self.shape == "lr":
            lr_min = check_non_negative("lr_min", self.lr_min)
            if self.lr_max is None or check_non_negative("lr_max", self.lr_max) <= lr_min:
                raise ValueError(f"Expected `lr_max` to be a float > lr_min ({lr_min}), got {self.lr_max!r}.")

    def rho(self, step: int, rho_max: float, lr: float | None = None) -> float:
        """Return rho at optimizer step ``step`` (``lr``: the current learning rate, for shape ``"lr"``)."""
        if self.shape == "constant":
            s = 1.0
        elif self.shape == "lr":
            assert lr is not None and self.lr_max is not None
            s = min(max((lr - self.lr_min) / (self.lr_max - self.lr_min), 0.0), 1.0)
        else:
            assert self.total_steps is not None
            x = min(max((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0), 1.0)
            s = 1.0 - x if self.shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * x))
        ramp = min((step + 1) / self.warmup_steps, 1.0) if self.warmup_steps else 1.0
        return ramp * (self.rho_min + (rho_max - self.rho_min) * s)


class SAM:
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

    #: whether the descent uses the clean gradient too (then under DDP it is all-reduced)
    uses_clean_gradient: ClassVar[bool] = False

    def __init__(
        self,
        rho: float = 0.05,
        *,
        interval: int = 1,
        rho_schedule: RhoSchedule | None = None,
        only: str | None = None,
    ) -> None:
        self.rho = check_non_negative("rho", rho)
        self.interval = _check_int("interval", interval, 1)
        if rho_schedule is not None and not isinstance(rho_schedule, RhoSchedule):
            raise TypeError(f"Expected `rho_schedule` to be a RhoSchedule or None, got {rho_schedule!r}.")
        self.rho_schedule = rho_schedule
        if only is not None:
            if not isinstance(only, str):
                raise TypeError(f"Expected `only` to be 'normalization', a regular expression or None, got {only!r}.")
            try:
                re.compile(only)
            except re.error as err:
                raise ValueError(f"Expected `only` to be 'normalization' or a valid regular expression: {err}") from err
        self.only = only

    # ---- configuration: public attributes; buffers live in underscored ones and are not compared
    def _config(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        defaults = {"interval": 1, "rho_schedule": None, "only": None}
        options = [f"{k}={v!r}" for k, v in self._config().items() if k in defaults and v != defaults[k]]
        return f"{type(self).__name__}({', '.join([self._repr_args(), *options])})"

    def _repr_args(self) -> str:
        return f"rho={self.rho}"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._config() == other._config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self._config().items()))))

    def __getstate__(self) -> dict[str, Any]:
        return self._config()  # pickles (hyperparameters) carry the configuration, not buffers

    # ---- what the training step asks
    def takes_sam_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` is a SAM step (else a plain one)."""
        return step % self.interval == 0

    def rho_at(self, step: int, lr: float | None = None) -> float:
        """The method's rho at optimizer step ``step`` (group rhos scale by the same factor)."""
        return self.rho if self.rho_schedule is None else self.rho_schedule.rho(step, self.rho, lr)

    def selects(self, name: str, module: torch.nn.Module) -> bool:
        """Whether the parameter ``name`` of ``module`` is perturbed (see ``only``)."""
        if self.only is None:
            return True
        if self.only == "normalization":
            return isinstance(module, _NORM_LAYERS)
        return re.search(self.only, name) is not None

    # ---- the math
    @torch.no_grad()
    def ascent_(self, groups: Sequence[ParamGroup]) -> Ascent:
        """Leave the direction of ``e(w)`` in the gradients and return its scale per group.

        Args:
            groups: the param groups to perturb, each with its gradients at ``w``; groups without
                gradients are skipped.

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

    @torch.no_grad()
    def clean_gradient_(self, grads: list[Tensor]) -> None:
        """See the clean gradient of every parameter, right after the clean backward.

        Methods whose descent uses it (``uses_clean_gradient``) keep a copy in ``self._clean``.
        """
        if self.uses_clean_gradient:
            self._clean = _copy_into(self.__dict__.get("_clean"), grads)

    def descent_(self, grads: list[Tensor]) -> None:
        """Adjust the descent gradient after the perturbed backward, in place; SAM: nothing."""

    def plain_descent_(self, grads: list[Tensor], grad_norm: Tensor) -> None:
        """Adjust the gradient (of norm ``grad_norm``) of a plain step, in place; SAM: nothing."""

    def skip_(self) -> None:
        """The update of a SAM step was skipped or failed: forget what :meth:`descent_` stored; SAM: nothing."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint beyond the configuration (LookSAM's stored direction); SAM: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


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

    def __init__(self, rho: float = 0.5, eta: float = 0.01, **options: Any) -> None:
        super().__init__(rho, **options)
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

    uses_clean_gradient = True

    def __init__(self, rho: float = 0.05, alpha: float = 0.1, **options: Any) -> None:
        super().__init__(rho, **options)
        self.alpha = check_non_negative("alpha", alpha)

    def _repr_args(self) -> str:
        return f"rho={self.rho}, alpha={self.alpha}"

    @torch.no_grad()
    def descent_(self, grads: list[Tensor]) -> None:
        """``g_p <- g_p - alpha * g_perp``, written as ``(1 + alpha c) g_p - alpha g``, c = g.g_p / ||g_p||^2."""
        if self.alpha == 0:
            return
        c = global_dot(self._clean, grads) / (global_norm(grads).square() + _NORM_EPS)
        torch._foreach_mul_(local(grads), 1.0 + self.alpha * c)
        torch._foreach_add_(local(grads), local(self._clean), alpha=-self.alpha)


class LookSAM(SAM):
    """LookSAM (Liu et al., CVPR 2022): a SAM step every ``k`` steps, cheap steps between.

    A SAM step (every ``k``-th optimizer step) descends along the SAM gradient ``g_s`` and stores
    ``g_v``, the part of ``g_s`` orthogonal to the clean gradient ``g``:
    ``g_v = g_s - (g . g_s / ||g||^2) g``. The steps between take one forward/backward and descend
    along ``g + alpha * (||g|| / ||g_v||) * g_v``. ``k = 1`` is SAM. ``g_v`` is one more
    parameter-sized buffer, saved in checkpoints so that a resumed run continues exactly.

    Args:
        rho: SAM's radius.
        k: the SAM step interval, an int >= 1.
        alpha: the weight of the stored direction, finite and non-negative (the paper: 0.7).
        **options: ``rho_schedule``, ``only``, as for :class:`SAM` (``k`` takes the role of
            ``interval``).

    Example::

        >>> LookSAM(rho=0.05, k=5, alpha=0.7)
        LookSAM(rho=0.05, k=5, alpha=0.7)
    """

    uses_clean_gradient = True

    def __init__(self, rho: float = 0.05, k: int = 5, alpha: float = 0.7, **options: Any) -> None:
        if options.get("interval", 1) != 1:
            raise ValueError(f"LookSAM takes a SAM step every `k` steps; expected no `interval`, got {options}.")
        super().__init__(rho, **options)
        self.k = _check_int("k", k, 1)
        self.alpha = check_non_negative("alpha", alpha)

    def _repr_args(self) -> str:
        return f"rho={self.rho}, k={self.k}, alpha={self.alpha}"

    @override
    def takes_sam_step(self, step: int) -> bool:
        return step % self.k == 0

    @torch.no_grad()
    def descent_(self, grads: list[Tensor]) -> None:
        """Store ``g_v`` from ``g_s`` (the gradients) and ``g``; the descent itself is SAM's."""
        clean = self._clean
        c = global_dot(clean, grads) / (global_norm(clean).square() + _NORM_EPS)
        torch._foreach_mul_(local(clean), c)  # the clean copy is not needed after this
        gv = _copy_into(self.__dict__.get("_gv"), grads)
        torch._foreach_sub_(local(gv), local(clean))
        self._gv, self._gv_norm = gv, global_norm(gv)

    @torch.no_grad()
    def plain_descent_(self, grads: list[Tensor], grad_norm: Tensor) -> None:
        """``g <- g + alpha * (||g|| / ||g_v||) * g_v`` (nothing before the first SAM step)."""
        pending = self.__dict__.pop("_pending", None)
        if pending is not None:
            if len(pending) != len(grads) or any(p.shape != g.shape for p, g in zip(pending, grads)):
                raise ValueError("The LookSAM state in the checkpoint does not match the model's parameters.")
            self._gv = _copy_into(None, grads)
            torch._foreach_copy_(local(self._gv), [p.to(g.device) for p, g in zip(pending, local(grads))])
            self._gv_norm = global_norm(self._gv)
        gv = self.__dict__.get("_gv")
        if gv is None or self.alpha == 0:
            return
        _add_scaled_(grads, gv, self.alpha * grad_norm / (self._gv_norm + _NORM_EPS), keep_sources=True)

    @override
    def skip_(self) -> None:
        """Drop ``g_v``, which may come from a non-finite step; plain steps use ``g`` alone until the next SAM step."""
        self.__dict__.pop("_gv", None)
        self.__dict__.pop("_gv_norm", None)

    @override
    def state_dict(self) -> dict[str, Any]:
        gv = self.__dict__.get("_gv", self.__dict__.get("_pending"))
        return {"gv": None if gv is None else [t.detach().clone() for t in local(gv)]}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.pop("_gv", None)
        if state.get("gv") is not None:
            self._pending = state["gv"]


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

        Groups with ``rho == 0`` stay where they are (their gradients only count in ``||g||``).

        On CPU the scale is read to the host, which is free there and saves a pass over the
        gradients; elsewhere the direction is scaled in place, without a host sync.
        """
        pairs = [(g, s) for g, s in zip([g for g in groups if g.grads], scales) if g.rho > 0]  # rho 0: w stays
        params = local([p for g, _ in pairs for p in g.params])
        if len(params) != len(self._params) or any(a is not b for a, b in zip(params, self._params)):
            self._params = params
            self._saved = [torch.empty_like(p) for p in params]
        if not params:
            return
        with torch.no_grad():
            torch._foreach_copy_(self._saved, params)
            self._holds_copy = True
            for group, scale in pairs:
                _add_scaled_(group.params, group.grads, scale)  # w <- w + e

    def restore_(self) -> None:
        """``w <- saved w``; does nothing when no copy is held."""
        if self._holds_copy and self._params:
            with torch.no_grad():
                torch._foreach_copy_(self._params, self._saved)

    def discard(self) -> None:
        """Forget the copy (the step is over); the buffer is kept for the next step."""
        self._holds_copy = False
