"""What every data module of the app shares: a seeded validation split, label noise and loaders."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

__all__ = ["SplitDataModule", "check_split_args", "flip_labels", "split_indices"]


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


class SplitDataModule(pl.LightningDataModule):
    """Base of the app's data modules: ``setup`` fills ``train_set``, ``val_set`` and ``test_set``.

    Args:
        batch_size: samples per batch, at least 1.
        num_workers: DataLoader workers.
        val_fraction: the part of the training split held out for validation, in [0, 1).
        label_noise: the fraction of the remaining training labels replaced by a different,
            uniformly random class (decided by ``seed``), in [0, 1). Validation and test labels
            stay clean.
        seed: decides the validation split and the noisy labels.
    """

    num_classes: int

    def __init__(
        self, batch_size: int = 128, num_workers: int = 0, val_fraction: float = 0.1, label_noise: float = 0.0,
        seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        check_split_args(batch_size, val_fraction, label_noise)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.label_noise, self.seed = val_fraction, label_noise, seed

    def split(self, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> None:
        """Hold out the validation part, add label noise to the rest, keep the test split as it is."""
        train, val = split_indices(len(y), self.val_fraction, self.seed)
        self.clean_train_labels = y[train]
        self.train_set = TensorDataset(x[train], flip_labels(y[train], self.label_noise, self.num_classes, self.seed))
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x_test, y_test)

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> Any:
        return self._loader(self.val_set, shuffle=False) if len(self.val_set) else []

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
