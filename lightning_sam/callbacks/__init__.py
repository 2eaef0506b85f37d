"""Callbacks that report what SAM does, one per file."""

from lightning_sam.callbacks.hessian import HessianMonitor
from lightning_sam.callbacks.sharpness import SharpnessMonitor

__all__ = ["HessianMonitor", "SharpnessMonitor"]
