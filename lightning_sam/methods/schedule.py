"""How rho changes over training: :class:`RhoSchedule` (pure Python, a function of the step or the learning rate)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from lightning_sam.core.groups import check_int, check_non_negative

__all__ = ["RhoSchedule"]


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
    ``"lr"`` follows the LR scheduler, which checkpoints restore. Every argument given is checked,
    also those the shape does not use.

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
        warmup = check_int("warmup_steps", self.warmup_steps, 0)
        if self.total_steps is not None or self.shape in ("linear", "cosine"):
            check_int("total_steps", self.total_steps, warmup + 1)
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
