"""The run directory of the app: its lock, its Hydra files, what a refused or resumed run leaves there.

A run holds its directory's lock for the whole run; a refused run leaves no directory behind (or puts
back the files its Hydra overwrote in another run's); a resumed run continues in its own directory.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lightning_sam.app.checks import ConfigError
from lightning_sam.app.resume import Resume
from lightning_sam.app.runs import RUN_COPY, RunLock

__all__ = [
    "HYDRA_FILES",
    "check_run_dir",
    "holding",
    "merge_log_and_remove",
    "remember_new_folders",
    "remove_if_unused",
    "restore_holders_files",
    "resume_hint",
    "rewrite_hydra_files",
    "unwritable",
]

# Run directories end in this process's id, so two runs started in the same second get their own.
_RUN_ID = str(os.getpid())
OmegaConf.register_new_resolver("run_id", lambda: _RUN_ID, replace=True)
HYDRA_FILES = {".hydra", "train.log", "debug.log"}  # what Hydra writes into a run directory by itself


@contextmanager
def holding(cfg: DictConfig) -> Iterator[None]:
    """The run directory's lock, for the whole run; a directory in use by another run is a config error.

    A refused run's Hydra has written its .hydra/ files into the directory before it was refused: the
    holder's own are written again (and kept in ``.run/``) once the directory's checks pass, and when it
    ends; a refused run puts the holder's back.
    """
    lock = RunLock(cfg.output_dir)
    try:
        lock.__enter__()
    except RuntimeError as err:
        raise ConfigError(str(err)) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def rewrite_hydra_files(cfg: DictConfig) -> None:
    """Write this run's .hydra/ files again once it holds the directory (a refused run may have overwritten them)."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None, throw_on_missing=False)
    if output_dir is None or hydra_cfg.output_subdir is None or Path(output_dir) != Path(cfg.output_dir):
        return  # composed without a run (tests), or a resumed run writing into its own directory
    folder = Path(output_dir) / str(hydra_cfg.output_subdir)
    if not folder.is_dir():
        return
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    copy = Path(output_dir) / RUN_COPY
    copy.mkdir(exist_ok=True)
    for target in (folder, copy):
        OmegaConf.save(task, target / "config.yaml", resolve=False)
        OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), target / "overrides.yaml")
    if (folder / "hydra.yaml").is_file():
        shutil.copyfile(folder / "hydra.yaml", copy / "hydra.yaml")


def restore_holders_files(run_dir: Path) -> None:
    """Put back the .hydra/ files of the run that holds (or held) ``run_dir``, after this run was refused."""
    copy, folder = run_dir / RUN_COPY, run_dir / ".hydra"
    if copy.is_dir() and folder.is_dir():
        for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
            if (copy / name).is_file():
                shutil.copyfile(copy / name, folder / name)


def check_run_dir(cfg: DictConfig, resume: Resume) -> None:
    """A directory holding another run's checkpoints is refused, unless this run resumes it."""
    checkpoints = Path(cfg.output_dir) / "checkpoints"
    found = sorted(checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else []
    resuming_it = resume.path is not None and Path(resume.path).resolve().parent == checkpoints.resolve()
    if found and not resuming_it:
        raise ConfigError(
            f"The run directory {cfg.output_dir} already holds the checkpoints of another run "
            f"({', '.join(p.name for p in found[:3])}). Resume it with ckpt_path={checkpoints / 'last.ckpt'}, "
            "or pick another directory (hydra.run.dir=...)."
        )


_NEW_FOLDERS: list[Path] = []  # the folders above the run directory that did not exist before this command


def remember_new_folders(cfg: DictConfig | None, multirun: bool) -> None:
    """Note which folders above the run (or sweep) directory of ``cfg`` do not exist yet (``outputs/train``)."""
    _NEW_FOLDERS.clear()
    if cfg is None:
        return
    try:
        where = OmegaConf.select(
            cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir", throw_on_resolution_failure=True
        )
    except Exception:  # an interpolation only Hydra's run can resolve: nothing to note
        return
    if not isinstance(where, str):
        return
    parent = Path(where).absolute().parent
    _NEW_FOLDERS[:] = [p for p in (parent, *parent.parents) if not p.exists()]


def remove_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds only what Hydra wrote for a run that never started.

    The folders above it that this command created (see :func:`remember_new_folders`) go too, if empty.
    """
    if not run_dir.is_dir():
        return
    lock = run_dir / ".run.lock"
    names = {p.name for p in run_dir.iterdir()} - ({lock.name} if lock.is_file() and not lock.stat().st_size else set())
    if names <= HYDRA_FILES:  # a held lock (not empty) or a copy in .run/: another run's directory
        shutil.rmtree(run_dir, ignore_errors=True)
        for folder in _NEW_FOLDERS:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty (another run's), or gone
                break


def merge_log_and_remove(hydra_dir: Path, run_dir: Path) -> None:
    """Append a resumed run's log to its run directory's ``train.log``, then remove the resume's own folder."""
    log_file = hydra_dir / "train.log"
    if log_file.is_file():
        with (run_dir / "train.log").open("a") as out:
            out.write(log_file.read_text())
    remove_if_unused(hydra_dir)


def resume_hint(cfg: DictConfig) -> str:
    """The command that resumes the run from its ``last.ckpt`` (or why there is nothing to resume)."""
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return "No epoch had finished, so there is nothing to resume: start the run again."
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    command = ["python", "-m", "lightning_sam.train", *overrides, f"ckpt_path={last}"]
    return f"Resume with:\n  {shlex.join(command)}"


def unwritable(error: BaseException | None) -> str | None:
    """What could not be written, if ``error`` (or what caused it) is a refused write (permission, read-only)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = error.filename or "a file of the run"
            return f"{where} ({error.strerror or error})"
        error = error.__cause__ or error.__context__
    return None
