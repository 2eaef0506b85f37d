"""What an update needs to know about the module, found once per fit, and what the SAM step cannot handle.

Pure torch (and torchmetrics, for the metric states the perturbed pass must not change).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torchmetrics
from torch import Tensor

if TYPE_CHECKING:
    from lightning_sam.methods.base import Method

__all__ = ["ModuleLayout", "check_supported"]


class ModuleLayout(NamedTuple):
    """What an update needs to know about the module, found once per fit (after SyncBatchNorm conversion)."""

    metrics: list[torchmetrics.Metric]  # states put back after the perturbed pass
    buffer_slots: list[tuple[torch.nn.Module, str]]  # where the buffers live: a forward may replace one
    selected: frozenset[int] | None  # ids of the parameters to perturb (None: all)

    def buffers(self) -> list[Tensor]:
        """The module's buffers now: a forward that replaces one (``self.b = 0.9 * self.b + ...``) is followed."""
        return [b for m, name in self.buffer_slots if (b := m._buffers.get(name)) is not None]

    @classmethod
    def of(cls, module: torch.nn.Module, method: Method, unfrozen_later: bool = False) -> ModuleLayout:
        """Look ``module`` over for ``method``; raise for what SAM cannot perturb (before any training).

        Raises:
            ValueError: ``only`` selects no parameter, or only frozen ones (``requires_grad=False``),
                unless ``unfrozen_later`` (a finetuning callback unfreezes them during fit; until then
                each step is a plain one).
            TypeError: the module has complex parameters or layers with sparse gradients.
        """
        check_supported(module)
        selected = None
        if method.only is not None:
            chosen = [
                p
                for prefix, m in module.named_modules()
                for name, p in m.named_parameters(prefix=prefix, recurse=False)
                if method.selects(name, m)
            ]
            if not chosen:
                raise ValueError(f"`only={method.only!r}` selects no parameter of {type(module).__name__}.")
            if not unfrozen_later and not any(p.requires_grad for p in chosen):
                raise ValueError(
                    f"`only={method.only!r}` selects only frozen parameters (requires_grad=False) of "
                    f"{type(module).__name__}: every step would perturb nothing. Select trainable parameters (with "
                    "a finetuning callback such as BackboneFinetuning that unfreezes them, steps take one pass until "
                    "one of them trains)."
                )
            selected = frozenset(map(id, chosen))
        return cls(
            metrics=[m for m in module.modules() if isinstance(m, torchmetrics.Metric)],
            buffer_slots=[(m, name) for m in module.modules() for name, b in m._buffers.items() if b is not None],
            selected=selected,
        )


def check_supported(module: torch.nn.Module) -> None:
    """Raise ``TypeError`` for what the SAM step cannot handle exactly: complex parameters, sparse gradients.

    Example::

        >>> check_supported(torch.nn.Embedding(10, 4, sparse=True))
        Traceback (most recent call last):
        ...
        TypeError: SAM does not support sparse gradients: `Embedding(10, 4, sparse=True)` ...
    """
    for name, p in module.named_parameters():
        if p.is_complex():
            raise TypeError(
                f"SAM does not support complex parameters: `{name}` is {p.dtype}. Keep the real and imaginary "
                "parts as one real parameter (torch.view_as_complex inside forward)."
            )
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse:
            raise TypeError(
                f"SAM does not support sparse gradients: `{m}` (`{name or type(module).__name__}`) gives one. Use "
                "sparse=False (a dense gradient: the global norm of e needs every component)."
            )
