"""Late-phase SAM (Zhou et al., ICLR 2025): plain steps first, SAM from ``start`` on."""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing_extensions import override

from lightning_sam.methods.base import Method
from lightning_sam.methods.sam import SAM

__all__ = ["LatePhaseSAM"]


@dataclass(frozen=True, repr=False, eq=False)
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

    start: float = 0.8

    name = "late_phase"

    class State(Method.State):
        """The run's length, for a fractional ``start``."""

        def __init__(self) -> None:
            super().__init__()
            self.total_steps: int | None = None  # the run's optimizer steps, for a fractional start

    def __post_init__(self) -> None:
        super().__post_init__()
        start = self.start
        if isinstance(start, bool) or not isinstance(start, (int, float)):
            raise TypeError(f"Expected `start` to be an int step >= 0 or a float fraction in [0, 1], got {start!r}.")
        if (isinstance(start, int) and start < 0) or (isinstance(start, float) and not 0.0 <= start <= 1.0):
            raise ValueError(f"Expected `start` to be an int step >= 0 or a float fraction in [0, 1], got {start!r}.")

    @override
    def plan_(self, total_steps: int | None) -> None:
        self.state.total_steps = total_steps

    @property
    @override
    def follows_run_length(self) -> bool:
        """A fractional ``start`` is a fraction of the run's steps."""
        return isinstance(self.start, float)

    @property
    def start_step(self) -> int:
        """The first SAM step."""
        if isinstance(self.start, int):
            return self.start
        total = self.state.total_steps
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
