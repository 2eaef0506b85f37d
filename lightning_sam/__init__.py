"""Sharpness-Aware Minimization (SAM) for PyTorch Lightning.

Example::

    >>> from lightning_sam import ASAM, SAM, SAMLightningModule, SharpnessMonitor
    >>> SAM(rho=0.05), ASAM(rho=0.5, eta=0.01)
    (SAM(rho=0.05), ASAM(rho=0.5, eta=0.01))
"""

import torch

from lightning_sam.callbacks import SharpnessMonitor
from lightning_sam.core.backup import WeightBackup
from lightning_sam.core.tensors import global_norm
from lightning_sam.core.update import SAMStepStats
from lightning_sam.manual import sam_step
from lightning_sam.methods import (
    AESAM,
    ASAM,
    GSAM,
    RWP,
    SAM,
    FriendlySAM,
    LatePhaseSAM,
    LookSAM,
    Method,
    MomentumSAM,
    ParamGroup,
    RhoSchedule,
)
from lightning_sam.methods import REGISTRY as _REGISTRY
from lightning_sam.module import SAMLightningModule

__version__ = "0.2.0"

__all__ = [
    "AESAM",
    "ASAM",
    "GSAM",
    "SAM",
    "FriendlySAM",
    "LatePhaseSAM",
    "LookSAM",
    "Method",
    "MomentumSAM",
    "ParamGroup",
    "RWP",
    "RhoSchedule",
    "SAMLightningModule",
    "SAMStepStats",
    "SharpnessMonitor",
    "WeightBackup",
    "__version__",
    "global_norm",
    "sam_step",
]

# Checkpoints written by earlier versions may hold a method object, pickled as `lightning_sam.methods.SAM`
# (the module path the shipped classes keep); let `torch.load(weights_only=True)` read them.
torch.serialization.add_safe_globals([*_REGISTRY.values(), RhoSchedule])
