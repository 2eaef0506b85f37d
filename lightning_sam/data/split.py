"""What every data module of the app shares: a seeded validation split, label noise and loaders."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

__all__ = ["EpochShuffle", "SplitDataModule", "check_split_args", "flip_labels", "split_indices"]


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


def check_split_args(batch_size: int, val_fraction: float, label_noise: float, seed: int = 0) -> None:
    """Raise a ValueError naming the first invalid argument of a data module."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be an int >= 1, got {batch_size!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"Expected `seed` to be an int (a torch.Generator seed), got {seed!r}.")
    for name, value in (("val_fraction", val_fraction), ("label_noise", label_noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"Expected `{name}` to be a fraction in [0, 1), got {value!r}.")


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


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A random order of ``range(n)`` that depends on ``(seed, epoch)`` only.

    Lightning calls :meth:`set_epoch` before each epoch, so a run resumed from an end-of-epoch
    checkpoint draws the same batches as the run it continues (a plain ``shuffle=True`` draws from
    the global random state, which a checkpoint does not hold).

    Example::

        >>> sampler = EpochShuffle(5, seed=0)
        >>> first = list(sampler); sampler.set_epoch(1); second = list(sampler)
        >>> sorted(first) == sorted(second) == [0, 1, 2, 3, 4], first != second
        (True, True)
        >>> sampler.set_epoch(0); list(sampler) == first
        True
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from now on (Lightning calls this at each epoch's start)."""
        self.epoch = epoch

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


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
    input_shape: tuple[int, ...]  # of one sample, e.g. (1, 40) for MNIST-1D

    def __init__(
        self, batch_size: int = 128, num_workers: int = 0, val_fraction: float = 0.1, label_noise: float = 0.0,
        seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        check_split_args(batch_size, val_fraction, label_noise, seed)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.label_noise, self.seed = val_fraction, label_noise, seed

    def split(self, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> None:
        """Hold out the validation part, add label noise to the rest, keep the test split as it is."""
        train, val = split_indices(len(y), self.val_fraction, self.seed)
        if len(train) == 0:
            raise ValueError(
                f"Expected `val_fraction` to leave at least one of the {len(y)} training samples to train on, got "
                f"{self.val_fraction} (at most {1 - 1 / len(y):.6g})."
            )
        self.clean_train_labels = y[train]
        self.train_set = TensorDataset(x[train], flip_labels(y[train], self.label_noise, self.num_classes, self.seed))
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x_test, y_test)

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    @override
    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None and self.trainer.world_size > 1:
            return self._loader(self.train_set, shuffle=True)  # Lightning's DistributedSampler: (seed, epoch) too
        # the run's seed (seed_everything) and the epoch decide the order: resuming gives the same batches
        sampler = EpochShuffle(len(self.train_set), seed=torch.initial_seed() % 2**31)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    @override
    def val_dataloader(self) -> Any:
        return self._loader(self.val_set, shuffle=False) if len(self.val_set) else []

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
