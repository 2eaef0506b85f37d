"""Moved to :mod:`lightning_sam.core.tensors`; this path keeps working."""

from lightning_sam.core.tensors import (
    add_scaled_,
    all_reduce_mean_,
    any_non_finite,
    copy_into,
    global_dot,
    global_norm,
    is_distributed_ddp,
    local,
    norm_of_norms,
)

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
