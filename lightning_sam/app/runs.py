"""What keeps a training run's directory safe: atomic checkpoints, a lock, a CSV log that resumes, signals.

Used by the training app (:mod:`lightning_sam.app`) and usable with any Trainer:
``Trainer(plugins=[AtomicCheckpointIO()], logger=RunCSVLogger(run_dir))``. No Hydra import.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

__all__ = [
    "RUN_COPY",
    "AtomicCheckpointIO",
    "Interrupted",
    "RunCSVLogger",
    "RunLock",
    "is_disk_full",
    "raise_on_signals",
]

#: A run directory's own copy of its .hydra/ files (a run refused there may have Hydra overwrite those).
RUN_COPY = ".run"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same directory, then renames it into place.

    A full disk, a crash or a signal during the write leaves the previous file under that name (or
    none), never a truncated one; the partial temporary file is removed.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(plugins=[AtomicCheckpointIO()], logger=False)
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"`storage_options` is not supported by {type(self).__name__}, got {storage_options!r}.")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # as an ordinary file would be (mkstemp makes it 0600)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing ``metrics.csv`` instead of deleting it.

    Rows logged at or after ``resume_step`` (the global step of the checkpoint a run resumes from) are
    dropped: the resumed run logs them again.
    """

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    @override
    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if self._resume_step is not None and _step(r) < self._resume_step]
        if self._resume_step is None:  # a new run in a directory that has a log: start it afresh
            path.unlink()
            return
        self.metrics_keys = header
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` for a run directory that may be resumed.

    Unlike ``CSVLogger``, it neither warns about nor deletes an existing ``metrics.csv`` when resuming
    (``resume_step`` set): the rows up to the checkpoint are kept and the run continues the file.

    Args:
        save_dir: the run directory.
        resume_step: the global step of the checkpoint the run resumes from (``None``: a new run).
        **kwargs: passed to ``CSVLogger`` (``name``, ``version``, ...).
    """

    def __init__(self, save_dir: str, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir, **kwargs)
        self.resume_step = resume_step

    @property
    @override
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir, resume_step=self.resume_step)
        return self._experiment


class RunLock:
    """Marks a run directory as in use by this process: an exclusive ``flock`` on ``.run.lock``.

    A second process that takes the same directory is refused while the first holds it; the kernel
    releases the lock when its process dies (``kill -9`` included), so no stale lock is left. The file
    names the holder (``host:pid``) while it is held and is empty afterwards.

    Example::

        >>> import tempfile
        >>> with RunLock(tempfile.mkdtemp()) as lock:
        ...     lock.path.name
        '.run.lock'
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / ".run.lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RuntimeError(
                f"{self.path.parent} is in use by another run ({owner}). Pick another directory "
                "(hydra.run.dir=...), or wait for that run to end."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()}:{os.getpid()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def raise_on_signals(*signums: int) -> Iterator[None]:
    """Turn the given signals into :class:`Interrupted` in the main thread, inside the block only.

    Lightning adds its own SIGTERM handler in front of one already installed and then calls it, so this
    composes with Lightning's (which stops DDP worker processes).
    """
    signums = signums or (signal.SIGINT, signal.SIGTERM)

    def handler(signum: int, _: Any) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a "no space left on device"."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return False
