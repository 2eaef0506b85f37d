"""The base of every method: its settings (an immutable dataclass) and the hooks the SAM step calls.

A method decides, at each optimizer step, whether and how to perturb the weights and what the descent
does with the gradients. The hooks, grouped by what they decide:

- **schedule**: :meth:`Method.takes_sam_step` (a two-pass step or a plain one), :meth:`Method.rho_at`,
  :meth:`Method.plan_` (the run's length), :meth:`Method.selects` (which parameters, ``only=``);
- **ascent**: :meth:`Method.ascent_`, the direction and the scale of ``e(w)``;
- **descent**: :meth:`Method.clean_gradient_` (a copy of ``g`` for methods that use it),
  :meth:`Method.descent_` (after the perturbed backward), :meth:`Method.plain_descent_` (on plain steps);
- **adaptive decision**: :attr:`Method.adaptive` and :meth:`Method.wants_sam_`, after the clean backward;
- **state**: :meth:`Method.bind_`, :meth:`Method.skip_`, :meth:`Method.state_dict`,
  :meth:`Method.load_state_dict`, :meth:`Method.figures`.

Settings are the dataclass fields: compared, hashed, pickled and written to checkpoints and
``hparams.yaml`` as the method's config. What a method learns while training (a stored direction,
moving statistics) lives in ``self.state``, an object of the method's own ``State`` class that is
created fresh with every instance and never compared or pickled; per-parameter tensors are kept
in a :class:`~lightning_sam.methods.state.ParameterState`. Pure torch (no Lightning import).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_sam.core.groups import Ascent, ParamGroup, check_int, check_non_negative
from lightning_sam.core.tensors import copy_into
from lightning_sam.methods.schedule import RhoSchedule

__all__ = ["NORM_EPS", "Method"]

#: Guards the division by ||g||: a zero gradient gives a zero perturbation, not NaN.
NORM_EPS = 1e-12

_COMMON = ("interval", "rho_schedule", "only")  # the settings every method has, after its radius


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


_NORM_LAYERS = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.LocalResponseNorm,
    *((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()),
)


@dataclass(frozen=True, repr=False, eq=False)
class Method:
    """The settings every method has, and the hooks of the SAM step with their defaults.

    A subclass is a frozen dataclass too: its own settings are fields (positional after ``rho``),
    checked in ``__post_init__``; its runtime state is a nested ``State`` class (see the module
    docstring). ``name`` is its key in the registry and the app's config (``sam=<name>``).

    Every method has a radius, its first setting (``rho`` for the SAM family; see :attr:`radius_name`).
    A param group of the optimizer may override it with its own ``"rho"`` key; a group with 0 is not
    perturbed.

    Args:
        interval: perturb on every ``interval``-th optimizer step only, with plain steps (one
            forward/backward) between (MosaicML Composer's ``interval``); 1: every step.
        rho_schedule: how rho changes over training (:class:`RhoSchedule`); ``None``: constant.
        only: perturb a subset of the parameters, ``"normalization"`` (the weights and biases of
            normalization layers, "SAM-ON", Mueller et al. 2023) or a regular expression searched
            in parameter names; ``None``: all. The norm ``||g||`` runs over the perturbed parameters.
    """

    _: KW_ONLY
    interval: int = 1
    rho_schedule: RhoSchedule | None = None
    only: str | None = None

    #: the method's name in the registry and in the app's configs (``configs/sam/<name>.yaml``)
    name: ClassVar[str] = ""
    #: the setting that scales the perturbation (``rho``; RWP's ``sigma``): what ``rho_schedule`` and a
    #: param group's ``"rho"`` key scale
    radius_name: ClassVar[str] = "rho"
    #: perturb before the forward (one pass a step: Momentum-SAM, RWP) instead of after a clean backward
    single_pass: ClassVar[bool] = False
    #: whether the descent uses the clean gradient too (then under DDP it is all-reduced)
    uses_clean_gradient: ClassVar[bool] = False
    #: whether the method decides after the clean backward if a step is a SAM step (:meth:`wants_sam_`)
    adaptive: ClassVar[bool] = False
    #: whether :meth:`descent_` reads the gradients' size across steps: it is then called with
    #: ``grad_scale=`` (the AMP loss scale the gradients carry, or ``None``) to see them unscaled
    descent_unscales: ClassVar[bool] = False

    class State:
        """What the method learns while training; the base keeps the clean gradient for methods that use it."""

        def __init__(self) -> None:
            self.clean_params: list[Tensor] = []
            self.clean: list[Tensor] | None = None

    # ------------------------------------------------------------------ settings
    def __post_init__(self) -> None:
        self._set(self.radius_name, check_non_negative(self.radius_name, self.radius))
        check_int("interval", self.interval, 1)
        if self.rho_schedule is not None and not isinstance(self.rho_schedule, RhoSchedule):
            raise TypeError(f"Expected `rho_schedule` to be a RhoSchedule or None, got {self.rho_schedule!r}.")
        if self.only is not None:
            if not isinstance(self.only, str):
                raise TypeError(
                    f"Expected `only` to be 'normalization', a regular expression or None, got {self.only!r}."
                )
            try:
                re.compile(self.only)
            except re.error as err:
                raise ValueError(f"Expected `only` to be 'normalization' or a valid regular expression: {err}") from err
        object.__setattr__(self, "state", self.State())

    def _set(self, name: str, value: Any) -> None:
        """Set a (checked, normalized) setting in ``__post_init__``; settings are frozen afterwards."""
        object.__setattr__(self, name, value)

    @property
    def radius(self) -> float:
        """The setting that scales the perturbation (``rho``, or RWP's ``sigma``)."""
        return getattr(self, self.radius_name)

    def _ordered_fields(self) -> list[dataclasses.Field]:
        """The radius, the options every method has, then the method's own settings (the config's order)."""
        own = fields(self)
        radius = [f for f in own if f.name == self.radius_name]
        common = [f for f in own if f.name in _COMMON]
        return radius + common + [f for f in own if f.name != self.radius_name and f.name not in _COMMON]

    def settings(self) -> dict[str, Any]:
        """The settings (the method's config; ``state`` is not part of it).

        The dataclass fields, and (for a subclass written the way of 0.2, with an ``__init__`` that sets
        public attributes) every other public attribute: those were its settings then.
        """
        found = {f.name: getattr(self, f.name) for f in self._ordered_fields()}
        for name, value in vars(self).items():
            if name not in found and name != "state" and not name.startswith("_"):
                found[name] = value
        return found

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.settings() == other.settings()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple((k, _hashable(v)) for k, v in self.settings().items())))

    def __repr__(self) -> str:
        ordered = self._ordered_fields()
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in ordered if not f.kw_only]
        shown += [
            f"{f.name}={getattr(self, f.name)!r}" for f in ordered if f.kw_only and getattr(self, f.name) != f.default
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    def __getstate__(self) -> dict[str, Any]:
        return self.settings()  # pickles (hyperparameters) carry the settings, never the state

    def __setstate__(self, settings: dict[str, Any]) -> None:
        # pickles of earlier versions held the public attributes: the settings, by name
        names = {f.name for f in fields(self)}
        for f in fields(self):
            default = f.default if f.default is not dataclasses.MISSING else None
            object.__setattr__(self, f.name, settings.get(f.name, default))
        for name, value in settings.items():  # a subclass's own public attributes (the way of 0.2)
            if name not in names:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "state", self.State())

    # ------------------------------------------------------------------ schedule
    def takes_sam_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` is a SAM step (else a plain one)."""
        return step % self.interval == 0

    def rho_at(self, step: int, lr: float | None = None) -> float:
        """The method's radius at optimizer step ``step`` (group rhos scale by the same factor)."""
        return self.radius if self.rho_schedule is None else self.rho_schedule.rho(step, self.radius, lr)

    def plan_(self, total_steps: int | None) -> None:
        """Learn how many optimizer steps the run takes (``None``: unknown); default: nothing."""

    @property
    def follows_run_length(self) -> bool:
        """Whether :meth:`plan_` changes what the method does (a resume must then keep the run's length)."""
        return False

    def selects(self, name: str, module: torch.nn.Module) -> bool:
        """Whether the parameter ``name`` of ``module`` is perturbed (see ``only``)."""
        if self.only is None:
            return True
        if self.only == "normalization":
            return isinstance(module, _NORM_LAYERS)
        return re.search(self.only, name) is not None

    # ------------------------------------------------------------------ ascent
    def ascent_(self, groups: Sequence[ParamGroup]) -> Ascent:
        """Leave the direction of ``e(w)`` in the gradients and return its scale per group.

        Args:
            groups: the param groups to perturb, each with its gradients at ``w``; groups without
                gradients are skipped.

        Returns:
            ``||g||``, ``||e||`` and one scale per group with gradients, as 0-dim tensors
            (float32, or float64 for float64 gradients) computed without a host sync.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define its ascent.")

    def perturbation_(
        self, groups: Sequence[ParamGroup], optimizer: torch.optim.Optimizer, step: int
    ) -> tuple[list[ParamGroup], Ascent] | None:
        """Single-pass methods (``single_pass``): the perturbation to apply before the forward.

        Args:
            groups: the param groups to perturb, each with its (scheduled) rho and its parameters; no
                gradients (their ``grads`` are empty).
            optimizer: the optimizer, whose state the method may read (Momentum-SAM's momentum).
            step: the optimizer step.

        Returns:
            The groups with their directions in ``grads`` and the :class:`Ascent` (one scale per group),
            with ``e = scale * direction``; ``None`` to perturb nothing at this step. The directions may be
            the optimizer's own state: they are not changed.
        """
        raise NotImplementedError(f"{type(self).__name__} is not a single-pass method.")

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise for an optimizer the method cannot work with (Momentum-SAM: one without momentum); default: none."""

    # ------------------------------------------------------------------ descent
    @torch.no_grad()
    def clean_gradient_(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """See the clean gradient ``g`` right after the clean backward (``grads[i]`` of ``params[i]``).

        Methods whose descent uses it (``uses_clean_gradient``) keep a copy, paired with its parameters.
        """
        if self.uses_clean_gradient:
            self.state.clean_params = list(params)
            self.state.clean = copy_into(self.state.clean, list(grads))

    def descent_(self, params: Sequence[Tensor]) -> None:
        """Adjust the descent gradient after the perturbed backward; default: nothing.

        Two-pass methods see it after each micro-batch's perturbed backward; single-pass methods once
        per update, before the finite check, with the summed gradient at ``w + e``.

        Args:
            params: every parameter of the step; ``p.grad`` is the perturbed gradient ``g_p`` (``None``
                where the perturbed pass did not reach ``p``). A method may write ``p.grad``, and
                give a gradient to a parameter that had none.
        """

    def plain_descent_(self, params: Sequence[Tensor]) -> None:
        """Adjust the gradients of a plain step in place; default: nothing.

        Args:
            params: the parameters with a gradient ``g`` now.
        """

    # ------------------------------------------------------------------ adaptive decision
    def wants_sam_(self, grad_norm: Tensor) -> bool:
        """For ``adaptive`` methods: after the clean backward, whether this step perturbs (``||g||`` given)."""
        return True

    # ------------------------------------------------------------------ state
    def bind_(self, params: Sequence[Tensor]) -> None:
        """Learn the parameters this method will see, in a stable order (the optimizer's).

        Called at the start of each fit (after a checkpoint was loaded) and whenever the optimizer's
        parameters change. Per-parameter state is checkpointed by position in this list.
        """

    def skip_(self) -> None:
        """The update of a SAM step was skipped or failed: forget what :meth:`descent_` stored; default: nothing."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint beyond the settings (LookSAM's stored direction); default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def figures(self) -> dict[str, float]:
        """Figures of the method itself to log with the step's (AE-SAM: the fraction of SAM steps)."""
        return {}
