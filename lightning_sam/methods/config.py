"""A method as plain data (LightningCLI's ``class_path``/``init_args``) and back, for checkpoints and hparams.yaml."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from lightning_sam.methods.base import Method
from lightning_sam.methods.schedule import RhoSchedule

__all__ = ["method_from_config", "method_to_config"]


def method_to_config(method: Method) -> dict[str, Any]:
    """A method as plain data, in LightningCLI's ``class_path``/``init_args`` form (YAML- and ``weights_only``-safe).

    The shipped methods are named by their public path (``lightning_sam.ASAM``).

    Example::

        >>> from lightning_sam import ASAM
        >>> config = method_to_config(ASAM(rho=0.5, eta=0.01))
        >>> config["class_path"], config["init_args"]
        ('lightning_sam.ASAM', {'rho': 0.5, 'interval': 1, 'rho_schedule': None, 'only': None, 'eta': 0.01})
    """
    args: dict[str, Any] = {}
    for key, value in method.settings().items():
        if isinstance(value, RhoSchedule):
            value = {"class_path": _class_path(value), "init_args": dataclasses.asdict(value)}
        args[key] = value
    return {"class_path": _class_path(method), "init_args": args}


def method_from_config(config: Mapping[str, Any]) -> Method:
    """The method that :func:`method_to_config` described (``class_path`` must name a :class:`Method` subclass).

    Example::

        >>> method_from_config({"class_path": "lightning_sam.ASAM", "init_args": {"rho": 1.0}})
        ASAM(rho=1.0, eta=0.01)
    """
    if not isinstance(config, Mapping) or not isinstance(config.get("class_path"), str):
        raise TypeError(f"Expected a method config {{'class_path': ..., 'init_args': {{...}}}}, got {config!r}.")
    cls = _resolve(config["class_path"], Method)
    args = dict(config.get("init_args") or {})
    schedule = args.get("rho_schedule")
    if isinstance(schedule, Mapping):
        args["rho_schedule"] = _resolve(schedule["class_path"], RhoSchedule)(**schedule.get("init_args", {}))
    return cls(**args)


def _class_path(obj: object) -> str:
    cls = type(obj)
    shipped = cls.__module__ == "lightning_sam.methods"
    return f"lightning_sam.{cls.__qualname__}" if shipped else f"{cls.__module__}.{cls.__qualname__}"


def _resolve(path: str, base: type) -> Any:
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"Expected `class_path` to name a {base.__name__} class, got {path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"Expected `class_path` to name a {base.__name__} class, got {path!r}.")
    return cls
