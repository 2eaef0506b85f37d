"""MNIST-1D (Greydanus & Kobak, 2020): 4000 + 1000 one-dimensional digit signals of length 40.

Generated procedurally by the ``mnist1d`` package (``pip install mnist1d``, a second or so) and cached
as ``mnist1d.npz`` under ``data_dir``; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

__all__ = ["MNIST1DDataModule", "check_split_args", "flip_labels", "split_indices"]

NUM_CLASSES = 10
LENGTH = 40


def flip_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Replace ``round(fraction * len(labels))`` labels, chosen by ``seed``, with a different random class.

    Example::

        >>> y = torch.zeros(10, dtype=torch.long)
        >>> (flip_labels(y, 0.3, num_classes=10, seed=0) != y).sum().item()
        3
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"Expected `label_noise` to be a fraction in [0, 1), got {fraction!r}.")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(labels), generator=g)[: round(fraction * len(labels))]
    offset = torch.randint(1, num_classes, (len(chosen),), generator=g)  # never the original class
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + offset) % num_classes
    return noisy


def check_split_args(batch_size: int, val_fraction: float, label_noise: float) -> None:
    """Raise a ValueError naming the first invalid argument of a data module."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be an int >= 1, got {batch_size!r}.")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"Expected `val_fraction` to be a fraction in [0, 1), got {val_fraction!r}.")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"Expected `label_noise` to be a fraction in [0, 1), got {label_noise!r}.")


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle ``range(n)`` with ``seed`` and return ``(train, validation)`` indices.

    Example::

        >>> train, val = split_indices(10, 0.2, seed=0)
        >>> len(train), len(val), sorted(torch.cat([train, val]).tolist()) == list(range(10))
        (8, 2, True)
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(val_fraction * n)
    return order[n_val:], order[:n_val]


def _generate(path: Path) -> None:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("MNIST-1D needs the `mnist1d` package: `pip install mnist1d`.") from err
    data = make_dataset(get_dataset_args())  # the authors' default arguments and seed
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"])
    tmp.replace(path)


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D with a held-out validation part of the training split and optional label noise.

    Args:
        data_dir: where ``mnist1d.npz`` is cached.
        batch_size: samples per batch, at least 1.
        num_workers: DataLoader workers.
        val_fraction: the part of the 4000 training samples held out for validation, in [0, 1).
        label_noise: the fraction of the remaining training labels replaced by a different, uniformly
            random class (decided by ``seed``), in [0, 1). Validation and test labels stay clean.
        seed: decides the validation split and the noisy labels.
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        label_noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_split_args(batch_size, val_fraction, label_noise)
        self.path = Path(data_dir) / "mnist1d.npz"
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.label_noise = label_noise
        self.seed = seed
        self.num_classes = NUM_CLASSES

    @override
    def prepare_data(self) -> None:
        if not self.path.exists():
            _generate(self.path)

    @override
    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # a no-op once cached; covers use without a Trainer
        data = np.load(self.path)
        x = torch.as_tensor(data["x"], dtype=torch.float32).unsqueeze(1)
        y = torch.as_tensor(data["y"], dtype=torch.long)
        train, val = split_indices(len(y), self.val_fraction, self.seed)
        self.clean_train_labels = y[train]
        noisy = flip_labels(y[train], self.label_noise, NUM_CLASSES, self.seed)
        self.train_set = TensorDataset(x[train], noisy)
        self.val_set = TensorDataset(x[val], y[val])
        x_test = torch.as_tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
        self.test_set = TensorDataset(x_test, torch.as_tensor(data["y_test"], dtype=torch.long))

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if len(self.val_set) else []

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
