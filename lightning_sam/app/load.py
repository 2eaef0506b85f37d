"""``load_run``: a finished run of the app, rebuilt from its directory (no Hydra app, no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_sam.app.runs import RUN_COPY

__all__ = ["load_run"]


def load_run(run_dir: str | Path, checkpoint: str = "last") -> tuple[Any, Any]:
    """Rebuild the network of a finished run with its trained weights, and its data module.

    Args:
        run_dir: the run directory (``hydra.run.dir``), holding ``.hydra/config.yaml`` and
            ``checkpoints/``.
        checkpoint: ``"last"`` (``last.ckpt``), ``"best"`` (the best by ``val/acc``) or a file name
            in ``checkpoints/``.

    Returns:
        ``(net, datamodule)``: the ``torch.nn.Module`` in eval mode, and the (not yet set up) data module.
    """
    run_dir = Path(run_dir)
    config = run_dir / RUN_COPY / "config.yaml"
    if not config.is_file():  # runs of earlier versions
        config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} holds no .hydra/config.yaml: expected the directory of a training run.")
    cfg = OmegaConf.load(config)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, num_classes=datamodule.num_classes)
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    if checkpoint == "best":
        candidates = [c for c in checkpoints if c.name != "last.ckpt"]
        path = max(candidates, key=lambda c: float(c.stem.rsplit("val_acc", 1)[-1] or 0)) if candidates else None
    else:
        path = run_dir / "checkpoints" / (f"{checkpoint}.ckpt" if checkpoint == "last" else checkpoint)
    if path is None or not path.is_file():
        found = ", ".join(c.name for c in checkpoints) or "none"
        raise FileNotFoundError(f"No checkpoint {checkpoint!r} in {run_dir / 'checkpoints'} (found: {found}).")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    return net.eval(), datamodule
