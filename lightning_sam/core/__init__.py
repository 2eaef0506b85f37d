"""The SAM step in pure torch (no Lightning import): the update, what it saves and restores, tensor utilities.

- :mod:`~lightning_sam.core.update`: :class:`SAMUpdate`, one update of one optimizer (the two passes,
  the skip, the restore);
- :mod:`~lightning_sam.core.backup`: the saved copy of ``w``, buffers, metric states, accumulated gradients;
- :mod:`~lightning_sam.core.layout`: what an update looks up in the module once per fit;
- :mod:`~lightning_sam.core.groups`: param groups as the step sees them, argument checks;
- :mod:`~lightning_sam.core.tensors`: global norms and dot products, DTensor shards, the finite check.

The Lightning front ends (:class:`~lightning_sam.SAMLightningModule`, :func:`~lightning_sam.sam_step`) drive it.
"""
