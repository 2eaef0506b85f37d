"""CIFAR-10 and CIFAR-100 from the standard python-pickle archives, augmented in torch.

The archives (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``) or their extracted folders
are read from ``data_dir``; with ``download=True`` a missing archive is downloaded and its MD5
checked. Training batches get the paper's basic augmentation (random crop with 4 pixels of zero
padding, horizontal flip) on the device, after the batch is transferred.
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F
from typing_extensions import override

from lightning_sam.data.split import SplitDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "read_cifar"]

_SPECS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "name": "CIFAR-10",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels": "labels",
        "classes": 10,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "name": "CIFAR-100",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "labels": "fine_labels",
        "classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch files: dicts, lists, bytes and numpy arrays, nothing else."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR batch files hold no {module}.{name}; refusing to load it.")


def _load_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="latin1").load()
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch[label_key], dtype=np.int64)


def read_cifar(
    root: str | Path, which: str = "cifar10", download: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)`` as uint8 images (N, 3, 32, 32) and int64 labels.

    Raises:
        FileNotFoundError: neither the extracted folder nor the archive is in ``root`` and
            ``download`` is off.
    """
    spec = _SPECS[which]
    root = Path(root)
    folder = root / spec["folder"]
    archive = root / Path(spec["url"]).name
    if not folder.is_dir():
        if not archive.is_file():
            if not download:
                raise FileNotFoundError(
                    f"{spec['name']} is not in data.data_dir={str(root)!r}: expected the folder {spec['folder']}/ "
                    f"or the archive {archive.name}. Set data.download=true to download it (about 170 MB), "
                    "or put the archive there."
                )
            _download(spec["url"], archive, spec["md5"])
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    train = [_load_batch(folder / name, spec["labels"]) for name in spec["train"]]
    test = [_load_batch(folder / name, spec["labels"]) for name in spec["test"]]

    def cat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.concatenate([p[0] for p in parts])), torch.from_numpy(
            np.concatenate([p[1] for p in parts])
        )

    return (*cat(train), *cat(test))


def _download(url: str, archive: Path, md5: str) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_suffix(".part")
    urllib.request.urlretrieve(url, partial)  # a fixed https URL
    digest = hashlib.md5(partial.read_bytes()).hexdigest()
    if digest != md5:
        partial.unlink()
        raise OSError(f"The download of {url} is corrupt: MD5 {digest}, expected {md5}. Try again.")
    partial.replace(archive)


def augment(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, for a batch (N, C, H, W).

    Example::

        >>> augment(torch.rand(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device) + torch.arange(h, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device) + torch.arange(w, device=x.device)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, channel, dy[:, None, :, None], dx[:, None, None, :]]
    flip = torch.rand(n, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


class CIFAR10DataModule(SplitDataModule):
    """CIFAR-10 with a held-out validation part of the training split and optional label noise.

    Args:
        data_dir: where the archive or its extracted folder is (or is downloaded to).
        download: download the archive when it is missing.
        augment: random crop and flip on training batches.
        **kwargs: ``batch_size``, ``num_workers``, ``val_fraction``, ``label_noise``, ``seed``
            (see :class:`~lightning_sam.data.split.SplitDataModule`).
    """

    which = "cifar10"

    def __init__(
        self, data_dir: str | Path = "data", download: bool = False, augment: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        spec = _SPECS[self.which]
        self.data_dir, self.download, self.augment = Path(data_dir), download, augment
        self.num_classes = spec["classes"]
        self.input_shape = (3, 32, 32)
        self._mean_std = (torch.tensor(spec["mean"]), torch.tensor(spec["std"]))

    @override
    def prepare_data(self) -> None:
        read_cifar(self.data_dir, self.which, self.download)

    @override
    def setup(self, stage: str | None = None) -> None:
        self.split(*read_cifar(self.data_dir, self.which, download=False))

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        x = x.float().div_(255)
        if self.augment and self.trainer is not None and self.trainer.training:
            x = augment(x)
        mean, std = (t.to(x.device)[None, :, None, None] for t in self._mean_std)
        return (x - mean) / std, y


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels); the same arguments as :class:`CIFAR10DataModule`."""

    which = "cifar100"
