"""SAM for plain PyTorch loops: an optimizer wrapper with davda54/sam's API, on the same core as the mixin.

Code written for davda54/sam (``from sam import SAM``) changes one import::

    from lightning_sam.optim import SAM

and gets, beyond that file: ``w`` restored from a saved copy (bit for bit, not ``p.data`` rebinding), a
non-finite loss or gradient skipping the update with nothing changed, an exception inside
:meth:`SAM.step` putting ``w`` back, every method of this package (``method=``), ``only=``, param-group
``"rho"``, and the base optimizer's state in :meth:`SAM.state_dict`.

Three ways to call it:

- davda54's two calls around your own passes: ``loss.backward(); opt.first_step(zero_grad=True)``, the
  perturbed forward and backward, ``opt.second_step(zero_grad=True)``;
- one call per step, ``opt.step(closure)`` (``closure`` does a forward and a backward and returns the
  loss): if no gradient is there yet, the closure runs for the clean pass too (else the gradient there
  is the clean one, as in davda54's ``step``);
- single-pass methods (:class:`~lightning_sam.MomentumSAM`, :class:`~lightning_sam.RWP`) with ``opt.step()``
  and no closure: each ``step()`` puts ``w`` back, steps, and moves the weights to ``w + e`` for the next
  forward. Between steps the model therefore holds ``w + e``: validate inside ``with opt.unperturbed():``
  (``w`` there, ``w + e`` again after), and call :meth:`SAM.restore` when training ends.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_sam._compat import tensor_version
from lightning_sam.core.tensors import any_non_finite
from lightning_sam.core.update import SAMStepStats, SAMUpdate
from lightning_sam.methods import ASAM as _ASAM
from lightning_sam.methods import SAM as _SAMMethod
from lightning_sam.methods import Method

__all__ = ["SAM"]


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any torch optimizer, for a plain PyTorch loop (davda54/sam's API).

    Args:
        params: the parameters (or param groups; a group may carry its own ``"rho"``, or ``"sam_rho"``
            for a base optimizer with a ``rho`` of its own, such as Adadelta's decay rate).
        base_optimizer: the optimizer class, built over the same param groups with ``**kwargs``
            (``torch.optim.SGD``); the instance is :attr:`base_optimizer`.
        rho: the radius (davda54's ``rho``).
        adaptive: ASAM with ``eta = 0``, davda54's adaptive mode (``e = rho w^2 g / ||w g||``).
        method: any method of this package instead (``rho`` and ``adaptive`` are then unused):
            ``GSAM(...)``, ``MomentumSAM(...)``, ``RWP(...)``, ...
        module: the model, if its buffers (BatchNorm statistics) should be updated by the clean pass of
            ``step(closure)`` only (torchmetrics states put back) and a skip should put its buffers back as
            they were before the step's first training forward (a forward pre-hook notes when that is);
            davda54's file leaves them to you.
        **kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...).

    Example::

        >>> import torch
        >>> from lightning_sam.optim import SAM
        >>> model = torch.nn.Linear(4, 1)
        >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)                     # both passes; w restored; the SGD step
        >>> opt.zero_grad()
        >>> round(opt.last_step.eps_norm.item(), 4)
        0.05
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        method: Method | None = None,
        module: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if method is not None and not isinstance(method, Method):
            raise TypeError(f"Expected `method` to be a method object of lightning_sam, got {method!r}.")
        if method is None:
            method = _ASAM(rho, eta=0.0) if adaptive else _SAMMethod(rho)  # checks rho
        # the groups carry SAM's radius as davda54's do ("rho"), or as "sam_rho" for an optimizer with a rho of
        # its own (Adadelta's decay rate), which would read SAM's as its own
        try:
            own_rho = "rho" in inspect.signature(base_optimizer).parameters
        except (TypeError, ValueError):  # a callable without a signature
            own_rho = False
        super().__init__(params, {"sam_rho" if own_rho else "rho": method.radius, "adaptive": adaptive, **kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.method = method
        self.module = module
        self._update = SAMUpdate(method)
        self._steps = 0
        self._ascended = False
        self._seen: list[tuple[weakref.ref[torch.Tensor], int]] = []  # the gradients the last step ended with
        if module is not None:  # the buffers as they are before the clean forward, for a skip to put back
            module.register_forward_pre_hook(_opens_before_training_forward(weakref.ref(self)))

    # ------------------------------------------------------------------ what a step reports
    @property
    def last_step(self) -> SAMStepStats | None:
        """The figures of the last two-pass or single-pass step (``None`` before the first)."""
        return self._update.last

    @property
    def skipped_steps(self) -> int:
        """How many updates were skipped for a non-finite loss or gradient."""
        return self._update.skipped_steps

    # ------------------------------------------------------------------ davda54's two calls
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """``w <- w + e(w)`` from the gradient in ``.grad`` (the clean backward is yours, before this call).

        ``zero_grad=True`` clears the clean gradient for the perturbed backward; with ``False`` (davda54's
        default) the perturbed gradient is added to it, as in davda54's file.
        """
        self._require_two_passes("first_step")
        if self._update.unperturbed():  # a first_step whose second_step never came (its pass raised): undo it
            self._update.abort_()
        update = self._open()
        lr = self.param_groups[0]["lr"]
        self._ascended = update.is_sam_step and update.ascend_(self.base_optimizer, None, None, lr=lr)
        if self._ascended:
            update.begin_perturbed_(keep_gradients=not zero_grad)
        elif zero_grad:  # a plain step (interval, an adaptive method's choice): the next backward is at w
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            if grads:  # the clean gradient is dropped, but a non-finite one still skips the step (no host sync)
                update.note_loss(torch.where(any_non_finite(grads), float("nan"), 0.0))
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> bool:
        """``w`` back from its saved copy, the finite check, the base optimizer's step; True if it was skipped."""
        self._require_two_passes("second_step")
        update = self._update
        if not update.is_open:
            raise RuntimeError("`second_step` without `first_step`: call first_step after the clean backward.")
        with update.guarded():
            if self._ascended:
                update.end_perturbed_()
            skipped = self._finish()
        if zero_grad:
            self.zero_grad()
        return skipped

    # ------------------------------------------------------------------ one call per step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One whole SAM step; returns the clean loss (``closure``'s, or ``None`` when its clean pass was yours).

        Two-pass methods need ``closure`` (a forward and a backward, returning the loss): if no gradient
        is there yet it runs for the clean pass too. Single-pass methods take no closure: the forward and
        backward you just ran were at ``w + e``; this puts ``w`` back, steps, and perturbs for the next one.
        """
        if self.method.single_pass:
            return self._single_pass_step(closure)
        if closure is None:
            raise TypeError(
                f"{type(self.method).__name__} takes two passes a step: give `step` a closure (a forward and a "
                "backward, returning the loss), or call first_step/second_step around your own passes."
            )
        run = torch.enable_grad()(closure)
        update = self._open()
        loss = None
        with update.guarded():
            if not self._fresh_gradients():  # the clean pass is ours too
                self.zero_grad()
                if update.is_sam_step:
                    update.begin_clean_()  # the perturbed pass draws the same random numbers, from the same buffers
                loss = run()
            if update.is_sam_step and update.ascend_(self.base_optimizer, loss, None, lr=self.param_groups[0]["lr"]):
                update.descend_(run)
            elif loss is not None:
                update.note_loss(loss)
            self._finish()
        return loss

    # ------------------------------------------------------------------ single-pass methods
    @torch.no_grad()
    def _single_pass_step(self, closure: Callable[[], Any] | None) -> Any:
        if closure is not None:  # the whole pass in the call: perturb, closure at w + e, restore, step
            update = self._open()
            with update.guarded():
                run, lr = torch.enable_grad()(closure), self.param_groups[0]["lr"]
                loss = update.single_pass_(self.base_optimizer, run, lr=lr)
                self._finish()
            return loss
        update = self._update
        if not update.is_open:  # the first step: its forward and backward were at w
            update = self._open()
        with update.guarded():  # the forward and backward just run were at w + e (or w): w back, the step
            update.unperturb_(None)  # the pass was yours: its loss is not seen here
            self._finish()
        update = self._open()  # the next update: w + e for the next forward
        with update.guarded():
            if update.is_sam_step:
                update.perturb_(self.base_optimizer, lr=self.param_groups[0]["lr"])
        return None

    @contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Single-pass methods: ``w`` inside (validation, checkpoints), ``w + e`` again after."""
        update = self._update
        moved = update.is_open and self.method.single_pass and bool(update.unperturbed())
        if moved:
            update.swap_weights_()
        try:
            yield
        finally:
            if moved:  # the same w + e again, bit for bit
                update.swap_weights_()

    @torch.no_grad()
    def restore(self) -> None:
        """Single-pass methods: put ``w`` back for good (training ends); the pending update is dropped."""
        if self._update.is_open:
            self._update.restore_()
            self._update.end_()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and groups, and this wrapper's (the method's state, the step count)."""
        state = self.base_optimizer.state_dict()
        state["lightning_sam"] = {"method": self.method.state_dict(), "steps": self._steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (or a plain state dict of the base optimizer)."""
        state = dict(state_dict)
        ours = state.pop("lightning_sam", None)
        if self._update.is_open:  # a pending single-pass perturbation is dropped, not undone: load the model too
            self._update.end_()
        kept = [{k: g[k] for k in ("rho", "sam_rho", "adaptive") if k in g} for g in self.param_groups]
        self.base_optimizer.load_state_dict(state)
        self.param_groups = self.base_optimizer.param_groups
        for group, extra in zip(self.param_groups, kept):  # a plain state dict has no "rho": keep the groups' own
            for key, value in extra.items():
                group.setdefault(key, value)
        if ours is not None:
            self.method.load_state_dict(ours["method"])
            self._steps = int(ours["steps"])

    # ------------------------------------------------------------------ internals
    def _open(self) -> SAMUpdate:
        update = self._update
        if not update.bound:
            update.bind_(self.module if self.module is not None else nn.Module(), self.base_optimizer)
        update.open_(self._steps, self.base_optimizer)  # it holds the groups and the state (the momentum)
        return update

    def _finish(self) -> bool:
        update = self._update
        skipped = update.close_(self.base_optimizer)
        self.base_optimizer.step()  # with no gradient left after a skip, torch's optimizers change nothing
        update.end_()
        self._steps += 1
        self._seen = [(weakref.ref(p.grad), tensor_version(p.grad)) for p in self._params() if p.grad is not None]
        return skipped

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _fresh_gradients(self) -> bool:
        """Whether ``.grad`` holds gradients from a backward since the last step (not the last step's own)."""
        grads = [p.grad for p in self._params() if p.grad is not None]
        if not grads:
            return False
        seen = self._seen
        stale = len(grads) == len(seen) and all(
            ref() is g and tensor_version(g) == v for g, (ref, v) in zip(grads, seen)
        )
        return not stale

    def _require_two_passes(self, name: str) -> None:
        if self.method.single_pass:
            name_ = type(self.method).__name__
            raise TypeError(f"{name_} takes one pass a step: call `step()` after its backward, not `{name}`.")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad`` (the groups are shared)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)


def _opens_before_training_forward(ref: weakref.ref[SAM]) -> Callable[..., None]:
    """A forward pre-hook: the first training forward of a step opens the update (its buffers are saved then).

    It holds the optimizer weakly (a deep copy of the model shares the hook and keeps no optimizer alive).
    """

    def hook(module: nn.Module, args: Any) -> None:
        optimizer = ref()
        if optimizer is not None and module.training and torch.is_grad_enabled() and not optimizer._update.is_open:
            optimizer._open()

    return hook
