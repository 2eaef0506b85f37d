"""Resuming a run: what ``ckpt_path`` holds, and the resumed config against the run's own.

What cannot honestly continue (a schedule's length, the learning rate, the model, the data) is
refused, naming each key; what may change is logged and recorded in the run's directory.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_sam.app.checks import ConfigError, show
from lightning_sam.app.runs import RUN_COPY
from lightning_sam.methods import method_from_config

__all__ = ["MAY_CHANGE_ON_RESUME", "Resume"]

log = logging.getLogger("lightning_sam.train")


class Resume:
    """What ``ckpt_path`` says: the checkpoint, its global step and, for a run of this app, its directory."""

    def __init__(self, path: str | None, checkpoint: dict | None, run_dir: Path | None) -> None:
        self.path, self.checkpoint, self.run_dir = path, checkpoint, run_dir
        self.step = None if checkpoint is None else int(checkpoint.get("global_step", 0))
        self.changes: dict[str, tuple[Any, Any]] = {}  # config keys this resume changed (allowed ones)

    @classmethod
    def of(cls, cfg: DictConfig) -> Resume:
        """Read ``cfg.ckpt_path`` (``None``: a new run); an unreadable or foreign file is a config error."""
        path = cfg.get("ckpt_path")
        if path is None:
            return cls(None, None, None)
        if isinstance(path, str) and Path(path).is_dir():
            hint = " (its last.ckpt?)" if (Path(path) / "last.ckpt").is_file() else ""
            raise ConfigError(f"Expected `ckpt_path` to be a checkpoint file, got {path!r}: a folder{hint}.")
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
        self.changes = self._compare_configs(cfg, sam)

    def _run_config(self) -> DictConfig:
        assert self.run_dir is not None
        saved = self.run_dir / RUN_COPY / "config.yaml"
        return OmegaConf.load(saved if saved.is_file() else self.run_dir / ".hydra" / "config.yaml")  # type: ignore[return-value]

    def _compare_configs(self, cfg: DictConfig, sam: Any) -> dict[str, tuple[Any, Any]]:
        """Refuse, naming every key, a resume whose config differs where the run cannot honestly continue.

        The run's own config (its directory's) and this one are compared resolved, so a value that
        follows another (``scheduler.T_max: ${trainer.max_epochs}``) counts where it lands. Keys in
        :data:`MAY_CHANGE_ON_RESUME` may differ (the run's length only if no method plans by it); their
        changes are returned as ``{key: (old, new)}``. A key that only one of the two configs has (one
        added to the app's configs by a later version) counts only if this command line sets it.
        """
        if self.run_dir is None:
            return {}
        run_cfg = self._run_config()
        with open_dict(run_cfg):
            run_cfg.output_dir = cfg.output_dir  # where the run is, in both
        old = _flat(_container(run_cfg))
        new = _flat(_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
        typed = _typed_keys()
        differing = [
            k
            for k in sorted(set(old) | set(new))
            if old.get(k, _ABSENT) != new.get(k, _ABSENT) and ((k in old and k in new) or _typed(k, typed))
        ]
        plans = getattr(sam, "follows_run_length", False)  # LatePhaseSAM(start=0.8): a fraction of the run
        refused = [k for k in differing if not _may_change(k) or (plans and k in _RUN_LENGTH)]
        if refused:
            shown = "; ".join(
                f"`{k}`: {show(old.get(k, _ABSENT))} in the run, {show(new.get(k, _ABSENT))} now{_follows(cfg, k)}"
                + (f" ({sam!r} plans by the run's length)" if plans and k in _RUN_LENGTH else "")
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
            log.warning("Resumed with %s=%s (the run had %s).", key, show(new), show(old))
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "ckpt_path")])
        for folder in (self.run_dir / RUN_COPY, self.run_dir / ".hydra"):
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
    "trainer.log_every_n_steps", "trainer.accelerator", "test", "test_last", "data.num_workers", "data.data_dir",
    "data.download",
    "sam.", "logger.", "callbacks.sharpness.", "callbacks.lr_monitor.", "callbacks.progress.", "callbacks.hessian.",
    "task_name", "ckpt_path", "output_dir",
)  # fmt: skip


_ABSENT = "(not set)"
_RUN_LENGTH = ("trainer.max_epochs", "trainer.max_steps", "trainer.limit_train_batches")


def _typed_keys() -> set[str]:
    """The keys (and groups) this command line sets."""
    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def _typed(key: str, typed: set[str]) -> bool:
    return any(key == t or key.startswith(f"{t}.") for t in typed)


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
