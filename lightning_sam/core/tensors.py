"""Tensor utilities for the SAM step: global norms and dot products, DTensor shards (pure torch).

Every function takes lists of tensors and works on them as one long vector, with torch's foreach
kernels and without a host sync. Sharded DTensors (FSDP2) count whole: local partial sums are
all-reduced over the shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from lightning_sam._compat import flag_non_finite_

__all__ = [
    "add_scaled_",
    "all_reduce_mean_",
    "any_non_finite",
    "copy_into",
    "global_dot",
    "global_norm",
    "is_distributed_ddp",
    "local",
    "norm_of_norms",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

try:  # FSDP2 shards parameters as DTensors
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:
    try:  # torch 2.4: the same classes, under their private path
        from torch.distributed._tensor import DTensor, Partial, Replicate, Shard
    except ImportError:  # torch without distributed support
        DTensor = None


def local(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The local shards of DTensors (FSDP2), other tensors as they are.

    Elementwise in-place work on the shards is exact and needs no communication.

    Example::

        >>> local([torch.ones(2)])
        [tensor([1., 1.])]
    """
    if DTensor is None or not _any_dtensor(tensors):
        return list(tensors)
    with torch.no_grad():  # the shard itself, not a differentiable view of it
        return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _any_dtensor(tensors: Sequence[Tensor]) -> bool:
    # called several times a step: the set of types is a C loop, isinstance per tensor is not
    return DTensor is not None and any(issubclass(cls, DTensor) for cls in set(map(type, tensors)))


def norm_of_norms(norms: Sequence[Tensor]) -> Tensor:
    """The norm of a vector of (non-negative) norms: the one norm itself, 0 when there are none."""
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack(list(norms))) if norms else torch.zeros(())


def _layout(t: Tensor) -> tuple[tuple, Tensor]:
    """``((dtype, device mesh, placements), local tensor)``; plain tensors have no mesh."""
    if DTensor is not None and isinstance(t, DTensor):
        return (t.dtype, t.device_mesh, t.placements), t.to_local()
    return (t.dtype, None, None), t


def _sum_over_shards(partial: Tensor, mesh: Any, placements: Any) -> Tensor:
    """All-reduce a sum over the shards of a DTensor layout (nothing to do for plain tensors)."""
    if mesh is None:
        return partial
    layout = [Partial() if isinstance(p, Shard) else Replicate() for p in placements]
    return DTensor.from_local(partial, mesh, layout).full_tensor()


def _result_dtype(keys: Any) -> torch.dtype:
    return torch.float64 if any(key[0] == torch.float64 for key in keys) else torch.float32


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The 2-norm of all ``tensors`` together, without a host sync.

    fp16 and bf16 tensors are reduced in float32 (their squares overflow early); the result is
    float64 if any tensor is, else float32. Sharded DTensors (FSDP2) count whole: their local sums
    of squares are all-reduced over the shards, one collective per mesh and placement.

    Example::

        >>> global_norm([torch.tensor([3.0]), torch.tensor([[4.0]], dtype=torch.float16)])
        tensor(5.)
    """
    if tensors and not _any_dtensor(tensors):
        dtypes = set(map(attrgetter("dtype"), tensors))
        if len(dtypes) == 1:  # the common case: one foreach kernel and one reduction
            low = dtypes.pop() in _LOW_PRECISION
            norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float32 if low else None)
            return torch.linalg.vector_norm(torch.stack(norms))
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        key, x = _layout(t)
        groups.setdefault(key, []).append(x)
    out = _result_dtype(groups)
    squares = []
    for (dtype, mesh, placements), xs in groups.items():
        norms = torch._foreach_norm(xs, 2, dtype=torch.float32 if dtype in _LOW_PRECISION else None)
        squares.append(_sum_over_shards(torch.stack(norms).to(out).square().sum(), mesh, placements))
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=out)


def any_non_finite(tensors: Sequence[Tensor]) -> Tensor:
    """Whether any element of ``tensors`` is inf or NaN, as a 0-dim bool tensor, without a host sync.

    Cheaper than :func:`global_norm`: one fused kernel (torch's AMP check), with no false alarm for
    large finite values. Where that kernel does not apply exactly (bfloat16 and float64 on a GPU: it
    has no bfloat16 kernel there and checks float64 in float32), those tensors are checked by their
    norm (a false alarm only if a sum of squares overflows, beyond about 1e19 in float32); sparse
    tensors one by one. DTensors are checked on their local shard only: every process sees its
    own, and a caller that needs one answer for all of them reduces the flag.

    Example::

        >>> any_non_finite([torch.ones(2), torch.tensor([1.0, float("nan")])])
        tensor(True)
    """
    tensors = local(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.bool)
    device = tensors[0].device
    if device.type == "cpu" or set(map(attrgetter("dtype"), tensors)) <= _FUSED_ANYWHERE:
        try:  # the common case: strided floating-point tensors on one device, one fused kernel
            return _non_finite_flag(tensors, device) > 0
        except (RuntimeError, NotImplementedError):  # several devices, sparse tensors: group them
            pass
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    flags = []
    for t in tensors:
        if t.layout == torch.strided:
            groups.setdefault((t.device, t.dtype), []).append(t)
        else:
            flags.append(~(t.coalesce().values() if t.is_sparse else t).isfinite().all())
    for (where, dtype), ts in groups.items():
        if where.type == "cpu" or dtype in _FUSED_ANYWHERE:
            flags.append(_non_finite_flag(ts, where) > 0)
        else:
            norms = torch._foreach_norm(ts, 2, dtype=torch.float32 if dtype in _LOW_PRECISION else None)
            flags.append(~torch.stack(norms).isfinite().all())
    return torch.stack([f.to(device) for f in flags]).any()


#: dtypes that torch's fused AMP check handles exactly on every device (on CPU: every floating dtype)
_FUSED_ANYWHERE = frozenset({torch.float16, torch.float32})


def _non_finite_flag(tensors: list[Tensor], device: torch.device) -> Tensor:
    found = torch.zeros((), dtype=torch.float32, device=device)
    flag_non_finite_(tensors, found, torch.ones((), dtype=torch.float32, device=device))
    return found


def global_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """The inner product of two lists of tensors, each taken as one vector, like :func:`global_norm`.

    Example::

        >>> global_dot([torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 4.0])])
        tensor(11.)
    """
    groups: dict[tuple, list[Tensor]] = {}
    for x, y in zip(a, b):
        key, x_local = _layout(x)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dot = torch.vdot(x_local.reshape(-1).to(acc), _layout(y)[1].reshape(-1).to(acc))
        groups.setdefault(key, []).append(dot)
    out = _result_dtype(groups)
    sums = [_sum_over_shards(torch.stack(d).to(out).sum(), mesh, pl) for (_, mesh, pl), d in groups.items()]
    return torch.stack(sums).sum() if sums else torch.zeros((), dtype=out)


def copy_into(buffer: list[Tensor] | None, tensors: list[Tensor]) -> list[Tensor]:
    """Copy ``tensors`` into ``buffer`` (allocated like them when missing or of another layout)."""
    if buffer is None or len(buffer) != len(tensors) or any(b.shape != t.shape for b, t in zip(buffer, tensors)):
        buffer = [torch.empty_like(t) for t in tensors]
    torch._foreach_copy_(local(buffer), local(tensors))
    return buffer


def add_scaled_(targets: list[Tensor], sources: list[Tensor], scale: Tensor, keep_sources: bool = False) -> None:
    """``targets += scale * sources`` in place, on local shards.

    On CPU the scale is read to the host, which is free there and saves a pass; elsewhere the
    sources are scaled without a host sync, in place unless ``keep_sources`` (then in a temporary).
    """
    targets, sources = local(targets), local(sources)
    if scale.device.type == "cpu":
        torch._foreach_add_(targets, sources, alpha=scale.item())
    elif keep_sources:
        torch._foreach_add_(targets, torch._foreach_mul(sources, scale))
    else:
        torch._foreach_mul_(sources, scale)
        torch._foreach_add_(targets, sources)


def is_distributed_ddp(model: Any) -> bool:
    """Whether ``model`` is DistributedDataParallel over more than one process."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel) and torch.distributed.get_world_size() > 1


@torch.no_grad()
def all_reduce_mean_(grads: list[Tensor]) -> None:
    """Average gradients over the processes of the default group, in one collective."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    torch._foreach_copy_(grads, [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)])
