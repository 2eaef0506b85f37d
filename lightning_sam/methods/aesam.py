"""AE-SAM (Jiang et al., ICLR 2023): SAM only on steps where the loss surface is sharp, decided per step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from typing_extensions import override

from lightning_sam.core.groups import check_non_negative
from lightning_sam.methods.base import Method
from lightning_sam.methods.sam import SAM

__all__ = ["AESAM"]


@dataclass(frozen=True, repr=False, eq=False)
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

        >>> import torch
        >>> method = AESAM(rho=0.05, c=0.0)
        >>> [method.wants_sam_(torch.tensor(x).sqrt()) for x in (1.0, 1.0, 9.0, 1.0)]
        [False, False, True, False]
        >>> round(method.sam_fraction, 2)
        0.25
    """

    c: float = 0.0
    beta: float = 0.9

    name = "aesam"
    adaptive = True

    class State(Method.State):
        """The moving mean and variance of ``||g||^2`` and the step counts."""

        def __init__(self) -> None:
            super().__init__()
            self.stats: dict[str, Any] = {"mean": 0.0, "var": 0.0, "steps": 0, "sam_steps": 0}
            self.before: dict[str, Any] | None = None  # the statistics before this update's decision

    def __post_init__(self) -> None:
        if self.interval != 1:
            got = {"interval": self.interval}
            raise ValueError(f"AESAM decides every step itself; expected no `interval`, got {got}.")
        super().__post_init__()
        c = self.c
        if isinstance(c, bool) or not isinstance(c, (int, float)) or math.isnan(c):
            raise TypeError(f"Expected `c` to be a float (+-inf allowed), got {c!r}.")
        self._set("c", float(c))
        beta = check_non_negative("beta", self.beta)
        if beta >= 1:
            raise ValueError(f"Expected `beta` to be a float in [0, 1), got {beta!r}.")
        self._set("beta", beta)

    @override
    def wants_sam_(self, grad_norm: Tensor) -> bool:
        x = float(grad_norm) ** 2
        stats = self.state.stats
        if not math.isfinite(x):  # a step that will be skipped: no SAM pass, statistics untouched
            return False
        self.state.before = dict(stats)  # a skipped or failed update puts them back (skip_)
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

    @override
    def skip_(self) -> None:
        """The update was skipped or failed: the statistics go back to where its decision found them."""
        if self.state.before is not None:
            self.state.stats, self.state.before = self.state.before, None

    @property
    def sam_fraction(self) -> float:
        """The fraction of steps that were SAM steps so far."""
        return self.state.stats["sam_steps"] / max(self.state.stats["steps"], 1)

    @override
    def figures(self) -> dict[str, float]:
        return {"sam/sam_fraction": self.sam_fraction}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stats": dict(self.state.stats)}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "stats" in state:
            self.state.stats = dict(state["stats"])
