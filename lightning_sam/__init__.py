"""Sharpness-Aware Minimization (SAM) for PyTorch Lightning.

Example::

    >>> from lightning_sam import ASAM, SAM, SAMLightningModule, SharpnessMonitor
    >>> SAM(rho=0.05), ASAM(rho=0.5, eta=0.01)
    (SAM(rho=0.05), ASAM(rho=0.5, eta=0.01))
"""

import torch

from lightning_sam.backup import WeightBackup
from lightning_sam.callbacks import SharpnessMonitor
from lightning_sam.manual import sam_step
from lightning_sam.methods import AESAM, ASAM, GSAM, SAM, FriendlySAM, LatePhaseSAM, LookSAM, ParamGroup, RhoSchedule
from lightning_sam.module import SAMLightningModule
from lightning_sam.step import SAMStepStats
from lightning_sam.tensors import global_norm

__version__ = "0.2.0"

__all__ = [
    "AESAM",
    "ASAM",
    "GSAM",
    "SAM",
    "FriendlySAM",
    "LatePhaseSAM",
    "LookSAM",
    "ParamGroup",
    "RhoSchedule",
    "SAMLightningModule",
    "SAMStepStats",
    "SharpnessMonitor",
    "WeightBackup",
    "__version__",
    "global_norm",
    "sam_step",
]

# Checkpoints written by earlier versions may hold a method object; let `torch.load(weights_only=True)` read them.
torch.serialization.add_safe_globals([SAM, ASAM, GSAM, LookSAM, RhoSchedule])  # the methods of 0.1
