"""The training app: ``python -m lightning_sam.train [overrides]`` (Hydra 1.3).

Trains a classifier on the configured data with SAM (or without, ``sam=none``), validates on a part
of the training split held out, tests once on the test split and prints a summary. Configs: the
top-level ``configs/`` of the repository, shipped in the wheel as ``lightning_sam.configs``.

Examples::

    python -m lightning_sam.train                          # MNIST-1D, SAM rho 0.05, 30 epochs
    python -m lightning_sam.train sam=asam sam.rho=1.0 optimizer=adamw
    python -m lightning_sam.train -m sam.rho=0.02,0.05,0.1  # a sweep
    python -m lightning_sam.train experiment=cifar10_wrn28_10_sam data.download=true

The app's files: this one (the run, start to end), :mod:`~lightning_sam.app.command_line` (the
command line checked before Hydra runs), :mod:`~lightning_sam.app.checks` (the pre-flight),
:mod:`~lightning_sam.app.resume`, :mod:`~lightning_sam.app.run_dir`, :mod:`~lightning_sam.app.runs`
(checkpoints, logs, locks, signals) and :mod:`~lightning_sam.app.load` (``load_run``).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_sam.app.checks import (
    ConfigError,
    build,
    build_trainer,
    check_batch_limits,
    check_method_takes_trainer,
    check_model_takes_data,
    check_monitors,
    check_optimization,
    check_schedule,
    check_top_level,
    choices,
    enabled,
    prepare_data,
    warn_unreached_milestones,
)
from lightning_sam.app.command_line import (
    MULTIRUN_FLAGS,
    CommandLineError,
    check_command_line,
    is_multirun,
    multirun_flags_first,
    runs_here,
)
from lightning_sam.app.resume import Resume
from lightning_sam.app.run_dir import (
    check_run_dir,
    holding,
    merge_log_and_remove,
    remember_new_folders,
    remove_if_unused,
    restore_holders_files,
    resume_hint,
    rewrite_hydra_files,
    unwritable,
)
from lightning_sam.app.runs import AtomicCheckpointIO, Interrupted, is_disk_full, raise_on_signals
from lightning_sam.callbacks import SharpnessMonitor
from lightning_sam.core.layout import ModuleLayout
from lightning_sam.models import Classifier, SAMClassifier

__all__ = ["ConfigError", "app", "main", "train"]

log = logging.getLogger("lightning_sam.train")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job from a composed config; returns the metrics and where things are.

    Raises:
        ConfigError: a config value is invalid (before any training); the message names the key.
    """
    start = time.perf_counter()
    # torch's own deprecation notice, raised inside Lightning on every run: not the user's to act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    check_top_level(cfg)
    resume = Resume.of(cfg)
    if resume.run_dir is not None:  # a run of this app: it continues in its own directory
        with open_dict(cfg):
            cfg.output_dir = str(resume.run_dir)
    rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    with holding(cfg) if rank_zero else nullcontext():
        if rank_zero:
            check_run_dir(cfg, resume)
        return _train(cfg, resume, start)


def check_sweep(configs: list[DictConfig]) -> None:
    """Every check of a run, on each composed job of a sweep, before the first job starts.

    Nothing is trained or written (a temporary folder stands for each run directory), and what building a
    Trainer changes in torch (deterministic algorithms, cuDNN's benchmark) is put back. A job whose config
    takes a value from Hydra's run (``${hydra:job.num}``), or cannot be built outside it, ends the checks
    here: each job still checks its own config when it starts.

    Raises:
        ConfigError: a job's config is invalid; the message names the key.
    """
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    benchmark, cublas = torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    quiet = logging.getLogger("lightning_sam")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # each job warns for itself when it runs
    try:
        for cfg in configs:
            if _uses_hydras_run(cfg):
                return
            with tempfile.TemporaryDirectory(prefix="lightning_sam_check.") as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = cfg.copy()
                with open_dict(cfg):
                    cfg.output_dir = tmp
                try:
                    check_top_level(cfg)
                    _prepare(cfg, Resume.of(cfg))
                except ConfigError:
                    raise
                except Exception:  # not buildable outside Hydra's run: the job checks it where it runs
                    return
    finally:
        quiet.setLevel(level)
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark = benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def _uses_hydras_run(cfg: DictConfig) -> bool:
    """Whether a value other than ``output_dir`` comes from Hydra's run (``${hydra:job.num}``)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw = {k: v for k, v in raw.items() if k not in ("hydra", "output_dir")}  # type: ignore[union-attr]
    return "${hydra:" in str(raw)


@dataclass
class _Prepared:
    """What a run trains with, built and checked from its config."""

    datamodule: Any
    sam: Any
    model: Classifier
    trainer_cfg: dict
    callbacks: list
    loggers: list


def _prepare(cfg: DictConfig, resume: Resume) -> _Prepared:
    """Build the run from ``cfg``: everything that can be wrong with the config fails here, before any training."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # before the model is built: its initial weights too
    datamodule = build(cfg, "data")
    use_sam = enabled(cfg.sam)
    sam = build(cfg, "sam") if use_sam else None
    net = build(cfg, "model", num_classes=datamodule.num_classes)
    optimizer = build(cfg, "optimizer")
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    check_schedule(cfg, trainer_cfg)
    scheduler = build(cfg, "scheduler") if enabled(cfg.scheduler) else None
    prepare_data(cfg, datamodule)  # generates MNIST-1D, or finds (or downloads) the CIFAR archive
    check_model_takes_data(cfg, net, datamodule)
    if use_sam:
        model: Classifier = SAMClassifier(net, datamodule.num_classes, optimizer, scheduler, sam=sam)
        try:
            ModuleLayout.of(model, sam)
        except ValueError as err:
            raise ConfigError(f"Invalid `sam.only={sam.only!r}`: {err}") from err
        except TypeError as err:
            raise ConfigError(f"model={choices(cfg).get('model', '?')} cannot be trained with SAM: {err}") from err
    else:
        model = Classifier(net, datamodule.num_classes, optimizer, scheduler)
    check_optimization(cfg, model, trainer_cfg)
    check_batch_limits(cfg, datamodule)
    resume.check_against(cfg, model, sam)
    callbacks = [build(cfg, f"callbacks.{name}") for name, node in cfg.callbacks.items() if enabled(node)]
    if not use_sam:
        callbacks = [c for c in callbacks if not isinstance(c, SharpnessMonitor)]
    check_monitors(cfg, logged=model.logged_keys(sam_steps=use_sam))
    resumable = {"resume_step": resume.step}  # RunCSVLogger continues metrics.csv from the checkpoint's step
    loggers = [
        build(cfg, f"logger.{name}", **(resumable if node._target_.endswith("RunCSVLogger") else {}))
        for name, node in cfg.logger.items()
        if enabled(node)
    ]
    # first without Lightning's info lines, so that a refusal stays one line
    probe = build_trainer(trainer_cfg, quiet=True, callbacks=callbacks, logger=False, plugins=[AtomicCheckpointIO()])
    if isinstance(model, SAMClassifier):
        check_method_takes_trainer(cfg, model, probe, trainer_cfg)
    return _Prepared(datamodule, sam, model, trainer_cfg, callbacks, loggers)


def _train(cfg: DictConfig, resume: Resume, start: float) -> dict[str, Any]:
    run = _prepare(cfg, resume)
    plugins = [AtomicCheckpointIO()]  # a crash or a full disk never leaves a truncated checkpoint
    if resume.run_dir is not None:  # its checkpoints are this run's own
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warn_unreached_milestones(cfg, run.trainer_cfg)  # every check passed: warnings now
    trainer = build_trainer(run.trainer_cfg, callbacks=run.callbacks, logger=run.loggers or False, plugins=plugins)
    log.info("Training %s with %s", type(run.model.net).__name__, run.sam if run.sam is not None else "no SAM")
    if trainer.is_global_zero:
        rewrite_hydra_files(cfg)  # every check passed and this run holds the directory: its own .hydra/ files
        resume.record(cfg)  # a resume that changed what may change: the run's config follows it
    try:
        return _fit_and_test(cfg, trainer, run.model, run.datamodule, resume, run.sam, start)
    finally:
        if trainer.is_global_zero:  # a run refused meanwhile had Hydra overwrite them
            rewrite_hydra_files(cfg)


def _fit_and_test(
    cfg: DictConfig, trainer: pl.Trainer, model: Classifier, datamodule: Any, resume: Resume, sam: Any, start: float
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
    if cfg.get("test_last", False):  # the paper's protocol: the weights after the last epoch, before the best's test
        last = trainer.test(model, datamodule, ckpt_path=None, verbose=False)
        result.update({k.replace("test/", "test_last/", 1): v for k, v in (last[0] if last else {}).items()})
    if cfg.get("test", True):
        best = checkpoint.best_model_path if checkpoint else ""
        tested = best or "the weights at the end of training"
        test = trainer.test(model, datamodule, ckpt_path=best or None, verbose=False)
        result.update(test[0] if test else {})
        result["tested_checkpoint"] = tested
    result["minutes"] = (time.perf_counter() - start) / 60
    _print_summary(trainer, result)
    return result


def _print_summary(trainer: pl.Trainer, result: dict[str, Any]) -> None:
    if not trainer.is_global_zero:
        return
    lines = [f"method: {result['sam']}"]
    if "test/acc" in result:
        lines.append(f"test accuracy: {result['test/acc']:.4f} (checkpoint: {result['tested_checkpoint']})")
    lines.append(f"time: {result['minutes']:.1f} min, {trainer.global_step} optimizer steps")
    metrics = [Path(lg.log_dir) / "metrics.csv" for lg in trainer.loggers if getattr(lg, "log_dir", None)]
    csv = next((str(p) for p in metrics if p.exists()), None)
    lines.append(f"run directory: {result['output_dir']}" + (f" (metrics: {csv})" if csv else ""))
    print("\n" + "\n".join(lines), flush=True)


def main() -> None:
    """``python -m lightning_sam.train [overrides]``: the command line checked, then the Hydra app run.

    An override Hydra cannot compose (an unknown option, a key missing from the config, bad syntax)
    or a run directory that cannot be written prints one line and exits with status 2 before Hydra
    makes a run directory (``HYDRA_FULL_ERROR=1`` leaves them to Hydra's own report). A sweep that runs
    here (Hydra's basic launcher) has each job's values checked before the first job starts; on other
    launchers each job checks its own where it runs.
    """
    remember_new_folders(None, False)
    if all(not a.startswith("-") or a in MULTIRUN_FLAGS for a in sys.argv[1:]):
        sys.argv[1:] = multirun_flags_first(sys.argv[1:])  # `key=value -m ...` runs as Hydra's `-m key=value ...`
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        try:
            configs = check_command_line(sys.argv[1:])
            multirun = bool(configs) and is_multirun(configs[0], any(a in MULTIRUN_FLAGS for a in sys.argv[1:]))
            if multirun and runs_here(configs[0], multirun):
                check_sweep(configs)  # jobs run here, one after another: a bad value is refused before the first
        except (CommandLineError, ConfigError) as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        remember_new_folders(configs[0] if configs else None, multirun)
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
        remove_if_unused(hydra_dir)
        restore_holders_files(hydra_dir)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as err:
        print(f"\n{err}. {resume_hint(cfg)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + err.signum) from None
    except Exception as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if is_disk_full(err):
            print(f"error: no space left on device ({err}). {resume_hint(cfg)}", file=sys.stderr)
            raise SystemExit(1) from None
        refused = unwritable(err)
        if refused is None:
            raise
        print(f"error: cannot write {refused}. Make it writable. {resume_hint(cfg)}", file=sys.stderr)
        raise SystemExit(1) from None
    if Path(cfg.output_dir).resolve() != hydra_dir.resolve():  # resumed in its own run directory
        merge_log_and_remove(hydra_dir, Path(cfg.output_dir))
    return result.get("best_val")
