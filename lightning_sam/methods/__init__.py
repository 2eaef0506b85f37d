"""The perturbation rules, one per file, and the registry of the shipped ones.

A method turns the gradient ``g`` at the weights ``w`` into the ascent step ``e(w)`` and may adjust
the descent (:mod:`~lightning_sam.methods.base` documents the hooks):

* SAM (Foret et al., ICLR 2021): ``e = rho * g / ||g||``.
* ASAM (Kwon et al., ICML 2021): ``e = rho * T^2 g / ||T g||`` with ``T = |w| + eta`` elementwise.
* GSAM, LookSAM, late-phase SAM, AE-SAM, F-SAM: see their classes.
* Momentum-SAM and RWP perturb before the forward (``single_pass``): one forward/backward a step.

``||.||`` is one global norm over every tensor of every group. A group may carry its own ``rho``
(taken from the optimizer's param group); the norm stays global.

``ascent_`` leaves in each gradient the direction of ``e`` (``g`` itself for SAM, ``T^2 g`` for ASAM,
written in place: no extra parameter-sized buffer) and returns one scale per group, with
``e = scale * direction``. Moving the weights and restoring them is :class:`WeightBackup`'s job,
because restoring must copy saved weights back: ``(w + e) - e`` is not ``w`` in floating point.

Example::

    >>> import torch
    >>> from lightning_sam import SAM, ParamGroup, WeightBackup
    >>> w = torch.tensor([3.0, 4.0], requires_grad=True)
    >>> (w**2).sum().backward()                                # g = 2w = (6, 8), ||g|| = 10
    >>> group = ParamGroup(rho=0.5, params=[w], grads=[w.grad])
    >>> ascent = SAM(rho=0.5).ascent_([group])
    >>> ascent.grad_norm, ascent.eps_norm, ascent.scales       # e = 0.5 * g / 10
    (tensor(10.), tensor(0.5000), [tensor(0.0500)])
    >>> backup = WeightBackup()
    >>> backup.perturb_([group], ascent.scales)                # w <- w + e
    >>> w.data
    tensor([3.3000, 4.4000])
    >>> backup.restore_()                                      # w <- saved w, bit for bit
    >>> w.data
    tensor([3., 4.])
"""

from lightning_sam.core.groups import Ascent, ParamGroup, check_non_negative
from lightning_sam.methods.aesam import AESAM
from lightning_sam.methods.asam import ASAM
from lightning_sam.methods.base import Method
from lightning_sam.methods.config import method_from_config, method_to_config
from lightning_sam.methods.friendly import FriendlySAM
from lightning_sam.methods.gsam import GSAM
from lightning_sam.methods.late_phase import LatePhaseSAM
from lightning_sam.methods.looksam import LookSAM
from lightning_sam.methods.msam import MomentumSAM
from lightning_sam.methods.rwp import RWP
from lightning_sam.methods.sam import SAM
from lightning_sam.methods.schedule import RhoSchedule

__all__ = [
    "AESAM",
    "ASAM",
    "GSAM",
    "REGISTRY",
    "RWP",
    "SAM",
    "Ascent",
    "FriendlySAM",
    "LatePhaseSAM",
    "LookSAM",
    "Method",
    "MomentumSAM",
    "ParamGroup",
    "RhoSchedule",
    "check_non_negative",
    "method_from_config",
    "method_to_config",
    "shipped",
]

# Pickles and YAML tags name the shipped classes as 0.2 did (`lightning_sam.methods.SAM`), so that
# earlier versions read what this one writes, and `torch.load(weights_only=True)` finds them by it.
for _cls in (Method, SAM, ASAM, GSAM, LookSAM, LatePhaseSAM, AESAM, FriendlySAM, MomentumSAM, RWP, RhoSchedule):
    _cls.__module__ = __name__

#: The shipped methods by name: the app's ``sam=<name>`` options (``configs/sam/<name>.yaml``), what
#: error messages list and what the contract test runs over. A new method is a file of its own and a
#: line here.
REGISTRY: dict[str, type[Method]] = {
    cls.name: cls for cls in (SAM, ASAM, GSAM, LookSAM, LatePhaseSAM, AESAM, FriendlySAM, MomentumSAM, RWP)
}


def shipped() -> str:
    """The shipped methods' class names, for messages: ``"SAM, ASAM, GSAM, ..."``."""
    return ", ".join(cls.__name__ for cls in REGISTRY.values())
