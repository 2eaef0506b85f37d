"""The training app: ``python -m lightning_sam.train [overrides]`` (Hydra 1.3).

Trains a classifier on the configured data with SAM (or without, ``sam=none``), validates on a part
of the training split held out, tests once on the test split and prints a summary. Configs: the
top-level ``configs/`` of the repository, shipped in the wheel as ``lightning_sam.configs``.

Examples::

    python -m lightning_sam.train                          # MNIST-1D, SAM rho 0.05, 30 epochs
    python -m lightning_sam.train sam=asam sam.rho=1.0 optimizer=adamw
    python -m lightning_sam.train -m sam.rho=0.02,0.05,0.1  # a sweep
    python -m lightning_sam.train experiment=cifar10_wrn28_10_sam data.download=true

This is the only module of the package that imports Hydra.
"""

from __future__ import annotations

import errno
import inspect
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_sam.callbacks import SharpnessMonitor
from lightning_sam.command_line import CommandLineError, check_command_line
from lightning_sam.methods import method_from_config
from lightning_sam.models import Classifier, SAMClassifier
from lightning_sam.runs import AtomicCheckpointIO, Interrupted, RunLock, is_disk_full, raise_on_signals
from lightning_sam.step import ModuleLayout

__all__ = ["load_run", "main", "train"]

log = logging.getLogger(__name__)

# Run directories end in this process's id, so two runs started in the same second get their own.
_RUN_ID = str(os.getpid())
OmegaConf.register_new_resolver("run_id", lambda: _RUN_ID, replace=True)
_HYDRA_FILES = {".hydra", "train.log", "debug.log"}  # what Hydra writes into a run directory by itself
_RUN_COPY = ".run"  # the holder's own copy of its .hydra/ files, which a refused run's Hydra overwrites


class ConfigError(ValueError):
    """A config value is invalid; the message names its key and what is accepted."""


def _build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate`` the node at ``key`` (dotted), with errors that name the full key the user typed.

    ``rho`` becomes ``sam.rho``, ``mode`` ``callbacks.checkpoint.mode``; a value set by an interpolation
    names its source: GSAM's ``lr_max`` is ``optimizer.lr``.
    """
    node = OmegaConf.select(cfg, key)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"Invalid `{key}` config: {_name_keys(str(cause), node, key)}") from cause


def _leaf_keys(node: Any, prefix: str) -> dict[str, str]:
    """``{name: how to name it}`` for every key below ``node``: its full key, or the key it interpolates from."""
    found: dict[str, str] = {}
    if not isinstance(node, DictConfig):
        return found
    for name in node:
        full = f"{prefix}.{name}"
        raw = OmegaConf.to_container(node, resolve=False)[name]  # type: ignore[index]
        source = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
        found.setdefault(str(name), f"`{source.group(1)}` (through `{full}`)" if source else f"`{full}`")
        for sub, named in _leaf_keys(node._get_node(name), full).items():
            found.setdefault(sub, named)
    return found


def _name_keys(message: str, node: Any, prefix: str) -> str:
    """``message`` with each backquoted argument name replaced by the full config key (see :func:`_build`)."""
    keys = _leaf_keys(node, prefix)
    return re.sub(r"`(\w+)`", lambda m: keys.get(m.group(1), m.group(0)), message)


def _enabled(node: Any) -> bool:
    return isinstance(node, DictConfig) and node.get("_target_") is not None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job from a composed config; returns the metrics and where things are.

    Raises:
        ConfigError: a config value is invalid (before any training); the message names the key.
    """
    start = time.perf_counter()
    # torch's own deprecation notice, raised inside Lightning on every run: not the user's to act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    _check_top_level(cfg)
    resume = _Resume.of(cfg)
    if resume.run_dir is not None:  # a run of this app: it continues in its own directory
        with open_dict(cfg):
            cfg.output_dir = str(resume.run_dir)
    rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    with _holding(cfg) if rank_zero else nullcontext():
        if rank_zero:
            _check_run_dir(cfg, resume)
        return _train(cfg, resume, start)


@contextmanager
def _holding(cfg: DictConfig) -> Iterator[None]:
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


def _rewrite_hydra_files(cfg: DictConfig) -> None:
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
    copy = Path(output_dir) / _RUN_COPY
    copy.mkdir(exist_ok=True)
    for target in (folder, copy):
        OmegaConf.save(task, target / "config.yaml", resolve=False)
        OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), target / "overrides.yaml")
    if (folder / "hydra.yaml").is_file():
        shutil.copyfile(folder / "hydra.yaml", copy / "hydra.yaml")


def _restore_holders_files(run_dir: Path) -> None:
    """Put back the .hydra/ files of the run that holds (or held) ``run_dir``, after this run was refused."""
    copy, folder = run_dir / _RUN_COPY, run_dir / ".hydra"
    if copy.is_dir() and folder.is_dir():
        for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
            if (copy / name).is_file():
                shutil.copyfile(copy / name, folder / name)


def _train(cfg: DictConfig, resume: _Resume, start: float) -> dict[str, Any]:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # before the model is built: its initial weights too
    # Everything that can be wrong with the config fails here, before any training.
    datamodule = _build(cfg, "data")
    use_sam = _enabled(cfg.sam)
    sam = _build(cfg, "sam") if use_sam else None
    net = _build(cfg, "model", num_classes=datamodule.num_classes)
    optimizer = _build(cfg, "optimizer")
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    _check_schedule(cfg, trainer_cfg)
    scheduler = _build(cfg, "scheduler") if _enabled(cfg.scheduler) else None
    _prepare_data(cfg, datamodule)  # generates MNIST-1D, or finds (or downloads) the CIFAR archive
    _check_model_takes_data(cfg, net, datamodule)
    if use_sam:
        model: Classifier = SAMClassifier(net, datamodule.num_classes, optimizer, scheduler, sam=sam)
        try:
            ModuleLayout.of(model, sam)
        except ValueError as err:
            raise ConfigError(f"Invalid `sam.only={sam.only!r}`: {err}") from err
        except TypeError as err:
            raise ConfigError(f"model={_choices(cfg).get('model', '?')} cannot be trained with SAM: {err}") from err
    else:
        model = Classifier(net, datamodule.num_classes, optimizer, scheduler)
    _check_optimization(cfg, model, trainer_cfg)
    resume.check_against(cfg, model, sam)
    callbacks = [_build(cfg, f"callbacks.{name}") for name, node in cfg.callbacks.items() if _enabled(node)]
    if not use_sam:
        callbacks = [c for c in callbacks if not isinstance(c, SharpnessMonitor)]
    _check_monitors(cfg, logged=model.logged_keys(sam_steps=use_sam))
    resumable = {"resume_step": resume.step}  # RunCSVLogger continues metrics.csv from the checkpoint's step
    loggers = [
        _build(cfg, f"logger.{name}", **(resumable if node._target_.endswith("RunCSVLogger") else {}))
        for name, node in cfg.logger.items()
        if _enabled(node)
    ]
    plugins = [AtomicCheckpointIO()]  # a crash or a full disk never leaves a truncated checkpoint
    if resume.run_dir is not None:  # its checkpoints are this run's own
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    trainer = _build_trainer(trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    if isinstance(model, SAMClassifier):
        _check_method_takes_trainer(cfg, model, trainer, trainer_cfg)
    log.info("Training %s with %s", type(net).__name__, sam if use_sam else "no SAM")
    if trainer.is_global_zero:
        _rewrite_hydra_files(cfg)  # every check passed and this run holds the directory: its own .hydra/ files
        resume.record(cfg)  # a resume that changed what may change: the run's config follows it
    try:
        return _fit_and_test(cfg, trainer, model, datamodule, resume, sam, start)
    finally:
        if trainer.is_global_zero:  # a run refused meanwhile had Hydra overwrite them
            _rewrite_hydra_files(cfg)


def _fit_and_test(
    cfg: DictConfig, trainer: pl.Trainer, model: Classifier, datamodule: Any, resume: _Resume, sam: Any, start: float
) -> dict[str, Any]:
    fit_start = time.perf_counter()
    trainer.fit(model, datamodule, ckpt_path=resume.path)
    fit_seconds = time.perf_counter() - fit_start

    result: dict[str, Any] = {
        "output_dir": cfg.output_dir,
        "sam": repr(sam) if sam is not None else "none",
        "global_step": trainer.global_step,
        "fit_seconds": fit_seconds,  # training and validation, without the set-up and the test
    }
    result["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}  # of training
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_score is not None:
        result["best_val"] = float(checkpoint.best_model_score)  # the monitored value (val/acc)
    if cfg.get("test", True):
        best = checkpoint.best_model_path if checkpoint else ""
        tested = best or "the weights at the end of training"
        test = trainer.test(model, datamodule, ckpt_path=best or None, verbose=False)
        result.update(test[0] if test else {})
        result["tested_checkpoint"] = tested
    result["minutes"] = (time.perf_counter() - start) / 60
    _print_summary(trainer, result)
    return result


class _Resume:
    """What ``ckpt_path`` says: the checkpoint, its global step and, for a run of this app, its directory."""

    def __init__(self, path: str | None, checkpoint: dict | None, run_dir: Path | None) -> None:
        self.path, self.checkpoint, self.run_dir = path, checkpoint, run_dir
        self.step = None if checkpoint is None else int(checkpoint.get("global_step", 0))
        self.changes: dict[str, tuple[Any, Any]] = {}  # config keys this resume changed (allowed ones)

    @classmethod
    def of(cls, cfg: DictConfig) -> _Resume:
        path = cfg.get("ckpt_path")
        if path is None:
            return cls(None, None, None)
        if not isinstance(path, str) or not Path(path).is_file():
            raise ConfigError(f"Expected `ckpt_path` to be a checkpoint file, got {path!r}: no such file.")
        if Path(path).stat().st_size == 0:
            raise ConfigError(f"Expected `ckpt_path` to be a checkpoint file, got {path!r}: the file is empty.")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, garbage, or not a torch file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"Expected `ckpt_path` to be a checkpoint file, got {path!r}: it cannot be read ({reason})."
            ) from err
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ConfigError(f"Expected `ckpt_path` to be a Lightning checkpoint, got {path!r}: it has no state_dict.")
        run = Path(path).resolve().parent.parent
        is_run = Path(path).resolve().parent.name == "checkpoints" and (run / ".hydra" / "config.yaml").is_file()
        return cls(path, checkpoint, run if is_run else None)

    def check_against(self, cfg: DictConfig, model: pl.LightningModule, sam: Any) -> None:
        """Refuse a checkpoint of another model; warn when the method changes."""
        if self.checkpoint is None:
            return
        here = model.state_dict()
        there = self.checkpoint["state_dict"]
        for key in sorted(set(here) | set(there)):
            if key not in here or key not in there or tuple(here[key].shape) != tuple(there[key].shape):
                old, new = (tuple(d[key].shape) if key in d else "missing" for d in (there, here))
                raise ConfigError(
                    f"`ckpt_path={self.path}` holds another model: `{key}` is {old} in the checkpoint and "
                    f"{new} with this config{self._differing_model_keys(cfg)}."
                )
        saved = (self.checkpoint.get("lightning_sam") or {}).get("config")
        saved_method = method_from_config(saved) if saved else None
        if saved_method is not None and sam is None:
            log.warning("ckpt_path was trained with %r; resuming it with sam=none (no SAM) from here on.", saved_method)
        self.changes = self._compare_configs(cfg)

    def _run_config(self) -> DictConfig:
        assert self.run_dir is not None
        saved = self.run_dir / _RUN_COPY / "config.yaml"
        return OmegaConf.load(saved if saved.is_file() else self.run_dir / ".hydra" / "config.yaml")  # type: ignore[return-value]

    def _compare_configs(self, cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
        """Refuse, naming every key, a resume whose config differs where the run cannot honestly continue.

        The run's own config (its directory's) and this one are compared resolved, so a value that
        follows another (``scheduler.T_max: ${trainer.max_epochs}``) counts where it lands. Keys in
        :data:`MAY_CHANGE_ON_RESUME` may differ; their changes are returned as ``{key: (old, new)}``.
        """
        if self.run_dir is None:
            return {}
        run_cfg = self._run_config()
        with open_dict(run_cfg):
            run_cfg.output_dir = cfg.output_dir  # where the run is, in both
        old = _flat(_container(run_cfg))
        new = _flat(_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
        differing = [k for k in sorted(set(old) | set(new)) if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
        refused = [k for k in differing if not _may_change(k)]
        if refused:
            shown = "; ".join(
                f"`{k}`: {_show(old.get(k, _ABSENT))} in the run, {_show(new.get(k, _ABSENT))} now{_follows(cfg, k)}"
                for k in refused
            )
            raise ConfigError(
                f"`ckpt_path={self.path}` resumes a run whose config differs where it cannot continue: {shown}. Resume "
                "with the run's values, or start a new run; keys that may change on resume: "
                f"{', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in MAY_CHANGE_ON_RESUME)}."
            )
        kept = [k for k in differing if k not in ("ckpt_path", "output_dir")]
        return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in kept}

    def record(self, cfg: DictConfig) -> None:
        """Keep the changes this resume made in the run's directory: its config and ``resumes.yaml``."""
        if self.run_dir is None or not self.changes:
            return
        for key, (old, new) in self.changes.items():
            log.warning("Resumed with %s=%s (the run had %s).", key, _show(new), _show(old))
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "ckpt_path")])
        for folder in (self.run_dir / _RUN_COPY, self.run_dir / ".hydra"):
            if folder.is_dir():
                OmegaConf.save(task, folder / "config.yaml", resolve=False)
        history = self.run_dir / "resumes.yaml"
        entries = OmegaConf.to_container(OmegaConf.load(history)) if history.is_file() else []
        change = {k: {"was": _plain(old), "now": _plain(new)} for k, (old, new) in self.changes.items()}
        entries.append({"global_step": self.step, "ckpt_path": str(self.path), "changed": change})  # type: ignore[union-attr]
        OmegaConf.save(OmegaConf.create(entries), history)

    def _differing_model_keys(self, cfg: DictConfig) -> str:
        if self.run_dir is None:
            return ""
        old = self._run_config().get("model", {})
        keys = [
            f"model.{k}={old.get(k)!r} there, {cfg.model.get(k)!r} here"
            for k in cfg.model
            if old.get(k) != cfg.model.get(k)
        ]
        return f" ({'; '.join(keys)})" if keys else ""


#: Keys (``.``: every key below) that may differ when a run is resumed: its length (when no schedule
#: follows it), what is observed and logged, where the data is, and the SAM method itself (whose change
#: the module warns about). Everything else (model, data, optimizer, scheduler, seed, precision, devices,
#: accumulation, clipping, the best-checkpoint tracking) is refused.
MAY_CHANGE_ON_RESUME = (
    "trainer.max_epochs", "trainer.max_steps", "trainer.limit_val_batches", "trainer.limit_test_batches",
    "trainer.log_every_n_steps", "trainer.accelerator", "test", "data.num_workers", "data.data_dir", "data.download",
    "sam.", "logger.", "callbacks.sharpness.", "callbacks.lr_monitor.", "callbacks.progress.", "callbacks.hessian.",
    "task_name", "ckpt_path", "output_dir",
)  # fmt: skip
_ABSENT = "(not set)"


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE_ON_RESUME)


def _container(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:  # an interpolation that cannot be resolved here: compare as written
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for a nested dict (lists stay values)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _follows(cfg: DictConfig, key: str) -> str:
    """`` (it follows `x`)`` when ``key``'s value is the interpolation ``${x}`` in ``cfg``."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or name not in node:
        return ""
    raw = OmegaConf.to_container(node, resolve=False).get(name)  # type: ignore[union-attr]
    source = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
    return f" (it follows `{source.group(1)}`)" if source else ""


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, list, type(None))) else str(value)


def _check_run_dir(cfg: DictConfig, resume: _Resume) -> None:
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


def _prepare_data(cfg: DictConfig, datamodule: Any) -> None:
    try:
        datamodule.prepare_data()
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from err
    except OSError as err:  # e.g. data.download=true without a network
        reason = getattr(err, "reason", None) or err
        raise ConfigError(
            f"Could not get the data for data={_choices(cfg).get('data', '?')} into "
            f"data.data_dir={cfg.data.get('data_dir')!r} ({reason}). Put the archive there yourself, or check the "
            "network for data.download=true."
        ) from err


def _check_top_level(cfg: DictConfig) -> None:
    """Type and range checks Hydra cannot do for us, with the key in the message, before anything is built."""
    optimizer, model, data = cfg.optimizer, cfg.model, cfg.data
    checks = [
        ("seed", cfg.get("seed"), lambda v: _is_int(v, 0) and v < 2**32, "an int in [0, 2**32)"),
        ("test", cfg.get("test", True), lambda v: isinstance(v, bool), "true or false"),
        ("trainer.max_epochs", cfg.trainer.get("max_epochs"), lambda v: v is None or v == -1 or _is_int(v, 1),
         "an int >= 1 (or -1 with trainer.max_steps, no end by epochs)"),
        ("trainer.max_steps", cfg.trainer.get("max_steps", -1), lambda v: v == -1 or _is_int(v, 1),
         "-1 or an int >= 1"),
        ("trainer.limit_train_batches", cfg.trainer.get("limit_train_batches", 1.0),
         lambda v: _is_number(v) and v > 0, "a positive number (0 would train nothing)"),
        ("trainer.accumulate_grad_batches", cfg.trainer.get("accumulate_grad_batches", 1), lambda v: _is_int(v, 1),
         "an int >= 1"),
        ("trainer.gradient_clip_val", cfg.trainer.get("gradient_clip_val"),
         lambda v: v is None or (_is_number(v) and v >= 0), "null or a non-negative number"),
        ("trainer.gradient_clip_algorithm", cfg.trainer.get("gradient_clip_algorithm", "norm"),
         lambda v: v in ("norm", "value"), "one of 'norm', 'value'"),
        ("optimizer.lr", optimizer.get("lr"), lambda v: _is_number(v) and v >= 0, "a non-negative number"),
        ("optimizer.momentum", optimizer.get("momentum", 0.0), lambda v: _is_number(v) and 0 <= v <= 1,
         "a number in [0, 1]"),
        ("optimizer.weight_decay", optimizer.get("weight_decay", 0.0), lambda v: _is_number(v) and v >= 0,
         "a non-negative number"),
        ("optimizer.betas", optimizer.get("betas", [0.9, 0.999]),
         lambda v: len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
        ("model.dropout", model.get("dropout", 0.0), lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("data.num_workers", data.get("num_workers", 0), lambda v: _is_int(v, 0), "an int >= 0"),
        ("data.val_fraction", data.get("val_fraction", 0.1), lambda v: _is_number(v) and 0 <= v < 1,
         "a fraction in [0, 1)"),
    ]  # fmt: skip
    checks += [(f"model.{k}", model.get(k), lambda v: _is_int(v, 1), "an int >= 1")
               for k in ("channels", "depth", "width") if k in model]  # fmt: skip
    for key, value, ok, accepted in checks:
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"Expected `{key}` to be {accepted}, got {value!r}.")
    if cfg.data.get("val_fraction", 0.1) == 0:
        log.warning(
            "data.val_fraction=0: no validation split, so no best checkpoint can be chosen; the weights at the end "
            "of training are tested."
        )


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_schedule(cfg: DictConfig, trainer_cfg: dict) -> None:
    """A schedule that needs the length of the run gets one."""
    if _enabled(cfg.scheduler) and "T_max" in cfg.scheduler:
        t_max = cfg.scheduler.T_max
        if not _is_int(t_max, 1):
            raise ConfigError(
                f"Expected `scheduler.T_max` to be an int >= 1 (epochs to decay over), got {t_max!r}: with "
                f"trainer.max_epochs={trainer_cfg.get('max_epochs')!r} the run has no end by epochs. Set "
                "scheduler.T_max, or use scheduler=none or scheduler=step."
            )
    _warn_unreached_milestones(cfg, trainer_cfg)


def _check_optimization(cfg: DictConfig, model: Classifier, trainer_cfg: dict) -> None:
    """Build the optimizer and scheduler as ``configure_optimizers`` does, and step the schedule over the run.

    What a constructor refuses (``optimizer.nesterov=true`` with ``momentum=0``, a negative ``eps``), a
    schedule that fails at some epoch or would give a negative or non-finite learning rate
    (``scheduler.eta_min=-1``) is refused now, naming the key: the one whose return to the class's
    default lets the build and the schedule pass.
    """
    for group in ("optimizer", "scheduler"):
        if _enabled(cfg[group]):
            _check_types(cfg, group)
    epochs = trainer_cfg.get("max_epochs")
    epochs = min(epochs, 10_000) if _is_int(epochs, 1) else 0

    def from_config(trial: DictConfig) -> None:
        opt = instantiate(trial.optimizer)(model.parameters())
        _run_schedule(opt, instantiate(trial.scheduler)(opt) if _enabled(trial.scheduler) else None, epochs)

    try:
        configured = model.configure_optimizers()  # the code that will build them at fit
        if isinstance(configured, dict):  # with a scheduler
            _run_schedule(configured["optimizer"], configured["lr_scheduler"]["scheduler"], epochs)
    except Exception as err:
        raise ConfigError(_blame(cfg, ("optimizer", "scheduler"), from_config, err)) from err


class _BadLearningRate(ValueError):
    pass


def _run_schedule(optimizer: torch.optim.Optimizer, scheduler: Any, epochs: int) -> None:
    """Step ``scheduler`` once per epoch of the run; raise if a learning rate is not a finite number >= 0."""
    if scheduler is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for epoch in range(1, epochs + 1):
            scheduler.step()
            for group in optimizer.param_groups:
                lr = float(group["lr"])
                if not math.isfinite(lr) or lr < 0:
                    raise _BadLearningRate(
                        f"the learning rate would be {lr:g} at epoch {epoch} ({type(scheduler).__name__}); it must "
                        "stay finite and >= 0"
                    )


def _defaults(target: str) -> dict[str, Any]:
    """The default of each argument of the class ``target`` that has one."""
    try:
        signature = inspect.signature(get_class(target))
    except (ValueError, TypeError, ImportError):  # no signature to read
        return {}
    return {n: p.default for n, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def _check_types(cfg: DictConfig, group: str) -> None:
    """A value whose default is a number (or true/false) must be one: ``scheduler.gamma=abc`` is refused."""
    node = cfg[group]
    for name, default in _defaults(node._target_).items():
        if name not in node:
            continue
        value = node[name]
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"Expected `{group}.{name}` to be true or false, got {value!r}.")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and not _is_number(value):
            raise ConfigError(f"Expected `{group}.{name}` to be a number, got {value!r}.")


def _blame(cfg: DictConfig, groups: tuple[str, ...], attempt: Any, err: Exception) -> str:
    """The keys of ``groups`` whose return to the class's default makes ``attempt(config)`` pass, with ``err``."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    culprits = []
    for group in groups:
        node = cfg[group]
        if not _enabled(node):
            continue
        for name, default in _defaults(node._target_).items():
            if name not in node or node[name] == default:
                continue
            trial = cfg.copy()
            with open_dict(trial):
                trial[group] = node.copy()
                trial[group][name] = default
            try:
                attempt(trial)
            except Exception:  # this key alone does not explain it
                continue
            culprits.append(f"{group}.{name}={_show(node[name])}")
    if not culprits:
        targets = ", ".join(str(cfg[g]._target_) for g in groups if _enabled(cfg[g]))
        return f"Invalid {' / '.join(f'`{g}`' for g in groups)} config ({targets}): {reason}."
    return f"Invalid `{'`, `'.join(culprits)}`: {reason}."


def _show(value: Any) -> str:
    """A config value as one types it on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _build_trainer(trainer_cfg: dict, **kwargs: Any) -> pl.Trainer:
    """The Trainer of the run; what its constructor refuses names the key (``trainer.devices=0``)."""
    try:
        return instantiate(trainer_cfg, **kwargs)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        defaults = _defaults(trainer_cfg["_target_"])
        culprits = []
        for name, value in trainer_cfg.items():
            if name not in defaults or value == defaults[name]:
                continue
            trial = {**trainer_cfg, name: defaults[name]}
            try:
                with _quiet_lightning():
                    instantiate(trial, logger=False, enable_checkpointing=False)
            except Exception:  # this key alone does not explain it
                continue
            culprits.append(f"trainer.{name}={_show(value)}")
        if not culprits:
            raise ConfigError(f"The Trainer refused the `trainer` config: {reason}") from err
        hint = " (no GPU here: trainer=cpu)" if "trainer.accelerator=gpu" in culprits else ""
        raise ConfigError(f"Invalid `{'`, `'.join(culprits)}`{hint}: {reason}") from err


def _check_method_takes_trainer(cfg: DictConfig, model: SAMClassifier, trainer: pl.Trainer, trainer_cfg: dict) -> None:
    """What the SAM module refuses of the Trainer at fit (``sam=gsam`` with accumulation), refused now."""
    try:
        model._sam_check_trainer(trainer)
    except (ValueError, TypeError) as err:
        message = re.sub(
            r"`(\w+)(=[^`]*)?`",
            lambda m: f"`trainer.{m.group(1)}{m.group(2) or ''}`" if m.group(1) in trainer_cfg else m.group(0),
            str(err),
        )
        raise ConfigError(f"`sam={_choices(cfg).get('sam', '?')}` cannot train with this Trainer: {message}") from err


def _check_monitors(cfg: DictConfig, logged: set[str]) -> None:
    """Every monitored metric is one the module logs (else it would fail after an epoch of training)."""
    for name, node in cfg.callbacks.items():
        monitor = node.get("monitor") if _enabled(node) else None
        if monitor is not None and monitor not in logged:
            raise ConfigError(
                f"Expected `callbacks.{name}.monitor` to be one of {sorted(logged)} (what the model logs), "
                f"got {monitor!r}."
            )


def _check_model_takes_data(cfg: DictConfig, net: torch.nn.Module, datamodule: Any) -> None:
    """Run the model on two blank samples of the data's shape, so a mismatch fails before training."""
    shape = getattr(datamodule, "input_shape", None)
    if shape is None:
        return
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(2, *shape))
    except RuntimeError as err:
        choices = _choices(cfg)
        raise ConfigError(
            f"model={choices.get('model', '?')} does not take the inputs of data={choices.get('data', '?')} "
            f"(samples of shape {tuple(shape)}): {err}"
        ) from err
    finally:
        net.train(training)


def _warn_unreached_milestones(cfg: DictConfig, trainer_cfg: dict) -> None:
    milestones = cfg.scheduler.get("milestones") if _enabled(cfg.scheduler) else None
    max_epochs = trainer_cfg.get("max_epochs")
    if milestones and isinstance(max_epochs, int) and max_epochs >= 0 and min(milestones) >= max_epochs:
        log.warning(
            "scheduler.milestones=%s are all at or beyond trainer.max_epochs=%s: the learning rate never drops. "
            "Set scheduler.milestones to epochs within the run.",
            list(milestones),
            max_epochs,
        )


def _choices(cfg: DictConfig) -> dict[str, Any]:
    """The chosen option of each config group (``model: cnn1d``, ...), where Hydra knows them."""
    if HydraConfig.initialized():
        return dict(HydraConfig.get().runtime.choices)
    return dict(cfg.get("hydra", {}).get("runtime", {}).get("choices", {}))


def _print_summary(trainer: pl.Trainer, result: dict[str, Any]) -> None:
    if not trainer.is_global_zero:
        return
    lines = [f"method: {result['sam']}"]
    if "test/acc" in result:
        lines.append(f"test accuracy: {result['test/acc']:.4f} (checkpoint: {result['tested_checkpoint']})")
    lines.append(f"time: {result['minutes']:.1f} min, {trainer.global_step} optimizer steps")
    metrics = [Path(lg.log_dir) / "metrics.csv" for lg in trainer.loggers if hasattr(lg, "experiment")]
    csv = next((str(p) for p in metrics if p.exists()), None)
    lines.append(f"run directory: {result['output_dir']}" + (f" (metrics: {csv})" if csv else ""))
    print("\n" + "\n".join(lines), flush=True)


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
    config = run_dir / _RUN_COPY / "config.yaml"
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


def main() -> None:
    """``python -m lightning_sam.train [overrides]``: the command line checked, then the Hydra app run.

    An override Hydra cannot compose (an unknown option, a key missing from the config, bad syntax)
    or a run directory that cannot be written prints one line and exits with status 2 before Hydra
    makes a run directory (``HYDRA_FULL_ERROR=1`` leaves them to Hydra's own report).
    """
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        try:
            check_command_line(sys.argv[1:])
        except CommandLineError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    app()


@hydra.main(version_base="1.3", config_path="pkg://lightning_sam.configs", config_name="train")
def app(cfg: DictConfig) -> float | None:
    """The Hydra task; returns the best validation accuracy (the objective for sweepers, never the test split).

    Config errors print one line and exit with status 2 (``HYDRA_FULL_ERROR=1`` shows the traceback);
    SIGINT/SIGTERM print the command that resumes the run and exit with 128 + the signal's number; a
    full disk or a checkpoint folder that cannot be written prints one line and the resume command.
    """
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with raise_on_signals():
            result = train(cfg)
    except ConfigError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _remove_if_unused(hydra_dir)
        _restore_holders_files(hydra_dir)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as err:
        print(f"\n{err}. {_resume_hint(cfg)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + err.signum) from None
    except Exception as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if is_disk_full(err):
            print(f"error: no space left on device ({err}). {_resume_hint(cfg)}", file=sys.stderr)
            raise SystemExit(1) from None
        unwritable = _unwritable(err)
        if unwritable is None:
            raise
        print(f"error: cannot write {unwritable}. Make it writable. {_resume_hint(cfg)}", file=sys.stderr)
        raise SystemExit(1) from None
    if Path(cfg.output_dir).resolve() != hydra_dir.resolve():  # resumed in its own run directory
        _merge_log_and_remove(hydra_dir, Path(cfg.output_dir))
    return result.get("best_val")


def _unwritable(error: BaseException | None) -> str | None:
    """What could not be written, if ``error`` (or what caused it) is a refused write (permission, read-only)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = error.filename or "a file of the run"
            return f"{where} ({error.strerror or error})"
        error = error.__cause__ or error.__context__
    return None


def _resume_hint(cfg: DictConfig) -> str:
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return "No epoch had finished, so there is nothing to resume: start the run again."
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    command = ["python", "-m", "lightning_sam.train", *overrides, f"ckpt_path={last}"]
    return f"Resume with:\n  {shlex.join(command)}"


def _remove_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds only what Hydra wrote for a run that never started."""
    if not run_dir.is_dir():
        return
    lock = run_dir / ".run.lock"
    names = {p.name for p in run_dir.iterdir()} - ({lock.name} if lock.is_file() and not lock.stat().st_size else set())
    if names <= _HYDRA_FILES:  # a held lock (not empty) or a copy in .run/: another run's directory
        shutil.rmtree(run_dir, ignore_errors=True)


def _merge_log_and_remove(hydra_dir: Path, run_dir: Path) -> None:
    log_file = hydra_dir / "train.log"
    if log_file.is_file():
        with (run_dir / "train.log").open("a") as out:
            out.write(log_file.read_text())
    _remove_if_unused(hydra_dir)


if __name__ == "__main__":
    main()
