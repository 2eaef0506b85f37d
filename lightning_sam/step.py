"""Moved to :mod:`lightning_sam.core.update` (and :mod:`lightning_sam.core.layout`); this path keeps working."""

from lightning_sam.core.groups import check_param_groups
from lightning_sam.core.layout import ModuleLayout, check_supported
from lightning_sam.core.update import SKIPPED_STEPS_KEY, SAMStepStats, SAMUpdate

__all__ = ["SKIPPED_STEPS_KEY", "ModuleLayout", "SAMStepStats", "SAMUpdate", "check_param_groups", "check_supported"]
