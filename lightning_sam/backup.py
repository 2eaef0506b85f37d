"""Moved to :mod:`lightning_sam.core.backup`; this path keeps working."""

from lightning_sam.core.backup import BufferBackup, GradientStash, MetricStates, WeightBackup, same_tensors

__all__ = ["BufferBackup", "GradientStash", "MetricStates", "WeightBackup", "same_tensors"]
