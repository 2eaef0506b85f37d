"""Moved to :mod:`lightning_sam.app.runs`; this path (named in the configs of earlier runs) keeps working."""

from lightning_sam.app.runs import (
    AtomicCheckpointIO,
    Interrupted,
    RunCSVLogger,
    RunLock,
    is_disk_full,
    raise_on_signals,
)

__all__ = ["AtomicCheckpointIO", "Interrupted", "RunCSVLogger", "RunLock", "is_disk_full", "raise_on_signals"]
