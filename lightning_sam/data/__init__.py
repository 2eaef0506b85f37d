"""The app's data: MNIST-1D (generated locally) and CIFAR-10/100 (python-pickle archives)."""

from lightning_sam.data.cifar import CIFAR10DataModule, CIFAR100DataModule, augment, read_cifar
from lightning_sam.data.mnist1d import MNIST1DDataModule
from lightning_sam.data.split import SplitDataModule, flip_labels, split_indices

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "MNIST1DDataModule",
    "SplitDataModule",
    "augment",
    "flip_labels",
    "read_cifar",
    "split_indices",
]
