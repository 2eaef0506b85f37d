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

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_sam.callbacks import SharpnessMonitor
from lightning_sam.models import Classifier, SAMClassifier

__all__ = ["main", "train"]

log = logging.getLogger(__name__)

# Lightning refuses these in manual optimization; with SAM they go to the module instead.
_MODULE_TRAINER_KEYS = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")


class ConfigError(ValueError):
    """A config value is invalid; the message names its key and what is accepted."""


def _build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate(cfg[key])``, with errors that name the config key (``sam.rho``, not ``rho``)."""
    node = cfg[key]
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        message = str(cause)
        for name in node:
            message = message.replace(f"`{name}`", f"`{key}.{name}`")
        raise ConfigError(f"Invalid `{key}` config: {message}") from cause


def _enabled(node: Any) -> bool:
    return isinstance(node, DictConfig) and node.get("_target_") is not None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job from a composed config; returns the test metrics and where things are."""
    start = time.perf_counter()
    # Everything that can be wrong with the config fails here, before any training.
    datamodule = _build(cfg, "data")
    use_sam = _enabled(cfg.sam)
    sam = _build(cfg, "sam") if use_sam else None
    net = _build(cfg, "model", num_classes=datamodule.num_classes)
    optimizer = _build(cfg, "optimizer")
    scheduler = _build(cfg, "scheduler") if _enabled(cfg.scheduler) else None
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    step_options = {k: trainer_cfg.pop(k) for k in _MODULE_TRAINER_KEYS if k in trainer_cfg}
    callbacks = [_build(cfg.callbacks, name) for name, node in cfg.callbacks.items() if _enabled(node)]
    loggers = [_build(cfg.logger, name) for name, node in cfg.logger.items() if _enabled(node)]
    datamodule.prepare_data()  # generates MNIST-1D, or finds (or downloads) the CIFAR archive

    pl.seed_everything(cfg.seed, workers=True)
    if use_sam:
        model: Classifier = SAMClassifier(net, datamodule.num_classes, optimizer, scheduler, sam=sam, **step_options)
    else:
        model = Classifier(net, datamodule.num_classes, optimizer, scheduler)
        callbacks = [c for c in callbacks if not isinstance(c, SharpnessMonitor)]
        trainer_cfg.update({k: v for k, v in step_options.items() if v is not None})
    trainer: pl.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    log.info("Training %s with %s", type(net).__name__, sam if use_sam else "no SAM")
    trainer.fit(model, datamodule, ckpt_path=cfg.get("ckpt_path"))

    result: dict[str, Any] = {
        "output_dir": cfg.output_dir,
        "sam": repr(sam) if use_sam else "none",
        "global_step": trainer.global_step,
    }
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
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
    metrics = [Path(lg.log_dir) / "metrics.csv" for lg in trainer.loggers if hasattr(lg, "experiment")]
    csv = next((str(p) for p in metrics if p.exists()), None)
    lines.append(f"run directory: {result['output_dir']}" + (f" (metrics: {csv})" if csv else ""))
    print("\n" + "\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path="pkg://lightning_sam.configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The Hydra entry point; returns the test accuracy (for sweepers)."""
    return train(cfg).get("test/acc")


if __name__ == "__main__":
    main()
