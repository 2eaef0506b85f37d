"""Sharpness-Aware Minimization (SAM) for PyTorch Lightning.

Example::

    >>> from lightning_sam import ASAM, SAM, SAMLightningModule, SharpnessMonitor
    >>> SAM(rho=0.05), ASAM(rho=0.5, eta=0.01)
    (SAM(rho=0.05), ASAM(rho=0.5, eta=0.01))
"""

import torch

from lightning_sam.callbacks import SharpnessMonitor
from lightning_sam.methods import ASAM, GSAM, SAM, LookSAM, ParamGroup, RhoSchedule, WeightBackup, global_norm
from lightning_sam.module import SAMLightningModule, SAMStepStats

__version__ = "0.1.0"

__all__ = [
    "ASAM",
    "GSAM",
    "SAM",
    "LookSAM",
    "RhoSchedule",
    "ParamGroup",
    "SAMLightningModule",
    "SAMStepStats",
    "SharpnessMonitor",
    "WeightBackup",
    "__version__",
    "global_norm",
]

# `save_hyperparameters()` may store the method in a checkpoint; let `torch.load(weights_only=True)` read it.
torch.serialization.add_safe_globals([SAM, ASAM, GSAM, LookSAM, RhoSchedule])
