"""LookSAM (Liu et al., CVPR 2022): a SAM step every ``k`` steps, cheap steps along a stored direction between."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_sam.core.groups import check_int, check_non_negative
from lightning_sam.core.tensors import add_scaled_, global_dot, global_norm, local
from lightning_sam.methods.base import NORM_EPS, Method
from lightning_sam.methods.sam import SAM
from lightning_sam.methods.state import ParameterState

__all__ = ["LookSAM"]


@dataclass(frozen=True, repr=False, eq=False)
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

    k: int = 5
    alpha: float = 0.7

    name = "looksam"
    uses_clean_gradient = True

    class State(Method.State):
        """SAM's, and ``g_v`` per parameter with its norm."""

        def __init__(self) -> None:
            super().__init__()
            self.gv = ParameterState("LookSAM")  # g_v per parameter
            self.gv_norm: Tensor | None = None

    def __post_init__(self) -> None:
        if self.interval != 1:
            got = {"interval": self.interval}
            raise ValueError(f"LookSAM takes a SAM step every `k` steps; expected no `interval`, got {got}.")
        super().__post_init__()
        check_int("k", self.k, 1)
        self._set("alpha", check_non_negative("alpha", self.alpha))

    @override
    def takes_sam_step(self, step: int) -> bool:
        return step % self.k == 0

    @override
    def bind_(self, params: Sequence[Tensor]) -> None:
        self.state.gv.bind_(params)
        self._norm()

    @override
    @torch.no_grad()
    def descent_(self, params: Sequence[Tensor]) -> None:
        """Store ``g_v = g_s - (g . g_s / ||g||^2) g`` per parameter (a missing gradient counts as 0).

        The descent itself is along ``g_s``.
        """
        clean_params, clean_grads = self.state.clean_params, self.state.clean or []
        clean = dict(zip(map(id, clean_params), clean_grads))
        perturbed = [p for p in params if p.grad is not None]
        both = [(clean[id(p)], p.grad) for p in perturbed if id(p) in clean]
        c = global_dot([g for g, _ in both], [gs for _, gs in both]) / (global_norm(clean_grads).square() + NORM_EPS)
        torch._foreach_mul_(local(clean_grads), c)  # c g; the clean copy is not needed after this
        gv = {id(p): p.grad.clone() for p in perturbed}  # g_s
        for p, cg in zip(clean_params, clean_grads):
            if id(p) in gv:
                local([gv[id(p)]])[0].sub_(local([cg])[0])
            else:
                gv[id(p)] = -cg
        owners = {id(p): p for p in [*perturbed, *clean_params]}
        self.state.gv.set_([owners[i] for i in gv], list(gv.values()))
        self._norm()

    @override
    @torch.no_grad()
    def plain_descent_(self, params: Sequence[Tensor]) -> None:
        """``g <- g + alpha * (||g|| / ||g_v||) * g_v``, each parameter with its own stored ``g_v`` (none: ``g``)."""
        if not self.state.gv or self.alpha == 0:
            return
        stored = self.state.gv.lookup()
        pairs = [(p.grad, stored[id(p)]) for p in params if id(p) in stored]
        if pairs:
            grad_norm = global_norm([p.grad for p in params])  # ||g|| over every parameter of the step
            scale = self.alpha * grad_norm / (self.state.gv_norm + NORM_EPS)
            add_scaled_([g for g, _ in pairs], [v for _, v in pairs], scale, keep_sources=True)

    @override
    def skip_(self) -> None:
        """Drop ``g_v``, which may come from a non-finite step; plain steps use ``g`` alone until the next SAM step."""
        self.state.gv.reset_()
        self.state.gv_norm = None

    @override
    def state_dict(self) -> dict[str, Any]:
        saved = self.state.gv.to_checkpoint()
        return {"gv": None} if saved is None else {"gv": saved["values"], "index": saved["index"]}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        gv = state.get("gv")
        self.state.gv.load_(None if gv is None else {"values": gv, "index": state.get("index")})
        self._norm()

    def _norm(self) -> None:
        self.state.gv_norm = global_norm(self.state.gv.values) if self.state.gv else None
