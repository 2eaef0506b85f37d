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
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_sam.callbacks import SharpnessMonitor
from lightning_sam.models import Classifier, SAMClassifier

__all__ = ["load_run", "main", "train"]

log = logging.getLogger(__name__)

# Lightning refuses these in manual optimization; with SAM they go to the module instead.


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
    _check_top_level(cfg)
    pl.seed_everything(cfg.seed, workers=True)  # before the model is built: its initial weights too
    # Everything that can be wrong with the config fails here, before any training.
    datamodule = _build(cfg, "data")
    use_sam = _enabled(cfg.sam)
    sam = _build(cfg, "sam") if use_sam else None
    net = _build(cfg, "model", num_classes=datamodule.num_classes)
    optimizer = _build(cfg, "optimizer")
    scheduler = _build(cfg, "scheduler") if _enabled(cfg.scheduler) else None
    _check_model_takes_data(cfg, net, datamodule)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    _warn_unreached_milestones(cfg, trainer_cfg)
    callbacks = [_build(cfg.callbacks, name) for name, node in cfg.callbacks.items() if _enabled(node)]
    loggers = [_build(cfg.logger, name) for name, node in cfg.logger.items() if _enabled(node)]
    datamodule.prepare_data()  # generates MNIST-1D, or finds (or downloads) the CIFAR archive

    if use_sam:
        model: Classifier = SAMClassifier(net, datamodule.num_classes, optimizer, scheduler, sam=sam)
    else:
        model = Classifier(net, datamodule.num_classes, optimizer, scheduler)
        callbacks = [c for c in callbacks if not isinstance(c, SharpnessMonitor)]
    trainer: pl.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    log.info("Training %s with %s", type(net).__name__, sam if use_sam else "no SAM")
    trainer.fit(model, datamodule, ckpt_path=cfg.get("ckpt_path"))

    result: dict[str, Any] = {
        "output_dir": cfg.output_dir,
        "sam": repr(sam) if use_sam else "none",
        "global_step": trainer.global_step,
    }
    result["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}  # of training
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        tested = best or "the weights at the end of training"
        test = trainer.test(model, datamodule, ckpt_path=best or None, verbose=False)
        result.update(test[0] if test else {})
        result["tested_checkpoint"] = tested
    result["minutes"] = (time.perf_counter() - start) / 60
    _print_summary(trainer, result)
    return result


def _check_top_level(cfg: DictConfig) -> None:
    """Type checks Hydra cannot do for us, with the key in the message."""
    checks = [
        ("seed", cfg.get("seed"), lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
        ("test", cfg.get("test", True), lambda v: isinstance(v, bool), "true or false"),
        ("trainer.max_epochs", cfg.trainer.get("max_epochs"), lambda v: v is None or _is_int(v, -1), "an int >= -1"),
        ("trainer.max_steps", cfg.trainer.get("max_steps", -1), lambda v: _is_int(v, -1), "an int >= -1"),
        ("trainer.accumulate_grad_batches", cfg.trainer.get("accumulate_grad_batches", 1), lambda v: _is_int(v, 1),
         "an int >= 1"),
        ("trainer.gradient_clip_val", cfg.trainer.get("gradient_clip_val"),
         lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
         "null or a non-negative number"),
    ]  # fmt: skip
    for key, value, ok, accepted in checks:
        if not ok(value):
            raise ConfigError(f"Expected `{key}` to be {accepted}, got {value!r}.")


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


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


@hydra.main(version_base="1.3", config_path="pkg://lightning_sam.configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The Hydra entry point; returns the test accuracy (for sweepers)."""
    return train(cfg).get("test/acc")


if __name__ == "__main__":
    main()
