"""MNIST-1D (Greydanus & Kobak, 2020): 4000 + 1000 one-dimensional digit signals of length 40.

Generated procedurally by the ``mnist1d`` package (a second or so) and cached as ``mnist1d.npz``
under ``data_dir``; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from typing_extensions import override

from lightning_sam.data.split import SplitDataModule

__all__ = ["MNIST1DDataModule"]


def _generate(path: Path) -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())  # the authors' default arguments and seed
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"])
    tmp.replace(path)


class MNIST1DDataModule(SplitDataModule):
    """MNIST-1D with a held-out validation part of the training split and optional label noise.

    Args:
        data_dir: where ``mnist1d.npz`` is cached.
        **kwargs: ``batch_size``, ``num_workers``, ``val_fraction``, ``label_noise``, ``seed``
            (see :class:`~lightning_sam.data.split.SplitDataModule`).

    Example::

        >>> MNIST1DDataModule("data", batch_size=64, label_noise=0.2).num_classes
        10
    """

    num_classes = 10
    input_shape = (1, 40)

    def __init__(self, data_dir: str | Path = "data", **kwargs: int | float) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.path = Path(data_dir) / "mnist1d.npz"

    @override
    def prepare_data(self) -> None:
        if not self.path.exists():
            _generate(self.path)

    @override
    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # a no-op once cached; covers use without a Trainer
        data = np.load(self.path)
        x, x_test = (torch.as_tensor(data[k], dtype=torch.float32).unsqueeze(1) for k in ("x", "x_test"))
        self.split(x, torch.as_tensor(data["y"]), x_test, torch.as_tensor(data["y_test"]))
