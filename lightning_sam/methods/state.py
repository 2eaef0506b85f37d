"""Per-parameter state a method keeps between steps (LookSAM's ``g_v``, F-SAM's ``m``), in one helper.

Pure torch. The values are kept with their parameters, in the order of the optimizer's parameters
(the list the method is bound to), and checkpointed by position in that list, so a checkpoint needs
no parameter names and survives ``load_from_checkpoint`` into a fresh module. A state loaded before
the method is bound (``on_load_checkpoint`` runs before the fit binds) is kept and restored at bind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sam.core.tensors import local

__all__ = ["ParameterState"]


class ParameterState:
    """Tensors kept per parameter across steps, bound to the optimizer's parameters, checkpointed by position.

    Args:
        owner: the method's name, for error messages.

    Example::

        >>> w = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
        >>> state = ParameterState("LookSAM")
        >>> state.bind_(w)
        >>> state.set_([w[1]], [torch.zeros(3)])
        >>> state.to_checkpoint()["index"]
        [1]
        >>> fresh = ParameterState("LookSAM")
        >>> fresh.load_(state.to_checkpoint())       # before binding: kept until bind_
        >>> fresh.bind_(w); fresh.lookup()[id(w[1])]
        tensor([0., 0., 0.])
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.params: list[Tensor] = []
        self.values: list[Tensor] = []
        self._bound: list[Tensor] | None = None
        self._pending: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return bool(self.values)

    def bind_(self, params: Sequence[Tensor]) -> None:
        """Bind to the optimizer's parameters, in order: drop values of parameters it no longer holds."""
        self._bound = list(params)
        held = {id(p) for p in self._bound}
        kept = [(p, v) for p, v in zip(self.params, self.values) if id(p) in held]
        self.params, self.values = [p for p, _ in kept], [v for _, v in kept]
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._restore(pending)

    def lookup(self) -> dict[int, Tensor]:
        """``{id(parameter): value}``."""
        return dict(zip(map(id, self.params), self.values))

    def set_(self, params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
        """Keep ``values[i]`` for ``params[i]``, in the bound order (each parameter once), replacing what was kept."""
        by_id = dict(zip(map(id, params), values))
        order = [p for p in (self._bound if self._bound is not None else params) if id(p) in by_id]
        order = list({id(p): p for p in order}.values())
        self.params, self.values = order, [by_id[id(p)] for p in order]

    def reset_(self) -> None:
        """Forget every value (a skipped step may have written non-finite ones)."""
        self.params, self.values = [], []

    def to_checkpoint(self) -> dict[str, Any] | None:
        """``{"values": [...], "index": [...]}`` (local shards, positions in the bound list), or ``None``."""
        if self._pending is not None:
            return self._pending
        if not self.values:
            return None
        index = {id(p): i for i, p in enumerate(self._bound if self._bound is not None else self.params)}
        kept = [(index[id(p)], v) for p, v in zip(self.params, local(self.values)) if id(p) in index]
        return {"values": [v.detach().clone() for _, v in kept], "index": [i for i, _ in kept]}

    def load_(self, state: dict[str, Any] | None) -> None:
        """Restore what :meth:`to_checkpoint` returned (now if bound, else at :meth:`bind_`)."""
        self.reset_()
        self._pending = None
        if state is None:
            return
        if self._bound is not None:
            self._restore(state)
        else:
            self._pending = state

    def _restore(self, state: dict[str, Any]) -> None:
        assert self._bound is not None
        saved, index = state["values"], state.get("index")
        index = range(len(saved)) if index is None else index  # checkpoints of 0.1: every parameter, in order
        if len(index) != len(saved) or any(i >= len(self._bound) for i in index):
            raise ValueError(f"The {self.owner} state in the checkpoint does not match the model's parameters.")
        params = [self._bound[i] for i in index]
        if any(local([p])[0].shape != t.shape for p, t in zip(params, saved)):
            raise ValueError(f"The {self.owner} state in the checkpoint does not match the model's parameters.")
        values = [torch.empty_like(p) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(local(values), [t.to(v.device) for t, v in zip(saved, local(values))])
        self.params, self.values = params, values
