"""``python -m lightning_sam.train [overrides]``: the training app, in :mod:`lightning_sam.app`.

This path keeps working for the command and for ``from lightning_sam.train import train, load_run``.
"""

from lightning_sam.app.checks import ConfigError
from lightning_sam.app.load import load_run
from lightning_sam.app.train import app, main, train

__all__ = ["ConfigError", "app", "load_run", "main", "train"]

if __name__ == "__main__":
    main()
