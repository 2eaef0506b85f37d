"""The app's pre-flight: every config value checked before any training, each error naming the key typed.

Builds what the run will use from the config (the data module, the method, the model, the optimizer
and scheduler with the schedule stepped over the run, the Trainer) so that a value is checked by the
code that will use it, and maps each refusal to the full key (``callbacks.checkpoint.mode``, and
``optimizer.lr`` for a value interpolated from it).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_sam.models import Classifier, SAMClassifier

__all__ = [
    "ConfigError",
    "build",
    "build_trainer",
    "check_method_takes_trainer",
    "check_model_takes_data",
    "check_monitors",
    "check_optimization",
    "check_schedule",
    "check_batch_limits",
    "check_top_level",
    "choices",
    "enabled",
    "is_int",
    "is_number",
    "prepare_data",
    "show",
    "warn_unreached_milestones",
]

log = logging.getLogger("lightning_sam.train")


class ConfigError(ValueError):
    """A config value is invalid; the message names its key and what is accepted."""


def build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate`` the node at ``key`` (dotted), with errors that name the full key the user typed.

    ``rho`` becomes ``sam.rho``, ``mode`` ``callbacks.checkpoint.mode``; a value set by an interpolation
    names its source: GSAM's ``lr_max`` is ``optimizer.lr``.
    """
    node = OmegaConf.select(cfg, key)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()] or [type(cause).__name__]
        reason = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
        unexpected = _unexpected_argument(reason, node, key)
        if unexpected:
            raise ConfigError(unexpected) from cause
        named = _name_keys(reason, node, key)
        if f"`{key}." not in named:  # the message names no key: the one whose return to its default lets it build

            def attempt(trial: DictConfig) -> None:
                instantiate(trial, **kwargs)

            culprits = _culprits(node, key, attempt)
            if culprits:
                raise ConfigError(f"Invalid `{'`, `'.join(culprits)}`: {named}") from cause
        raise ConfigError(f"Invalid `{key}` config: {named}") from cause


def _locate(target: str) -> Any:
    """The object at the dotted path ``target`` (``None`` if there is none), without Hydra's error log."""
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


_GIVEN_BY_THE_APP = {"self", "params", "optimizer", "num_classes", "resume_step"}  # not the user's to set


def _arguments(target: str) -> list[str]:
    """The keyword arguments the class (or function) ``target`` takes, through ``**kwargs`` to its bases."""
    found = _locate(target)
    names: list[str] = []
    for part in found.__mro__ if isinstance(found, type) else (found,) if callable(found) else ():
        try:
            parameters = inspect.signature(part).parameters.values()
        except (TypeError, ValueError):
            break
        names += [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(n for n in names if n not in _GIVEN_BY_THE_APP))


def _unexpected_argument(reason: str, node: Any, key: str) -> str | None:
    """``+optimizer.foo=1``: the full key named, with the arguments its class takes (``None``: not that).

    The key is the one, in ``node`` or a node below it, whose class does not take the argument.
    """
    found = re.search(r"unexpected keyword argument '(\w+)'", reason)
    if found is None or not isinstance(node, DictConfig):
        return None
    name = found.group(1)
    for full, sub in [(key, node), *_nested(node, key)]:
        target = sub.get("_target_")
        if target is None or name not in sub:
            continue
        accepted = _arguments(str(target))
        if name not in accepted:
            return _not_an_argument(f"{full}.{name}", str(target), accepted)
    return None


def _not_an_argument(key: str, target: str, accepted: list[str]) -> str:
    """``key`` is not an argument of ``target``: the arguments it takes, and the closest if it looks like a typo."""
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, accepted, n=1)
    typo = f" (did you mean `{key.rsplit('.', 1)[0]}.{close[0]}`?)" if close else ""
    takes = f"it takes: {', '.join(accepted)}" if accepted else "it takes none"
    return f"`{key}` is not an argument of {target}{typo}; {takes}."


def _nested(node: DictConfig, key: str) -> list[tuple[str, DictConfig]]:
    """``(full key, node)`` of every config node below ``node`` (depth first)."""
    found = []
    for name in node:
        sub = node._get_node(name)
        if isinstance(sub, DictConfig):
            found += [(f"{key}.{name}", sub), *_nested(sub, f"{key}.{name}")]
    return found


def _culprits(node: DictConfig, key: str, attempt: Any) -> list[str]:
    """``key.name=value`` for each argument whose return to the class's default lets ``attempt(node)`` pass."""
    culprits = []
    for name, default in _defaults(str(node.get("_target_"))).items():
        if name not in node or node[name] == default:
            continue
        trial = node.copy()
        with open_dict(trial):
            trial[name] = default
        try:
            attempt(trial)
        except Exception:  # this key alone does not explain it
            continue
        culprits.append(f"{key}.{name}={show(node[name])}")
    return culprits


def _leaf_keys(node: Any, prefix: str) -> dict[str, str]:
    """``{name: how to name it}`` for every key below ``node``: its full key, or the key it interpolates from.

    An argument of a node's class that the config leaves out is named where it would go
    (``sam.rho_schedule.total_steps``).
    """
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
    if node.get("_target_") is not None:
        for name in _arguments(str(node._target_)):
            found.setdefault(name, f"`{prefix}.{name}`")
    return found


def _name_keys(message: str, node: Any, prefix: str) -> str:
    """``message`` with each backquoted argument name replaced by the full config key (see :func:`build`)."""
    keys = _leaf_keys(node, prefix)
    return re.sub(r"`(\w+)`", lambda m: keys.get(m.group(1), m.group(0)), message)


def enabled(node: Any) -> bool:
    """Whether a config node builds something (``_target_`` set; ``sam=none`` and ``scheduler=none`` do not)."""
    return isinstance(node, DictConfig) and node.get("_target_") is not None


def choices(cfg: DictConfig) -> dict[str, Any]:
    """The chosen option of each config group (``model: cnn1d``, ...), where Hydra knows them."""
    if HydraConfig.initialized():
        return dict(HydraConfig.get().runtime.choices)
    return dict(cfg.get("hydra", {}).get("runtime", {}).get("choices", {}))


def prepare_data(cfg: DictConfig, datamodule: Any) -> None:
    """Generate or find (or download) the data now, and split it, so that a missing archive is a config error.

    Also refuses a split that leaves nothing to train on (``data.val_fraction`` near 1).
    """
    where = f"data.data_dir={cfg.data.get('data_dir')!r}"
    try:
        datamodule.prepare_data()
    except FileNotFoundError as err:
        message = str(err) if "data_dir" in str(err) else f"Cannot find or write the data at `{where}`: {err}"
        raise ConfigError(message) from err
    except OSError as err:  # e.g. data.download=true without a network, a folder that cannot be written
        reason = getattr(err, "reason", None) or err
        hint = " Put the archive there yourself, or check the network for data.download=true." if (
            "download" in cfg.data) else " Pick a folder that can be written."  # fmt: skip
        raise ConfigError(
            f"Could not get the data for data={choices(cfg).get('data', '?')} into `{where}` ({reason}).{hint}"
        ) from err
    try:
        datamodule.setup("fit")
    except ValueError as err:
        raise ConfigError(f"Invalid `data` config: {_name_keys(str(err).splitlines()[0], cfg.data, 'data')}") from err
    fraction, held_out = cfg.data.get("val_fraction", 0), getattr(datamodule, "val_set", None)
    if fraction and held_out is not None and len(held_out) == 0:
        log.warning(
            "data.val_fraction=%s holds out no sample: no validation split, so no best checkpoint can be chosen; "
            "the weights at the end of training are tested.",
            fraction,
        )


def check_top_level(cfg: DictConfig) -> None:
    """Type and range checks Hydra cannot do for us, with the key in the message, before anything is built."""
    optimizer, model, data = cfg.optimizer, cfg.model, cfg.data
    checks = [
        ("seed", cfg.get("seed"), lambda v: is_int(v, 0) and v < 2**32, "an int in [0, 2**32)"),
        ("test", cfg.get("test", True), lambda v: isinstance(v, bool), "true or false"),
        ("test_last", cfg.get("test_last", False), lambda v: isinstance(v, bool), "true or false"),
        ("trainer.max_epochs", cfg.trainer.get("max_epochs"), lambda v: v is None or v == -1 or is_int(v, 1),
         "an int >= 1 (or -1 with trainer.max_steps, no end by epochs)"),
        ("trainer.max_steps", cfg.trainer.get("max_steps", -1), lambda v: v == -1 or is_int(v, 1),
         "-1 or an int >= 1"),
        ("trainer.limit_train_batches", cfg.trainer.get("limit_train_batches", 1.0),
         lambda v: is_number(v) and v > 0, "a positive number (0 would train nothing)"),
        ("trainer.limit_val_batches", cfg.trainer.get("limit_val_batches", 1.0),
         lambda v: is_number(v) and v >= 0, "a non-negative number (0: no validation)"),
        ("trainer.limit_test_batches", cfg.trainer.get("limit_test_batches", 1.0),
         lambda v: is_number(v) and v >= 0, "a non-negative number"),
        ("trainer.log_every_n_steps", cfg.trainer.get("log_every_n_steps"), lambda v: v is None or is_int(v, 0),
         "null or an int >= 0 (0: no logging by step)"),
        ("trainer.deterministic", cfg.trainer.get("deterministic"),
         lambda v: v is None or isinstance(v, bool) or v == "warn", "true, false, warn or null"),
        ("trainer.check_val_every_n_epoch", cfg.trainer.get("check_val_every_n_epoch", 1),
         lambda v: v is None or is_int(v, 1), "null or an int >= 1"),
        ("trainer.val_check_interval", cfg.trainer.get("val_check_interval"),
         lambda v: v is None or is_int(v, 1) or (isinstance(v, float) and 0 < v <= 1),
         "null, a fraction of an epoch in (0, 1] or a number of batches >= 1"),
        ("trainer.accumulate_grad_batches", cfg.trainer.get("accumulate_grad_batches", 1), lambda v: is_int(v, 1),
         "an int >= 1"),
        ("trainer.gradient_clip_val", cfg.trainer.get("gradient_clip_val"),
         lambda v: v is None or (is_number(v) and v >= 0), "null or a non-negative number"),
        ("trainer.gradient_clip_algorithm", cfg.trainer.get("gradient_clip_algorithm", "norm"),
         lambda v: v in ("norm", "value"), "one of 'norm', 'value'"),
        ("optimizer.lr", optimizer.get("lr"), lambda v: is_number(v) and v >= 0, "a non-negative number"),
        ("optimizer.momentum", optimizer.get("momentum", 0.0), lambda v: is_number(v) and 0 <= v <= 1,
         "a number in [0, 1]"),
        ("optimizer.weight_decay", optimizer.get("weight_decay", 0.0), lambda v: is_number(v) and v >= 0,
         "a non-negative number"),
        ("optimizer.betas", optimizer.get("betas", [0.9, 0.999]),
         lambda v: len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
        ("model.dropout", model.get("dropout", 0.0), lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("data.num_workers", data.get("num_workers", 0), lambda v: is_int(v, 0), "an int >= 0"),
        ("data.val_fraction", data.get("val_fraction", 0.1), lambda v: is_number(v) and 0 <= v < 1,
         "a fraction in [0, 1)"),
    ]  # fmt: skip
    checks += [(f"model.{k}", model.get(k), lambda v: is_int(v, 1), "an int >= 1")
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


def is_int(value: Any, minimum: int) -> bool:
    """An int (not a bool) ``>= minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_schedule(cfg: DictConfig, trainer_cfg: dict) -> None:
    """A schedule that needs the length of the run gets one; step milestones are epochs."""
    milestones = cfg.scheduler.get("milestones") if enabled(cfg.scheduler) else None
    if milestones is not None and not (
        OmegaConf.is_list(milestones) and len(milestones) and all(is_int(m, 1) for m in milestones)
    ):
        raise ConfigError(f"Expected `scheduler.milestones` to be a list of epochs (ints >= 1), got {milestones!r}.")
    if enabled(cfg.scheduler) and "T_max" in cfg.scheduler:
        t_max = cfg.scheduler.T_max
        if not is_int(t_max, 1):
            epochs = trainer_cfg.get("max_epochs")
            endless = "" if is_int(epochs, 1) else (
                f": with trainer.max_epochs={epochs!r} the run has no end by epochs. Set scheduler.T_max, or use "
                "scheduler=none or scheduler=step"
            )  # fmt: skip
            raise ConfigError(
                f"Expected `scheduler.T_max` to be an int >= 1 (epochs to decay over), got {t_max!r}{endless}."
            )


def warn_unreached_milestones(cfg: DictConfig, trainer_cfg: dict) -> None:
    """Warn when every milestone of a step schedule lies at or beyond the run's last epoch."""
    milestones = cfg.scheduler.get("milestones") if enabled(cfg.scheduler) else None
    max_epochs = trainer_cfg.get("max_epochs")
    if milestones and isinstance(max_epochs, int) and max_epochs >= 0 and min(milestones) >= max_epochs:
        log.warning(
            "scheduler.milestones=%s are all at or beyond trainer.max_epochs=%s: the learning rate never drops. "
            "Set scheduler.milestones to epochs within the run.",
            list(milestones),
            max_epochs,
        )


def check_optimization(cfg: DictConfig, model: Classifier, trainer_cfg: dict) -> None:
    """Build the optimizer and scheduler as ``configure_optimizers`` does, and step the schedule over the run.

    What a constructor refuses (``optimizer.nesterov=true`` with ``momentum=0``, a negative ``eps``), a
    schedule that fails at some epoch or would give a negative or non-finite learning rate
    (``scheduler.eta_min=-1``) is refused now, naming the key: the one whose return to the class's
    default lets the build and the schedule pass.
    """
    for group in ("optimizer", "scheduler"):
        if enabled(cfg[group]):
            _check_types(cfg, group)
    epochs = trainer_cfg.get("max_epochs")
    epochs = min(epochs, 10_000) if is_int(epochs, 1) else 0

    def from_config(trial: DictConfig) -> None:
        opt = instantiate(trial.optimizer)(model.parameters())
        _run_schedule(opt, instantiate(trial.scheduler)(opt) if enabled(trial.scheduler) else None, epochs)

    try:
        configured = model.configure_optimizers()  # the code that will build them at fit
        if isinstance(configured, dict):  # with a scheduler
            _run_schedule(configured["optimizer"], configured["lr_scheduler"]["scheduler"], epochs)
    except Exception as err:
        raise ConfigError(_blame(cfg, ("optimizer", "scheduler"), from_config, err)) from err
    if isinstance(model, SAMClassifier):  # Momentum-SAM needs an optimizer with a momentum
        optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
        try:
            model.sam.check_optimizer(optimizer)
        except ValueError as err:
            message = _name_keys(str(err), cfg.optimizer, "optimizer")
            method = choices(cfg).get("sam", "?")
            raise ConfigError(f"`sam={method}` cannot train with this optimizer: {message}") from err


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
        signature = inspect.signature(_locate(target))
    except (ValueError, TypeError):  # no signature to read
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
        if isinstance(default, (int, float)) and not isinstance(default, bool) and not is_number(value):
            raise ConfigError(f"Expected `{group}.{name}` to be a number, got {value!r}.")


def _blame(cfg: DictConfig, groups: tuple[str, ...], attempt: Any, err: Exception) -> str:
    """The keys of ``groups`` whose return to the class's default makes ``attempt(config)`` pass, with ``err``."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    culprits = []
    for group in groups:
        node = cfg[group]
        if not enabled(node):
            continue
        unexpected = _unexpected_argument(reason, node, group)
        if unexpected:
            return unexpected

        def attempt_group(trial: DictConfig, group: str = group) -> None:
            whole = cfg.copy()
            with open_dict(whole):
                whole[group] = trial
            attempt(whole)

        culprits += _culprits(node, group, attempt_group)
    if not culprits:
        targets = ", ".join(str(cfg[g]._target_) for g in groups if enabled(cfg[g]))
        return f"Invalid {' / '.join(f'`{g}`' for g in groups)} config ({targets}): {reason}."
    return f"Invalid `{'`, `'.join(culprits)}`: {reason}."


def show(value: Any) -> str:
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


def build_trainer(trainer_cfg: dict, quiet: bool = False, **kwargs: Any) -> pl.Trainer:
    """The Trainer of the run (``kwargs``: its callbacks, loggers, plugins); a refusal names the key.

    The key is the one whose return to the Trainer's default lets the same construction (the same
    callbacks and plugins) pass: ``trainer.devices=0``. ``quiet``: without Lightning's info lines.
    """

    def attempt(config: dict) -> pl.Trainer:
        # built directly, not through Hydra's instantiate: its kwargs would arrive as OmegaConf containers
        # (a ListConfig of plugins), which Lightning before 2.5 refuses
        with _quiet_lightning() if quiet else nullcontext():
            return _construct(config, kwargs)

    try:
        return attempt(trainer_cfg)
    except Exception as err:
        cause = err
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        defaults = _defaults(trainer_cfg["_target_"])
        culprits = []
        for name, value in trainer_cfg.items():
            if name not in defaults or value == defaults[name]:
                continue
            try:
                with _quiet_lightning():
                    _construct({**trainer_cfg, name: defaults[name]}, kwargs)
            except Exception:  # this key alone does not explain it
                continue
            culprits.append(f"trainer.{name}={show(value)}")
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", reason)
        if unexpected and unexpected.group(1) in trainer_cfg:
            target = str(trainer_cfg["_target_"])
            raise ConfigError(_not_an_argument(f"trainer.{unexpected.group(1)}", target, _arguments(target))) from cause
        if not culprits:
            raise ConfigError(f"The Trainer refused the `trainer` config with these callbacks: {reason}") from cause
        hint = " (no GPU here: trainer=cpu)" if "trainer.accelerator=gpu" in culprits else ""
        raise ConfigError(f"Invalid `{'`, `'.join(culprits)}`{hint}: {reason}") from cause


def _construct(config: dict, kwargs: dict) -> pl.Trainer:
    """The Trainer of ``config`` (resolved plain data with its ``_target_``) and ``kwargs`` (objects).

    Each Trainer gets its own copy of the lists in ``kwargs``: Lightning adds its default callbacks (a
    progress bar, the model summary) to the list it is given, which would reach the next Trainer built.
    """
    own = {k: list(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return get_class(config["_target_"])(**{k: v for k, v in config.items() if k != "_target_"}, **own)


def check_method_takes_trainer(cfg: DictConfig, model: SAMClassifier, trainer: pl.Trainer, trainer_cfg: dict) -> None:
    """What the SAM module refuses of the Trainer at fit (``sam=gsam`` with accumulation), refused now."""
    try:
        model._sam_check_trainer(trainer)
    except (ValueError, TypeError) as err:
        message = re.sub(
            r"`(\w+)(=[^`]*)?`",
            lambda m: f"`trainer.{m.group(1)}{m.group(2) or ''}`" if m.group(1) in trainer_cfg else m.group(0),
            str(err),
        )
        raise ConfigError(f"`sam={choices(cfg).get('sam', '?')}` cannot train with this Trainer: {message}") from err


def check_batch_limits(cfg: DictConfig, datamodule: Any) -> None:
    """Refuse now what Lightning would refuse only at fit or test, after building everything.

    A fraction of the batches (``trainer.limit_*_batches``) that leaves none, and a
    ``trainer.val_check_interval`` in batches longer than an epoch.
    """
    if cfg.trainer.get("fast_dev_run") or cfg.trainer.get("overfit_batches"):
        return  # Lightning replaces the limits then
    stages = [("train", "fit"), ("val", "fit")] + ([("test", "test")] if cfg.get("test", True) else [])
    lengths: dict[str, int] = {}
    for split, stage in stages:
        limit = cfg.trainer.get(f"limit_{split}_batches", 1.0)
        if not (isinstance(limit, float) and 0 < limit < 1) and not (split == "train" and _needs_epoch(cfg)):
            continue
        datamodule.setup(stage)
        loader = getattr(datamodule, f"{split}_dataloader")()
        length = len(loader) if loader is not None else 0
        lengths[split] = min(length, limit) if isinstance(limit, int) else int(length * limit)
        if length and lengths[split] == 0:
            raise ConfigError(
                f"Expected `trainer.limit_{split}_batches` to leave at least one of the {length} {split} batches, "
                f"got {limit} (at least {1 / length:.4g}, or a number of batches)."
            )
    interval, batches = cfg.trainer.get("val_check_interval"), lengths.get("train")
    validates_by_epoch = cfg.trainer.get("check_val_every_n_epoch", 1) is not None
    if not validates_by_epoch or cfg.trainer.get("limit_val_batches", 1.0) == 0:
        return  # Lightning counts a val_check_interval over the whole run then (or never validates)
    if is_int(interval, 1) and batches is not None and interval > batches:
        raise ConfigError(
            f"Expected `trainer.val_check_interval` to be at most the {batches} training batches of an epoch, got "
            f"{interval} (a float in (0, 1] is a fraction of the epoch)."
        )


def _needs_epoch(cfg: DictConfig) -> bool:
    return is_int(cfg.trainer.get("val_check_interval"), 1)


def check_monitors(cfg: DictConfig, logged: set[str]) -> None:
    """Every monitored metric is one the module logs (else it would fail after an epoch of training)."""
    for name, node in cfg.callbacks.items():
        monitor = node.get("monitor") if enabled(node) else None
        if monitor is not None and monitor not in logged:
            raise ConfigError(
                f"Expected `callbacks.{name}.monitor` to be one of {sorted(logged)} (what the model logs), "
                f"got {monitor!r}."
            )


def check_model_takes_data(cfg: DictConfig, net: torch.nn.Module, datamodule: Any) -> None:
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
        chosen = choices(cfg)
        raise ConfigError(
            f"model={chosen.get('model', '?')} does not take the inputs of data={chosen.get('data', '?')} "
            f"(samples of shape {tuple(shape)}): {err}"
        ) from err
    finally:
        net.train(training)
