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

import dataclasses
import importlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from typing_extensions import override

from lightning_sam.tensors import add_scaled_, copy_into, global_dot, global_norm, local, norm_of_norms

__all__ = [
    "AESAM",
    "ASAM",
    "GSAM",
    "SAM",
    "FriendlySAM",
    "LatePhaseSAM",
    "Ascent",
    "LookSAM",
    "ParamGroup",
    "RhoSchedule",
    "check_non_negative",
    "method_from_config",
    "method_to_config",
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


class Ascent(NamedTuple):
    """What :meth:`SAM.ascent_` found: ``e = scales[j] * grads`` of group ``j`` (0-dim tensors, no host sync)."""

    grad_norm: Tensor
    """||g|| (for ASAM: ||T g||)."""
    eps_norm: Tensor
    """||e||."""
    scales: list[Tensor]
    """One per group (groups without gradients are left out)."""


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
        # every argument given is checked, also those the shape does not use
        if self.shape not in self.SHAPES:
            raise ValueError(f"Expected `shape` to be one of {self.SHAPES}, got {self.shape!r}.")
        check_non_negative("rho_min", self.rho_min)
        warmup = _check_int("warmup_steps", self.warmup_steps, 0)
        if self.total_steps is not None or self.shape in ("linear", "cosine"):
            _check_int("total_steps", self.total_steps, warmup + 1)
        lr_min = check_non_negative("lr_min", self.lr_min)
        given = self.lr_max is not None
        if (given or self.shape == "lr") and (not given or check_non_negative("lr_max", self.lr_max) <= lr_min):
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
    #: whether the method decides after the clean backward if a step is a SAM step (:meth:`wants_sam_`)
    adaptive: ClassVar[bool] = False

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
        grad_norm = norm_of_norms(group_norms)
        inv = 1.0 / (grad_norm + _NORM_EPS)
        scales = [inv * g.rho for g in groups]  # e = rho * g / ||g||: the direction is g itself
        return Ascent(grad_norm, norm_of_norms([n * s for n, s in zip(group_norms, scales)]), scales)

    def plan_(self, total_steps: int | None) -> None:
        """Learn how many optimizer steps the run takes (``None``: unknown); SAM: nothing."""

    def wants_sam_(self, grad_norm: Tensor) -> bool:
        """For ``adaptive`` methods: after the clean backward, whether this step perturbs (``||g||`` given)."""
        return True

    def figures(self) -> dict[str, float]:
        """Figures of the method itself to log with the step's (AE-SAM: the fraction of SAM steps)."""
        return {}

    def bind_(self, params: Sequence[Tensor]) -> None:
        """Learn the parameters this method will see, in a stable order (the optimizer's).

        Called once per fit, after a checkpoint was loaded. Per-parameter state (LookSAM's ``g_v``)
        is checkpointed by position in this list; SAM keeps nothing.
        """

    @torch.no_grad()
    def clean_gradient_(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """See the clean gradient ``g`` right after the clean backward (``grads[i]`` of ``params[i]``).

        Methods whose descent uses it (``uses_clean_gradient``) keep a copy, paired with its parameters.
        """
        if self.uses_clean_gradient:
            self._clean_params = list(params)
            self._clean = copy_into(self.__dict__.get("_clean"), list(grads))

    def descent_(self, params: Sequence[Tensor]) -> None:
        """Adjust the descent gradient after the perturbed backward; SAM: nothing.

        Args:
            params: every parameter of the step; ``p.grad`` is the perturbed gradient ``g_p`` (``None``
                where the perturbed pass did not reach ``p``). A method may write ``p.grad``, and
                give a gradient to a parameter that had none.
        """

    def plain_descent_(self, params: Sequence[Tensor]) -> None:
        """Adjust the gradients of a plain step in place; SAM: nothing.

        Args:
            params: the parameters with a gradient ``g`` now.
        """

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
        grad_norm = norm_of_norms([global_norm(g.grads) for g in groups])
        for group, t in zip(groups, scalings):
            torch._foreach_mul_(local(group.grads), t)  # g <- T^2 g
        inv = 1.0 / (grad_norm + _NORM_EPS)
        scales = [inv * g.rho for g in groups]  # e = rho * T^2 g / ||T g||
        eps_norm = norm_of_norms([global_norm(g.grads) * s for g, s in zip(groups, scales)])
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
    def descent_(self, params: Sequence[Tensor]) -> None:
        """``g_p <- g_p - alpha * g_perp``, written as ``(1 + alpha c) g_p - alpha g``, c = g.g_p / ||g_p||^2.

        On whole-model vectors: a parameter missing from one pass counts as 0 there, so one with a
        clean gradient only descends along ``-alpha g``.
        """
        if self.alpha == 0:
            return
        clean = dict(zip(map(id, self._clean_params), self._clean))
        perturbed = [p for p in params if p.grad is not None]
        both = [(clean[id(p)], p.grad) for p in perturbed if id(p) in clean]
        g_p = [p.grad for p in perturbed]
        c = global_dot([g for g, _ in both], [gp for _, gp in both]) / (global_norm(g_p).square() + _NORM_EPS)
        if g_p:
            torch._foreach_mul_(local(g_p), 1.0 + self.alpha * c)
        if both:
            torch._foreach_add_(local([gp for _, gp in both]), local([g for g, _ in both]), alpha=-self.alpha)
        reached = {id(p) for p in perturbed}
        for p, g in zip(self._clean_params, self._clean):
            if id(p) not in reached:  # g_p = 0 here: d = -alpha g
                p.grad = g * -self.alpha


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

    @override
    def bind_(self, params: Sequence[Tensor]) -> None:
        self._bound = list(params)
        pending = self.__dict__.pop("_pending", None)
        if pending is not None:
            self._restore(pending)

    @torch.no_grad()
    def descent_(self, params: Sequence[Tensor]) -> None:
        """Store ``g_v = g_s - (g . g_s / ||g||^2) g`` per parameter (a missing gradient counts as 0).

        The descent itself is along ``g_s``.
        """
        clean = dict(zip(map(id, self._clean_params), self._clean))
        perturbed = [p for p in params if p.grad is not None]
        both = [(clean[id(p)], p.grad) for p in perturbed if id(p) in clean]
        c = global_dot([g for g, _ in both], [gs for _, gs in both]) / (global_norm(self._clean).square() + _NORM_EPS)
        torch._foreach_mul_(local(self._clean), c)  # c g; the clean copy is not needed after this
        gv = {id(p): p.grad.clone() for p in perturbed}  # g_s
        for p, cg in zip(self._clean_params, self._clean):
            if id(p) in gv:
                local([gv[id(p)]])[0].sub_(local([cg])[0])
            else:
                gv[id(p)] = -cg
        order = [p for p in self.__dict__.get("_bound", [*perturbed, *self._clean_params]) if id(p) in gv]
        order = list({id(p): p for p in order}.values())  # unbound: each parameter once
        self._gv_params, self._gv = order, [gv[id(p)] for p in order]
        self._gv_norm = global_norm(self._gv)

    @torch.no_grad()
    def plain_descent_(self, params: Sequence[Tensor]) -> None:
        """``g <- g + alpha * (||g|| / ||g_v||) * g_v``, each parameter with its own stored ``g_v`` (none: ``g``)."""
        if self.__dict__.get("_gv") is None or self.alpha == 0:
            return
        stored = dict(zip(map(id, self._gv_params), self._gv))
        pairs = [(p.grad, stored[id(p)]) for p in params if id(p) in stored]
        if pairs:
            grad_norm = global_norm([p.grad for p in params])  # ||g|| over every parameter of the step
            scale = self.alpha * grad_norm / (self._gv_norm + _NORM_EPS)
            add_scaled_([g for g, _ in pairs], [v for _, v in pairs], scale, keep_sources=True)

    @override
    def skip_(self) -> None:
        """Drop ``g_v``, which may come from a non-finite step; plain steps use ``g`` alone until the next SAM step."""
        for name in ("_gv", "_gv_params", "_gv_norm"):
            self.__dict__.pop(name, None)

    @override
    def state_dict(self) -> dict[str, Any]:
        if "_pending" in self.__dict__:
            return self._pending
        if self.__dict__.get("_gv") is None:
            return {"gv": None}
        state = _per_parameter_state(self._gv_params, self._gv, self.__dict__.get("_bound"))
        return {"gv": state["values"], "index": state["index"]}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skip_()
        self.__dict__.pop("_pending", None)
        if state.get("gv") is None:
            return
        if self.__dict__.get("_bound"):
            self._restore(state)
        else:  # before the fit binds the parameters
            self._pending = state

    def _restore(self, state: dict[str, Any]) -> None:
        self._gv_params, self._gv = _restore_per_parameter("LookSAM", state["gv"], state.get("index"), self._bound)
        self._gv_norm = global_norm(self._gv)


def _per_parameter_state(params: list[Tensor], values: list[Tensor], bound: list[Tensor] | None) -> dict[str, Any]:
    """Per-parameter tensors as checkpoint data: local shards and their positions in the bound parameter list.

    A parameter the optimizer no longer holds (its group was removed during fit) is left out.
    """
    index = {id(p): i for i, p in enumerate(bound if bound is not None else params)}
    kept = [(index[id(p)], v) for p, v in zip(params, local(values)) if id(p) in index]
    return {"values": [v.detach().clone() for _, v in kept], "index": [i for i, _ in kept]}


def _restore_per_parameter(
    name: str, saved: list[Tensor], index: Sequence[int] | None, bound: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters and tensors :func:`_per_parameter_state` described, on the parameters' devices."""
    index = range(len(saved)) if index is None else index  # older checkpoints: every parameter, in order
    if len(index) != len(saved) or any(i >= len(bound) for i in index):
        raise ValueError(f"The {name} state in the checkpoint does not match the model's parameters.")
    params = [bound[i] for i in index]
    if any(local([p])[0].shape != t.shape for p, t in zip(params, saved)):
        raise ValueError(f"The {name} state in the checkpoint does not match the model's parameters.")
    values = [torch.empty_like(p) for p in params]
    with torch.no_grad():
        torch._foreach_copy_(local(values), [t.to(v.device) for t, v in zip(saved, local(values))])
    return params, values


class LatePhaseSAM(SAM):
    """Late-phase SAM (Zhou et al., ICLR 2025): plain steps first, SAM from ``start`` on.

    SAM applied only in the last part of training selects flat minima about as well as SAM throughout,
    at a fraction of its cost.

    Args:
        rho: SAM's radius.
        start: the first SAM step: an int (an optimizer step) or a float in ``[0, 1]``, a fraction of
            the run's optimizer steps (``Trainer.estimated_stepping_batches``, so the run needs an end
            by ``max_epochs`` or ``max_steps``). ``0`` is SAM.
        **options: ``interval``, ``rho_schedule``, ``only``, as for :class:`SAM` (they apply from ``start`` on).

    Example::

        >>> method = LatePhaseSAM(rho=0.05, start=0.75)
        >>> method.plan_(total_steps=100)
        >>> [method.takes_sam_step(t) for t in (0, 74, 75, 99)]
        [False, False, True, True]
    """

    def __init__(self, rho: float = 0.05, start: float = 0.8, **options: Any) -> None:
        super().__init__(rho, **options)
        if isinstance(start, bool) or not isinstance(start, (int, float)):
            raise TypeError(f"Expected `start` to be an int step >= 0 or a float fraction in [0, 1], got {start!r}.")
        if (isinstance(start, int) and start < 0) or (isinstance(start, float) and not 0.0 <= start <= 1.0):
            raise ValueError(f"Expected `start` to be an int step >= 0 or a float fraction in [0, 1], got {start!r}.")
        self.start = start

    def _repr_args(self) -> str:
        return f"rho={self.rho}, start={self.start!r}"

    @override
    def plan_(self, total_steps: int | None) -> None:
        self._total_steps = total_steps

    @property
    def start_step(self) -> int:
        """The first SAM step."""
        if isinstance(self.start, int):
            return self.start
        total = self.__dict__.get("_total_steps")
        if total is None:
            raise ValueError(
                f"LatePhaseSAM(start={self.start}) is a fraction of the run, but the run's length is unknown: give "
                "the Trainer max_epochs or max_steps, or `start` as a step."
            )
        return math.ceil(self.start * total)

    @override
    def takes_sam_step(self, step: int) -> bool:
        return step >= self.start_step and super().takes_sam_step(step - self.start_step)

    @override
    def rho_at(self, step: int, lr: float | None = None) -> float:
        """A rho schedule (its warm-up, its decay) counts from ``start``."""
        return super().rho_at(max(step - self.start_step, 0), lr)


class AESAM(SAM):
    """Adaptive policy SAM (AE-SAM, Jiang et al., ICLR 2023): SAM only where the loss surface is sharp.

    After each clean backward it compares ``x = ||g||^2`` with exponential moving averages of its mean
    ``mu`` and variance ``s^2`` (decay ``beta``): a SAM step when ``x > mu + c * s``, else a plain step
    with the clean gradient (one forward/backward). ``c = -inf`` is SAM, ``c = +inf`` plain training.
    The statistics are updated with every step and saved in checkpoints. Deciding costs one host sync
    per step (and under DDP one more collective: a SAM step on every replica if one of them asks).

    Args:
        rho: SAM's radius.
        c: the threshold in standard deviations above the mean (the paper anneals it; here constant).
        beta: the decay of the moving averages, in ``[0, 1)``.
        **options: ``rho_schedule``, ``only``, as for :class:`SAM`.

    Example::

        >>> method = AESAM(rho=0.05, c=0.0)
        >>> [method.wants_sam_(torch.tensor(x).sqrt()) for x in (1.0, 1.0, 9.0, 1.0)]
        [False, False, True, False]
        >>> round(method.sam_fraction, 2)
        0.25
    """

    adaptive = True

    def __init__(self, rho: float = 0.05, c: float = 0.0, beta: float = 0.9, **options: Any) -> None:
        if options.get("interval", 1) != 1:
            raise ValueError(f"AESAM decides every step itself; expected no `interval`, got {options}.")
        super().__init__(rho, **options)
        if isinstance(c, bool) or not isinstance(c, (int, float)) or math.isnan(c):
            raise TypeError(f"Expected `c` to be a float (+-inf allowed), got {c!r}.")
        self.c = float(c)
        beta = check_non_negative("beta", beta)
        if beta >= 1:
            raise ValueError(f"Expected `beta` to be a float in [0, 1), got {beta!r}.")
        self.beta = beta

    @property
    def _stats(self) -> dict[str, Any]:
        # created on first use: copies and pickles carry the configuration only
        return self.__dict__.setdefault("_statistics", {"mean": 0.0, "var": 0.0, "steps": 0, "sam_steps": 0})

    def _repr_args(self) -> str:
        return f"rho={self.rho}, c={self.c}, beta={self.beta}"

    @override
    def wants_sam_(self, grad_norm: Tensor) -> bool:
        x = float(grad_norm) ** 2
        stats = self._stats
        if not math.isfinite(x):  # a step that will be skipped: no SAM pass, statistics untouched
            return False
        if stats["steps"] == 0:
            stats["mean"], stats["var"] = x, 0.0
        if self.c == math.inf:
            sam = False
        elif self.c == -math.inf:
            sam = True
        else:
            sam = x > stats["mean"] + self.c * math.sqrt(stats["var"])
        delta = x - stats["mean"]
        stats["mean"] += (1 - self.beta) * delta
        stats["var"] = self.beta * (stats["var"] + (1 - self.beta) * delta * delta)
        stats["steps"] += 1
        stats["sam_steps"] += sam
        return sam

    @property
    def sam_fraction(self) -> float:
        """The fraction of steps that were SAM steps so far."""
        return self._stats["sam_steps"] / max(self._stats["steps"], 1)

    @override
    def figures(self) -> dict[str, float]:
        return {"sam/sam_fraction": self.sam_fraction}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stats": dict(self._stats)}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "stats" in state:
            self.__dict__["_statistics"] = dict(state["stats"])


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

    def __init__(self, rho: float = 0.05, sigma: float = 1.0, lam: float = 0.9, **options: Any) -> None:
        super().__init__(rho, **options)
        self.sigma = check_non_negative("sigma", sigma)
        lam = check_non_negative("lam", lam)
        if lam >= 1:
            raise ValueError(f"Expected `lam` to be a float in [0, 1), got {lam!r}.")
        self.lam = lam

    def _repr_args(self) -> str:
        return f"rho={self.rho}, sigma={self.sigma}, lam={self.lam}"

    @override
    def bind_(self, params: Sequence[Tensor]) -> None:
        self._bound = list(params)
        pending = self.__dict__.pop("_pending", None)
        if pending is not None:
            restored = _restore_per_parameter("FriendlySAM", pending["values"], pending["index"], self._bound)
            self._m_params, self._m = restored

    @torch.no_grad()
    @override
    def ascent_(self, groups: Sequence[ParamGroup]) -> Ascent:
        """``m <- lam m + (1 - lam) g``; ``g <- g - sigma m`` (the direction ``d``); then SAM's ascent along ``d``."""
        stored = dict(zip(map(id, self.__dict__.get("_m_params", [])), self.__dict__.get("_m", [])))
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
        order = [p for p in self.__dict__.get("_bound", params) if id(p) in stored]
        self._m_params, self._m = order, [stored[id(p)] for p in order]
        return super().ascent_(groups)

    @override
    def skip_(self) -> None:
        """Drop ``m``, which may hold the non-finite gradient of a skipped step; it starts again from 0."""
        for name in ("_m", "_m_params"):
            self.__dict__.pop(name, None)

    @override
    def state_dict(self) -> dict[str, Any]:
        if "_pending" in self.__dict__:
            return {"m": self._pending}
        if not self.__dict__.get("_m"):
            return {"m": None}
        return {"m": _per_parameter_state(self._m_params, self._m, self.__dict__.get("_bound"))}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skip_()
        self.__dict__.pop("_pending", None)
        if state.get("m") is None:
            return
        if self.__dict__.get("_bound"):
            self._m_params, self._m = _restore_per_parameter(
                "FriendlySAM", state["m"]["values"], state["m"]["index"], self._bound
            )
        else:
            self._pending = state["m"]


def method_to_config(method: SAM) -> dict[str, Any]:
    """A method as plain data, in LightningCLI's ``class_path``/``init_args`` form (YAML- and ``weights_only``-safe).

    Example::

        >>> method_to_config(ASAM(rho=0.5, eta=0.01))["init_args"]["eta"]
        0.01
    """
    args: dict[str, Any] = {}
    for key, value in method._config().items():
        if isinstance(value, RhoSchedule):
            value = {"class_path": _class_path(value), "init_args": dataclasses.asdict(value)}
        args[key] = value
    return {"class_path": _class_path(method), "init_args": args}


def method_from_config(config: Mapping[str, Any]) -> SAM:
    """The method that :func:`method_to_config` described (``class_path`` must name a :class:`SAM` subclass).

    Example::

        >>> method_from_config({"class_path": "lightning_sam.ASAM", "init_args": {"rho": 1.0}})
        ASAM(rho=1.0, eta=0.01)
    """
    if not isinstance(config, Mapping) or not isinstance(config.get("class_path"), str):
        raise TypeError(f"Expected a method config {{'class_path': ..., 'init_args': {{...}}}}, got {config!r}.")
    cls = _resolve(config["class_path"], SAM)
    args = dict(config.get("init_args") or {})
    schedule = args.get("rho_schedule")
    if isinstance(schedule, Mapping):
        args["rho_schedule"] = _resolve(schedule["class_path"], RhoSchedule)(**schedule.get("init_args", {}))
    return cls(**args)


def _class_path(obj: object) -> str:
    cls = type(obj)
    module = "lightning_sam" if cls.__module__ == __name__ else cls.__module__
    return f"{module}.{cls.__qualname__}"


def _resolve(path: str, base: type) -> Any:
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"Expected `class_path` to name a {base.__name__} class, got {path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"Expected `class_path` to name a {base.__name__} class, got {path!r}.")
    return cls
