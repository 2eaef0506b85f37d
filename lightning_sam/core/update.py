"""One SAM update of one optimizer: clean pass, ``e(w)``, perturbed pass, ``w`` restored, safety checks.

Pure torch (no Lightning import). The caller runs the passes its own way (the mixin through
Lightning's closure and strategy, :func:`lightning_sam.sam_step` through ``manual_backward``) and
hands them in as callables; this module owns what must be the same everywhere: which parameters
are perturbed and by how much, what is frozen during the perturbed pass, and what a skipped or
failed update puts back.

An update spans the micro-batches of one optimizer step:

1. :meth:`SAMUpdate.open_` (first micro-batch): read the optimizer's parameters, save the buffers,
   decide SAM or plain step;
2. per micro-batch of a SAM step, :meth:`SAMUpdate.passes_`: :meth:`SAMUpdate.ascend_` (clean
   backward at ``w``, then ``w <- w + e``) and :meth:`SAMUpdate.descend_` (perturbed pass, then
   ``w`` restored);
3. :meth:`SAMUpdate.close_` before the optimizer step: the plain step's descent, the finite check,
   the skip; :meth:`SAMUpdate.end_` after it, or :meth:`SAMUpdate.abort_` on an exception.

:meth:`SAMUpdate.step_` holds 1-3 in one ``with`` block (as :func:`lightning_sam.sam_step` uses it);
the mixin, whose update spans several of Lightning's hooks, guards each with :meth:`SAMUpdate.guarded`.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from lightning_sam.core.backup import BufferBackup, GradientStash, MetricStates, PassReplay, WeightBackup, same_tensors
from lightning_sam.core.groups import ParamGroup, check_param_groups, group_rho
from lightning_sam.core.layout import ModuleLayout
from lightning_sam.core.tensors import any_non_finite, global_norm, local

if TYPE_CHECKING:
    from lightning_sam.methods.base import Method

__all__ = ["SKIPPED_STEPS_KEY", "SAMStepStats", "SAMUpdate"]

SKIPPED_STEPS_KEY = "sam/skipped_steps"


class SAMStepStats(NamedTuple):
    """What the last SAM step measured, as 0-dim tensors on the model's device (no host sync).

    With gradient accumulation these are the last micro-batch's figures.
    """

    loss: Tensor | None
    """L(w), the clean loss (``None`` for single-pass methods: they never evaluate the loss at ``w``)."""
    perturbed_loss: Tensor | None
    """L(w + e), the loss at the perturbed weights (``None`` where the perturbed pass was the caller's own)."""
    grad_norm: Tensor | None
    """||g|| of the clean gradient, unscaled under AMP (for ASAM: ||T g||; Momentum-SAM: ||v||; RWP: None)."""
    eps_norm: Tensor
    """||e||, the length of the ascent step (at most rho)."""
    rho: float
    """The method's radius at this step."""

    @property
    def sharpness(self) -> Tensor | None:
        """L(w + e) - L(w) (``None`` without both losses)."""
        return None if self.loss is None or self.perturbed_loss is None else self.perturbed_loss - self.loss

    def as_dict(self) -> dict[str, Tensor | float]:
        """The figures under their logged names (those a single-pass step has no value for are left out)."""
        figures = {
            "sam/sharpness": self.sharpness,
            "sam/perturbed_loss": self.perturbed_loss,
            "sam/eps_norm": self.eps_norm,
            "sam/grad_norm": self.grad_norm,
            "sam/rho": self.rho,
        }
        return {k: v for k, v in figures.items() if v is not None}


def _joined(losses: list[Tensor]) -> list[Tensor]:
    """The losses as one new tensor (the check must not write to the caller's), promoted to a common dtype."""
    return [torch.cat([loss.reshape(-1) for loss in losses])] if losses else []


class SAMUpdate:
    """Runs the SAM updates of one optimizer and keeps what is needed to undo one.

    Args:
        method: the perturbation rule.

    Example::

        >>> import torch
        >>> from lightning_sam import SAM
        >>> net = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> loss_fn = lambda: torch.nn.functional.mse_loss(net(x), y)
        >>> def perturbed():
        ...     loss = loss_fn()
        ...     loss.backward()
        ...     return loss
        >>> update = SAMUpdate(SAM(rho=0.05))
        >>> update.bind_(net, opt)
        >>> with update.step_(0, opt):                 # an exception inside puts w and the buffers back
        ...     loss = loss_fn()
        ...     perturbed_loss = update.passes_(opt, loss, loss.backward, perturbed)  # w + e, g there, w back
        ...     skipped = update.close_(opt)           # the finite check: False, nothing to skip
        ...     opt.step()
        >>> skipped
        False
        >>> round(update.last.eps_norm.item(), 4)
        0.05
    """

    def __init__(self, method: Method) -> None:
        self.method = method
        self.last: SAMStepStats | None = None
        self.skipped_steps = 0  # non-finite losses or gradients (a GradScaler's overflow is its own)
        self._weights, self._buffers, self._stash = WeightBackup(), BufferBackup(), GradientStash()
        self._replay = PassReplay()
        self._layout: ModuleLayout | None = None
        self._params: list[Tensor] = []  # the optimizer's, in param-group order
        self._optimizer: weakref.ref[torch.optim.Optimizer] | None = None  # weak: no cycle through a front end's key
        self._end_state()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``torch.save(model)``) without the optimizer's weak reference or the step's backups.

        The next update reads the optimizer again; outside an update the backups hold nothing needed.
        """
        state = self.__dict__.copy()
        state["_optimizer"], state["_params"] = None, []
        if not self._open:
            state["_weights"], state["_buffers"], state["_stash"] = WeightBackup(), BufferBackup(), GradientStash()
            state["_replay"] = PassReplay()
        return state

    def _end_state(self) -> None:
        self._open = False
        self._sam = False
        self._ascended = False
        self._decided = False  # an adaptive method decided this update (its statistics moved)
        self._step = 0
        self._losses: list[Tensor] = []  # L(w) (or the single pass's loss), checked with the descent gradient
        self._perturbed_losses: list[Tensor] = []  # L(w + e) of the two-pass route, checked with them
        self._pending: tuple[Tensor, Tensor, Tensor, float] | None = None

    # ------------------------------------------------------------------ per fit
    def bind_(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        unfrozen_later: bool = False,
    ) -> None:
        """Look ``module`` and ``optimizer`` over (once per fit, after a checkpoint was loaded).

        ``total_steps``: the run's optimizer steps, if known (for methods that plan by it). The
        optimizer's parameters are read again at every update (:meth:`open_`), since param groups may
        be added or removed, and the optimizer replaced, during fit. ``unfrozen_later``: a callback
        unfreezes parameters during fit, so ``only=`` may select only frozen ones now.
        """
        self._layout = ModuleLayout.of(module, self.method, unfrozen_later=unfrozen_later)
        self._params, self._optimizer = [], None
        self._follow_(optimizer)
        self.method.plan_(total_steps)
        self._end_state()

    def unbind_(self) -> None:
        """Forget the binding (a new fit starts: bind again before its first update)."""
        self._layout = None

    @property
    def bound(self) -> bool:
        """Whether :meth:`bind_` ran."""
        return self._layout is not None

    def _follow_(self, optimizer: torch.optim.Optimizer) -> None:
        """The parameters ``optimizer`` holds now, in param-group order (the method rebinds when they change)."""
        check_param_groups(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._optimizer is None or optimizer is not self._optimizer() or not same_tensors(params, self._params):
            for p in params:
                if p.is_complex():
                    raise TypeError(f"SAM does not support complex parameters: the optimizer holds a {p.dtype} one.")
            self.method.check_optimizer(optimizer)
            self._params, self._optimizer = params, weakref.ref(optimizer)
            self.method.bind_(params)

    # ------------------------------------------------------------------ per update
    @property
    def is_open(self) -> bool:
        """Whether an update is under way."""
        return self._open

    @property
    def is_sam_step(self) -> bool:
        """Whether the open update is a SAM step (else a plain one)."""
        return self._sam

    def open_(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Start an update of ``optimizer`` at optimizer step ``step`` unless one is under way.

        What ``optimizer`` holds at this moment is what the update perturbs, sets aside, checks and restores.
        """
        assert self._layout is not None, "bind_ first"
        self._follow_(optimizer)  # also on later micro-batches: a group may be added between two of them
        if self._open:
            return
        self._buffers.save_(self._layout.buffers())
        self._sam = self.takes_sam_step(step, optimizer)
        self._step = step
        self._open = True

    def takes_sam_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the update at optimizer step ``step`` is a two-pass step (else a plain one).

        The method decides; with ``only=``, a step where none of the selected parameters the optimizer
        holds is trainable (a backbone frozen until a finetuning callback unfreezes it) is a plain step.
        """
        if not self.method.takes_sam_step(step):
            return False
        assert self._layout is not None, "bind_ first"
        selected = self._layout.selected
        if selected is None:
            return True
        self._follow_(optimizer)
        return any(p.requires_grad and id(p) in selected for p in self._params)

    def begin_clean_(self, buffers: bool = True) -> None:
        """Before the clean forward of a two-pass micro-batch: note the random generators and the buffers.

        The perturbed pass (:meth:`descend_`) starts from them again: the same dropout masks and
        augmentations, the buffers as the clean forward found them. ``buffers=False``: the buffers are
        noted later, by :meth:`begin_clean_forward_` (from inside the forward, after DDP broadcast them).
        """
        assert self._layout is not None, "bind_ first"
        self._replay.mark_(self._layout.buffers() if buffers else None)

    def begin_clean_forward_(self) -> None:
        """Note the buffers the clean forward starts from (see :meth:`begin_clean_`)."""
        assert self._layout is not None, "bind_ first"
        self._replay.mark_buffers_(self._layout.buffers())

    def note_loss(self, loss: Tensor) -> None:
        """Count a plain micro-batch's loss in the finite check."""
        self._losses.append(loss.detach())

    @torch.no_grad()
    def ascend_(
        self,
        optimizer: torch.optim.Optimizer,
        loss: Tensor | None,
        backward: Callable[[], Any] | None,
        lr: float | None = None,
        any_rank: Callable[[bool], bool] = bool,
        loss_scale: Tensor | float | None = None,
    ) -> bool:
        """The clean backward at ``w`` (``backward()``; ``loss`` is ``L(w)``), then ``w <- w + e(w)``.

        The gradients of earlier micro-batches are set aside first, so ``e`` comes from this
        micro-batch's own gradient. An ``adaptive`` method may decide here, from ``||g||``, that this
        is a plain step (every replica asked through ``any_rank``): then nothing is perturbed, the
        clean gradient is the descent gradient (the earlier sums added back) and this returns False.
        ``loss_scale``: the AMP scale of the clean backward (``||g||`` is seen and reported unscaled).
        ``backward=None``: the clean gradient is in ``.grad`` already (a loop that ran the backward itself;
        nothing is set aside); ``loss=None``: the caller checks no loss.
        """
        if backward is not None:
            self._stash.take_(self._params)
            with torch.enable_grad():
                backward()
        if loss is not None:
            self._losses.append(loss.detach())
        params = [p for p in self._params if p.grad is not None]
        grads = [p.grad for p in params]
        unscale = (lambda norm: norm / loss_scale) if loss_scale is not None else (lambda norm: norm)
        if self.method.adaptive:
            wants = self.method.wants_sam_(unscale(global_norm(grads)))
            self._decided = True
            if not any_rank(wants):
                self._stash.add_back_(self._params)
                self._replay.discard()  # no perturbed pass
                return False
        self.method.clean_gradient_(params, grads)
        rho = self.method.rho_at(self._step, lr)
        groups = self._groups(optimizer, rho, params, grads)
        ascent = self.method.ascent_(groups)
        self._weights.perturb_(groups, ascent.scales)  # w <- w + e
        self._ascended = True
        self._pending = (None if loss is None else loss.detach(), unscale(ascent.grad_norm), ascent.eps_norm, rho)
        return True

    def descend_(self, run: Callable[[], Tensor]) -> Tensor:
        """The perturbed pass at ``w + e``, then ``w`` restored bit for bit; returns ``L(w + e)``.

        Args:
            run: does the perturbed forward and backward and returns ``L(w + e)``. It starts from the
                random generators and buffers noted by :meth:`begin_clean_` (the same dropout masks);
                the buffers it changes (BatchNorm statistics) and torchmetrics states are put back
                afterwards; its gradients add to those of the earlier micro-batches.
        """
        self.begin_perturbed_()
        try:
            with self._replayed(), torch.enable_grad():
                perturbed_loss = run()
        except BaseException:
            self._weights.restore_()  # w <- saved w
            raise
        self.end_perturbed_(perturbed_loss)
        return perturbed_loss

    def begin_perturbed_(self, keep_gradients: bool = False) -> None:
        """Before a perturbed pass the caller runs itself: the gradients of earlier micro-batches are given back.

        A parameter without an earlier sum gets no gradient (the clean one is dropped), unless
        ``keep_gradients`` (the perturbed backward then adds to the clean gradient, as davda54/sam's
        ``first_step(zero_grad=False)`` does).
        """
        assert self._pending is not None, "ascend_ first"
        if not keep_gradients:
            self._stash.give_back_(self._params)

    def end_perturbed_(self, perturbed_loss: Tensor | None = None) -> None:
        """After the perturbed backward: ``w`` restored bit for bit, the method's descent, the step's figures."""
        assert self._pending is not None, "ascend_ first"
        self._weights.restore_()  # w <- saved w
        self.method.descent_(self._params)
        loss, grad_norm, eps_norm, rho = self._pending
        self.last = SAMStepStats(loss, None if perturbed_loss is None else perturbed_loss.detach(), grad_norm,
                                 eps_norm, rho)  # fmt: skip
        if perturbed_loss is not None:
            self._perturbed_losses.append(perturbed_loss.detach())

    # ------------------------------------------------------------------ the single-pass route
    @torch.no_grad()
    def perturb_(self, optimizer: torch.optim.Optimizer, lr: float | None = None) -> bool:
        """Single-pass methods, before the forward: ``w <- w + e`` from what is known already.

        Momentum-SAM's ``e`` comes from the optimizer's momentum, RWP's is random. The forward and
        backward that follow see ``w + e``; :meth:`unperturb_` puts ``w`` back after the backward.
        Returns False when the method perturbs nothing at this step (Momentum-SAM before the
        optimizer has a momentum): the step is then an ordinary one.
        """
        assert self._layout is not None, "bind_ first"
        rho = self.method.rho_at(self._step, lr)
        selected = self._layout.selected
        params = [p for p in self._params if p.requires_grad and (selected is None or id(p) in selected)]
        groups = self._groups(optimizer, rho, params, [], with_grads=False)
        found = self.method.perturbation_(groups, optimizer, self._step)
        if found is None:
            return False
        directions, ascent = found
        self._weights.perturb_(directions, ascent.scales, keep_directions=True)  # w <- w + e
        self._ascended = True
        self._pending = (None, ascent.grad_norm, ascent.eps_norm, rho)
        return True

    def unperturb_(self, loss: Tensor | None) -> None:
        """Single-pass methods, after the backward at ``w + e``: ``w`` restored bit for bit.

        ``loss``: ``L(w + e)``, or ``None`` when the caller ran the pass itself and checks no loss.
        """
        self._weights.restore_()
        if loss is not None:
            self._losses.append(loss.detach())
        if self._pending is not None:
            _, grad_norm, eps_norm, rho = self._pending
            self.last = SAMStepStats(None, None if loss is None else loss.detach(), grad_norm, eps_norm, rho)

    def restore_(self) -> None:
        """Single-pass methods: ``w`` back after a pass that had no backward (a ``training_step`` returning None)."""
        self._weights.restore_()

    def swap_weights_(self) -> None:
        """Exchange the weights and their saved copy, bit for bit: ``w + e`` <-> ``w``.

        For a loop that looks at ``w`` between single-pass steps, then goes on at the same ``w + e``.
        """
        self._weights.swap_()

    def single_pass_(
        self, optimizer: torch.optim.Optimizer, run: Callable[[], Tensor], lr: float | None = None
    ) -> Tensor:
        """The single pass in one call: :meth:`perturb_`, ``run()`` (forward, backward, loss), :meth:`unperturb_`.

        An exception in ``run`` leaves ``w`` as it was.
        """
        self.perturb_(optimizer, lr)
        try:
            with torch.enable_grad():
                loss = run()
        except BaseException:
            self._weights.restore_()
            raise
        self.unperturb_(loss)
        return loss

    @torch.no_grad()
    def close_(
        self,
        optimizer: torch.optim.Optimizer,
        any_rank: Callable[[bool], bool] = bool,
        scaler: bool = False,
        loss_scale: Tensor | float | None = None,
    ) -> bool:
        """End the update before the optimizer step; return whether it was skipped.

        Runs a plain step's descent, then the step's one host sync: whether a loss or the descent
        gradient is not finite (``any_rank`` makes every replica agree). A skipped update puts the
        buffers back, counts in ``skipped_steps`` and leaves the gradients such that the optimizer
        step changes nothing: none (torch's optimizers skip parameters without one), or, under a
        GradScaler (``scaler``), a NaN, so that it skips the step and lowers its scale. Under a
        GradScaler, non-finite gradients with a finite clean loss are an fp16 overflow: the scaler's
        own skip, as in plain training (the buffers keep the clean pass's update; not counted).
        ``loss_scale``: the AMP scale the gradients carry, for a method whose descent reads their
        size (``Method.descent_unscales``).
        """
        params = [p for p in self._params if p.grad is not None]
        if self._open and not self._sam:
            self.method.plain_descent_(params)
        elif self._ascended and self.method.single_pass:  # once per update, the summed gradient (RWP's statistics)
            if self.method.descent_unscales:
                self.method.descent_(params, grad_scale=loss_scale)  # type: ignore[call-arg]
            else:
                self.method.descent_(params)
        grads = [p.grad for p in params]
        losses = [*self._losses, *self._perturbed_losses]
        skip = any_rank(bool(any_non_finite([*grads, *_joined(losses)])))
        if skip:
            if scaler and not any_rank(bool(any_non_finite(_joined(self._losses)))):
                self._overflow(grads)  # finite losses at w: the GradScaler's overflow, its own skip
            else:
                self._skip(optimizer, grads, scaler)
        return skip

    def passes_(
        self,
        optimizer: torch.optim.Optimizer,
        loss: Tensor,
        clean_backward: Callable[[], Any],
        perturbed_pass: Callable[[], Tensor],
        *,
        lr: float | None = None,
        any_rank: Callable[[bool], bool] = bool,
        loss_scale: Tensor | float | None = None,
        on_plain_step: Callable[[], None] | None = None,
    ) -> Tensor | None:
        """The two passes of one micro-batch: :meth:`ascend_` then :meth:`descend_`; returns ``L(w + e)``.

        When an ``adaptive`` method chooses a plain step after the clean backward, nothing is
        perturbed, ``on_plain_step()`` runs (the caller averages a clean gradient it kept local) and
        this returns ``None``.
        """
        if self.ascend_(optimizer, loss, clean_backward, lr=lr, any_rank=any_rank, loss_scale=loss_scale):
            return self.descend_(perturbed_pass)
        if on_plain_step is not None:
            on_plain_step()
        return None

    @contextmanager
    def guarded(self) -> Iterator[None]:
        """Inside: an exception puts weights and buffers back to where the update started (:meth:`abort_`)."""
        try:
            yield
        except BaseException:
            self.abort_()
            raise

    @contextmanager
    def step_(self, step: int, optimizer: torch.optim.Optimizer) -> Iterator[SAMUpdate]:
        """One whole update in one block: :meth:`open_`; then inside, the passes, :meth:`close_` and the optimizer step.

        :meth:`end_` follows the block, or :meth:`abort_` an exception inside it (which then propagates).
        """
        with self.guarded():
            self.open_(step, optimizer)
            yield self
        self.end_()

    def unperturbed(self) -> dict[int, Tensor]:
        """While the weights are at ``w + e`` (a checkpoint written from a signal handler): the saved ``w`` by id."""
        return self._weights.unperturbed()

    def end_(self) -> None:
        """The optimizer step is done: forget the backups (their storage is kept)."""
        self._weights.discard()
        self._buffers.discard()
        self._stash.discard()
        self._replay.discard()
        self._end_state()

    def abort_(self) -> None:
        """An exception: put weights and buffers back to where the update started, then forget it.

        The saved ``w`` is held until :meth:`end_`, so this also undoes an optimizer step that raised
        half-way, for the perturbed parameters.
        """
        self._weights.restore_()
        if self._open:
            self._buffers.restore_(self._layout.buffers() if self._layout else None)
        self._forget_step_()
        self.end_()

    # ------------------------------------------------------------------ internals
    def _forget_step_(self) -> None:
        """The update does not step: the method forgets what it found or decided in it (``Method.skip_``)."""
        if self._ascended or self._decided:
            self.method.skip_()

    def _overflow(self, grads: list[Tensor]) -> None:
        """An fp16 overflow under a GradScaler: it skips the step and lowers its scale, as in plain training.

        The buffers keep the clean pass's update (plain training's keep its forward's), and the skip is
        the scaler's routine, not counted in ``skipped_steps``; the method forgets what this step found.
        """
        self._forget_step_()
        if grads and not bool(any_non_finite(grads)):  # only another replica overflowed: this one skips too
            local(grads[:1])[0].fill_(float("nan"))

    def _skip(self, optimizer: torch.optim.Optimizer, grads: list[Tensor], scaler: bool) -> None:
        self._buffers.restore_(self._layout.buffers() if self._layout else None)
        self._forget_step_()
        self.skipped_steps += 1
        if self.skipped_steps == 1:
            warnings.warn(
                f"SAM skipped the update at global step {self._step}: a loss or gradient was not finite. Weights, "
                "buffers and optimizer state are unchanged; later skips are counted in "
                f"`{SKIPPED_STEPS_KEY}` without a warning.",
                RuntimeWarning,
                stacklevel=3,
            )
        if scaler and grads:
            local(grads[:1])[0].fill_(float("nan"))
        else:
            optimizer.zero_grad(set_to_none=True)

    def _groups(
        self,
        optimizer: torch.optim.Optimizer,
        rho: float,
        params: list[Tensor],
        grads: list[Tensor],
        with_grads: bool = True,
    ) -> list[ParamGroup]:
        """The groups to perturb: their rho (scheduled), and their selected parameters with gradients.

        ``params``: the optimizer's parameters with a gradient, in order; ``grads``: those gradients.
        ``with_grads=False`` (single-pass methods, before the forward): ``params`` are the selected
        trainable parameters, and each group's ``grads`` is empty.
        """
        if not with_grads:
            chosen = {id(p) for p in params}
            found = []
            for group in optimizer.param_groups:
                group_params = [p for p in group["params"] if id(p) in chosen]
                if group_params:
                    radius = group_rho(optimizer, group, self.method.radius)
                    found.append(ParamGroup(radius * self._scale(rho), group_params, []))
            return found
        assert self._layout is not None
        selected = self._layout.selected
        radius = self.method.radius
        scale = self._scale(rho)
        if len(optimizer.param_groups) == 1 and selected is None:  # the common case: nothing to filter
            own = group_rho(optimizer, optimizer.param_groups[0], radius) * scale
            return [ParamGroup(own, params, grads)] if params else []
        groups = []
        for group in optimizer.param_groups:
            # a group with rho 0 is not perturbed, but its gradient counts in the global ||g||
            own = group_rho(optimizer, group, radius) * scale
            params = [p for p in group["params"] if p.grad is not None and (selected is None or id(p) in selected)]
            if params:
                groups.append(ParamGroup(own, params, [p.grad for p in params]))
        return groups

    def _scale(self, rho: float) -> float:
        """A schedule scales every group's rho alike: the scheduled radius over the method's own."""
        radius = self.method.radius
        return rho / radius if radius else 1.0

    @contextmanager
    def _replayed(self) -> Iterator[None]:
        """From the clean pass's start (generators, buffers); then the buffers and torchmetrics as it left them."""
        assert self._layout is not None
        metrics = MetricStates(self._layout.metrics)
        self._replay.enter_(self._layout.buffers())
        try:
            yield
        finally:
            self._replay.exit_(self._layout.buffers())
            metrics.restore()
