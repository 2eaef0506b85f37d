"""What a SAM step saves to undo: weights, buffers, torchmetrics states, accumulated gradients, random draws.

Pure torch (and torchmetrics for metric states). Restoring always copies saved tensors back:
``(w + e) - e`` is not ``w`` in floating point, and rebinding ``.data`` breaks FSDP views.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from operator import is_not
from typing import Any

import torch
from torch import Tensor

from lightning_sam._compat import metric_counters, set_metric_counters
from lightning_sam.core.groups import ParamGroup
from lightning_sam.core.tensors import add_scaled_, copy_into, local

__all__ = [
    "BufferBackup",
    "GradientStash",
    "MetricStates",
    "PassReplay",
    "RandomStates",
    "WeightBackup",
    "same_tensors",
]


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
        self._perturbed = False

    def perturb_(self, groups: Sequence[ParamGroup], scales: Sequence[Tensor], keep_directions: bool = False) -> None:
        """Save ``w``, then ``w <- w + scale * direction`` per group (see :meth:`SAM.ascent_`).

        Groups with ``rho == 0`` stay where they are (their gradients only count in ``||g||``).

        On CPU the scale is read to the host, which is free there and saves a pass over the
        gradients; elsewhere the direction is scaled in place, without a host sync, unless
        ``keep_directions`` (the direction is state the step must not change: Momentum-SAM's momentum).
        """
        pairs = [(g, s) for g, s in zip([g for g in groups if g.grads], scales) if g.rho > 0]  # rho 0: w stays
        params = local([p for g, _ in pairs for p in g.params])
        if not same_tensors(params, self._params):
            self._params = params
            self._saved = [torch.empty_like(p) for p in params]
        if not params:
            return
        with torch.no_grad():
            torch._foreach_copy_(self._saved, params)
            self._holds_copy = self._perturbed = True
            for group, scale in pairs:
                add_scaled_(group.params, group.grads, scale, keep_sources=keep_directions)  # w <- w + e
        _forget_autocast_casts()

    def restore_(self) -> None:
        """``w <- saved w``; does nothing when no copy is held."""
        if self._holds_copy and self._params:
            with torch.no_grad():
                torch._foreach_copy_(self._params, self._saved)
            _forget_autocast_casts()
        self._perturbed = False

    def swap_(self) -> None:
        """Exchange the weights and the saved copy (``w + e`` and ``w``), bit for bit; twice is a no-op.

        One tensor's worth of extra memory at a time. Nothing happens when no copy is held.
        """
        if not (self._holds_copy and self._params):
            return
        with torch.no_grad():
            for p, saved in zip(self._params, self._saved):
                held = p.clone()
                p.copy_(saved)
                saved.copy_(held)
        self._perturbed = not self._perturbed
        _forget_autocast_casts()

    def unperturbed(self) -> dict[int, Tensor]:
        """While the weights are at ``w + e``: ``{id(parameter): its saved w}``; else empty."""
        return {id(p): s for p, s in zip(self._params, self._saved)} if self._perturbed else {}

    def discard(self) -> None:
        """Forget the copy (the step is over); the buffer is kept for the next step."""
        self._holds_copy = self._perturbed = False


class BufferBackup:
    """A copy of a module's buffers (BatchNorm statistics), to undo a skipped or failed update.

    Example::

        >>> bn = torch.nn.BatchNorm1d(2)
        >>> backup = BufferBackup()
        >>> backup.save_(list(bn.buffers()))
        >>> _ = bn(torch.randn(4, 2))                  # the running statistics move
        >>> backup.restore_()
        >>> bn.running_mean, int(bn.num_batches_tracked)
        (tensor([0., 0.]), 0)
    """

    def __init__(self) -> None:
        self._buffers: list[Tensor] = []
        self._saved: list[Tensor] = []
        self._valid = False

    def save_(self, buffers: list[Tensor]) -> None:
        """Copy ``buffers`` (the storage is reused while they stay the same tensors)."""
        if not same_tensors(buffers, self._buffers):
            self._buffers = buffers
            self._saved = [torch.empty_like(b) for b in buffers]
        if buffers:
            torch._foreach_copy_(self._saved, buffers)
        self._valid = True

    def restore_(self, into: list[Tensor] | None = None) -> None:
        """Copy the saved values back (nothing when none are held).

        ``into``: the buffers as the module holds them now, where a forward replaced some since the save
        (the values go into the module's current tensors, where their shapes still match).
        """
        if not (self._valid and self._buffers):
            return
        targets = self._buffers
        if into is not None and len(into) == len(self._saved) and not same_tensors(into, self._buffers):
            targets = [now if now.shape == saved.shape else then
                       for now, then, saved in zip(into, self._buffers, self._saved)]  # fmt: skip
        torch._foreach_copy_(targets, self._saved)

    def discard(self) -> None:
        """Forget the copy; the storage is kept for the next update."""
        self._valid = False


class RandomStates:
    """The global random generators a ``training_step`` draws from, to draw the same numbers again.

    Torch's (CPU, and the current CUDA device if CUDA is in use), Python's ``random`` and NumPy's
    legacy global one (if NumPy is imported). A generator the user made (``torch.Generator``,
    ``numpy.random.default_rng``) is not seen.

    Example::

        >>> states = RandomStates()
        >>> first = torch.rand(2)
        >>> states.restore_()
        >>> torch.equal(torch.rand(2), first)           # the same draws again
        True
    """

    def __init__(self) -> None:
        self._torch = torch.get_rng_state()
        self._cuda = (torch.cuda.current_device(), torch.cuda.get_rng_state()) if torch.cuda.is_initialized() else None
        self._python = random.getstate()
        numpy = sys.modules.get("numpy")  # not imported: nothing can draw from it
        self._numpy = numpy.random.get_state() if numpy is not None else None  # the state only: it pickles

    def restore_(self) -> None:
        """Put every generator back to where it was when this object was made."""
        torch.set_rng_state(self._torch)
        if self._cuda is not None:
            device, state = self._cuda
            torch.cuda.set_rng_state(state, device)
        random.setstate(self._python)
        if self._numpy is not None:
            sys.modules["numpy"].random.set_state(self._numpy)


class PassReplay:
    """The perturbed pass starts where the clean pass started, and leaves the buffers as the clean pass did.

    :meth:`mark_` (before the clean forward) notes the random generators and the buffers;
    :meth:`enter_` (before the perturbed forward) keeps the buffers as the clean pass left them, then
    puts back the generators (the same dropout masks and augmentations: the loss is the same function at
    ``w + e``, as in the paper's code) and the buffers; :meth:`exit_` (after the perturbed backward) puts
    back the buffers and the generators as the clean pass (and what ran after it) left them. Buffers
    are updated at ``w`` only, once per micro-batch (BatchNorm statistics, spectral norm's vectors, a
    running mean of the user's, updated in place), and with ``rho = 0`` the step is plain training's,
    draw for draw. Without a :meth:`mark_` (a caller whose clean pass is not seen) the perturbed pass
    starts from where the clean pass left things.

    Example::

        >>> bn = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(3))
        >>> buffers, x, replay = list(bn.buffers()), torch.randn(8, 3), PassReplay()
        >>> replay.mark_(buffers)
        >>> clean = bn(x)
        >>> after_clean = bn[1].running_mean.clone()
        >>> replay.enter_(buffers)
        >>> torch.equal(bn(x), clean)                   # the same dropout mask, the same statistics
        True
        >>> replay.exit_()
        >>> torch.equal(bn[1].running_mean, after_clean)   # updated once
        True
    """

    def __init__(self) -> None:
        self._random: RandomStates | None = None
        self._random_after: RandomStates | None = None
        self._start, self._after = BufferBackup(), BufferBackup()

    def mark_(self, buffers: list[Tensor] | None) -> None:
        """Before the clean forward: note the generators, and the buffers (``None``: :meth:`mark_buffers_` later)."""
        self._random = RandomStates()
        if buffers is not None:
            self._start.save_(buffers)

    def mark_buffers_(self, buffers: list[Tensor]) -> None:
        """Note the buffers the clean forward starts from (under DDP: after it broadcast rank 0's)."""
        self._start.save_(buffers)

    def enter_(self, buffers: list[Tensor]) -> None:
        """Before the perturbed forward: keep the buffers and generators as they are, then go back to the mark."""
        self._after.save_(buffers)
        if self._random is not None:
            self._random_after = RandomStates()  # where the clean pass, and the hooks after it, left them
            self._start.restore_(buffers)
            self._random.restore_()

    def exit_(self, buffers: list[Tensor] | None = None) -> None:
        """After the perturbed pass (or its exception): buffers and generators as the clean pass left them.

        ``buffers``: the module's buffers now (the perturbed forward may have replaced some).
        """
        self._after.restore_(buffers)
        if self._random_after is not None:
            self._random_after.restore_()
        self.discard()

    def discard(self) -> None:
        """Forget what was noted (the storage is kept)."""
        self._random = self._random_after = None
        self._start.discard()
        self._after.discard()


class MetricStates:
    """The states of torchmetrics ``Metric`` objects, so that a second forward pass counts nothing.

    Metrics in a ``MetricCollection``'s compute group share their state tensors; shared tensors are
    copied once and put back shared.
    """

    def __init__(self, metrics: Sequence[Any]) -> None:
        copies: dict[int, Any] = {}

        def copy(value: Any) -> Any:
            if id(value) not in copies:
                copies[id(value)] = value.clone() if isinstance(value, Tensor) else list(value)
            return copies[id(value)]

        self._saved = [(m, {k: copy(v) for k, v in m.metric_state.items()}, metric_counters(m)) for m in metrics]

    def restore(self) -> None:
        """Put every metric back as it was when this object was made."""
        for metric, state, counters in self._saved:
            for name, value in state.items():
                setattr(metric, name, value)
            set_metric_counters(metric, counters)


class GradientStash:
    """The gradients summed over the earlier micro-batches of an update, set aside per parameter.

    The clean pass of each micro-batch needs its own gradient (for its own ``e``); the descent
    gradients add up. :meth:`take_` moves the sums out of ``.grad`` before the clean backward,
    :meth:`give_back_` puts them back before the perturbed backward, which adds to them. A
    parameter without a sum gets no gradient (``None``), so one the perturbed pass does not reach
    stays without one, as torch's optimizers expect.

    Example::

        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> w.grad = torch.full((2,), 3.0)
        >>> stash = GradientStash()
        >>> stash.take_([w]); w.grad is None
        True
        >>> (2 * w).sum().backward()                   # a clean gradient of its own
        >>> stash.give_back_([w]); w.grad
        tensor([3., 3.])
    """

    def __init__(self) -> None:
        self._params: list[Tensor] = []
        self._sums: list[Tensor] = []

    def take_(self, params: Sequence[Tensor]) -> None:
        """Keep the gradients of ``params`` aside (copies: DDP's may be views of its buckets) and clear them."""
        having = [p for p in params if p.grad is not None]
        if not having:
            self._params = []
            return
        reuse = self._sums if same_tensors(having, self._params) else None
        self._sums = copy_into(reuse, [p.grad for p in having])
        self._params = having
        for p in having:
            p.grad = None

    def give_back_(self, params: Sequence[Tensor]) -> None:
        """``p.grad <- sum`` for parameters with one, ``None`` for the others."""
        sums = {id(p): s for p, s in zip(self._params, self._sums)}
        with torch.no_grad():
            for p in params:
                s = sums.get(id(p))
                if s is None:
                    p.grad = None
                elif p.grad is not None and p.grad.shape == s.shape:
                    local([p.grad])[0].copy_(local([s])[0])
                else:
                    p.grad = s.clone()

    def add_back_(self, params: Sequence[Tensor]) -> None:
        """``p.grad <- p.grad + sum``: the micro-batch's own gradient joins the earlier ones (a plain step)."""
        current = {id(p): p for p in params}
        with torch.no_grad():
            for p, s in zip(self._params, self._sums):
                if id(p) not in current:
                    continue
                if p.grad is None:
                    p.grad = s.clone()
                else:
                    local([p.grad])[0].add_(local([s])[0])

    def discard(self) -> None:
        """Forget the sums (the update is over); the storage is kept for the next one."""
        self._params = []


def _forget_autocast_casts() -> None:
    """Drop autocast's cached low-precision copies of the weights, which now hold other values.

    Inside one ``torch.autocast`` region with its cache on (the default, and Lightning's before 2.5), a
    second forward reuses the casts of the first: the perturbed pass would run at ``w``, not ``w + e``,
    and a forward after the restore at ``w + e``.
    """
    torch.clear_autocast_cache()


def same_tensors(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    """The same tensor objects in the same order (``map`` keeps the loop in C: this runs several times a step)."""
    return len(a) == len(b) and not any(map(is_not, a, b))
