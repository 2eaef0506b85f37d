"""The app's command line checked before Hydra runs it: every composition error in one line, exit 2.

Hydra reports an unknown option (``sam=foo``), a key that is not in the config and a malformed override
in 6 to 15 lines and exits with status 1, after it has made the run directory. :func:`check_command_line`
composes the same config first (Hydra's compose API, with the same overrides) and turns each of those
errors into one line that names what the user typed; it also refuses a run directory that cannot be
written. A command line it does not understand (Hydra's own flags) is left to Hydra.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "MULTIRUN_FLAGS",
    "CommandLineError",
    "check_command_line",
    "is_multirun",
    "multirun_flags_first",
    "runs_here",
    "unwritable_folder",
]

_CONFIG_MODULE, _CONFIG_NAME = "lightning_sam.configs", "train"
MULTIRUN_FLAGS = ("-m", "--multirun")
_MULTIRUN_MODE = re.compile(r"\+*hydra\.mode=(RunMode\.)?MULTIRUN")
_MAX_COMPOSITIONS = 64  # a sweep checks each of its values once (others at their first value), up to this many


class CommandLineError(ValueError):
    """An override cannot be composed, or the run directory cannot be written; the message is one line."""


def check_command_line(argv: Sequence[str]) -> list[DictConfig]:
    """Compose the config as ``python -m lightning_sam.train *argv`` would; raise on what would fail.

    Returns the composed configs (with their ``hydra`` node): the run's, or for a sweep one per swept
    value (the others at their first value), so that each job's values can be checked before the first
    starts; none for a command line left to Hydra.

    Raises:
        CommandLineError: an unknown option, a key missing from its group's config (or one given a
            ``+`` it does not need), an override that does not parse, or a run directory that cannot
            be created; the message names the override as typed.
    """
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in MULTIRUN_FLAGS for f in flags):
        return []  # --cfg, --help, --config-name, ...: Hydra's own business
    overrides = [a for a in argv if not a.startswith("-")]
    multirun = bool(flags) or any(_MULTIRUN_MODE.fullmatch(o.replace(" ", "")) for o in overrides)
    parsed = _parse(overrides)
    if not multirun and any(o.is_sweep_override() for o in parsed):  # a config may set hydra.mode (hparams_search)
        first = _variants(overrides, parsed, True)
        multirun = bool(first) and is_multirun(_compose(first[0], True), False)
    configs = []
    variants = _variants(overrides, parsed, multirun)
    for variant in variants:
        try:
            cfg = _compose(variant, multirun)
            if runs_here(cfg, multirun):  # a job on a cluster resolves its values (${oc.env:...}) where it runs
                _check_interpolations(cfg, variant)
        except CommandLineError as err:
            swept = [_unescaped(v) for v, o in zip(variant, overrides) if v != o] if len(variants) > 1 else []
            if not swept or all(f"`{v}`" in str(err) for v in swept):
                raise
            raise CommandLineError(f"{str(err).rstrip('.')} (in the job with {', '.join(swept)}).") from None
        configs.append(cfg)
    if configs:
        _check_run_directory(configs[0], is_multirun(configs[0], multirun))
    return configs


def runs_here(cfg: DictConfig, multirun: bool) -> bool:
    """Whether the job of ``cfg`` runs on this machine: a run, or a sweep on Hydra's basic launcher."""
    launcher = OmegaConf.select(cfg, "hydra.launcher._target_", default="")
    return not multirun or str(launcher).endswith(".BasicLauncher")


def multirun_flags_first(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``-m``/``--multirun`` moved in front of the overrides, where Hydra's parser wants them."""
    return [a for a in argv if a in MULTIRUN_FLAGS] + [a for a in argv if a not in MULTIRUN_FLAGS]


def is_multirun(cfg: DictConfig, flag: bool) -> bool:
    """Whether ``cfg`` runs as a sweep: ``-m`` given (``flag``) or ``hydra.mode`` set to MULTIRUN."""
    mode = OmegaConf.to_container(cfg.hydra, resolve=False).get("mode")  # type: ignore[union-attr]
    return flag or str(mode) in ("MULTIRUN", "RunMode.MULTIRUN")


def _parse(overrides: list[str]) -> list:
    parser = OverridesParser.create()
    parsed = []
    for override in overrides:
        try:
            parsed.append(parser.parse_override(override))
        except HydraException as err:  # OverrideParseException, or the grammar's own error
            reason = str(err).splitlines()[0]
            raise CommandLineError(
                f"Cannot read the override `{override}` ({reason}); see "
                "https://hydra.cc/docs/advanced/override_grammar/basic/ for the syntax."
            ) from None
    return parsed


def _variants(overrides: list[str], parsed: list, multirun: bool) -> list[list[str]]:
    """The override lists to compose: the command line itself, or for a sweep each swept value once."""
    if not multirun or not any(o.is_sweep_override() for o in parsed):
        return [overrides]
    values: list[list[str]] = []
    for text, override in zip(overrides, parsed):
        if not override.is_sweep_override():
            values.append([text])
            continue
        try:
            choices = list(override.sweep_string_iterator())
        except Exception:  # an interval sweep (for a sweeper plugin): its values are the sweeper's to draw
            return []
        values.append([f"{override.get_key_element()}={v}" for v in choices] or [text])
    first = [v[0] for v in values]
    variants = [first]
    for i, options in enumerate(values):
        for option in options[1:]:
            variants.append([*first[:i], option, *first[i + 1 :]])
    return variants[:_MAX_COMPOSITIONS]


def _compose(overrides: list[str], multirun: bool) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(_CONFIG_MODULE, version_base="1.3"):
            return compose(_CONFIG_NAME, overrides=overrides, return_hydra_config=True)
    except MissingConfigException as err:
        raise CommandLineError(_missing_option(str(err), overrides)) from None
    except HydraException as err:
        raise CommandLineError(_composition(str(err), overrides, multirun)) from None
    except ValueError as err:  # e.g. `logger=null`: "Config group override must be a string or a list"
        reason = str(err).splitlines()[0]
        nulls = [o for o in overrides if o.lstrip("+~").partition("=")[2] == "null"]
        where = f"`{nulls[0]}`" if nulls else "The command line"
        raise CommandLineError(
            f"{where} cannot be composed ({reason}): a config group takes the name of an option, not null; to "
            "drop a group, choose its `none` option where it has one (sam=none, scheduler=none)."
        ) from None
    finally:
        GlobalHydra.instance().clear()


def _typed(key: str, overrides: list[str]) -> str:
    """The override that set ``key``, as typed (``key`` itself if none did)."""
    for text in overrides:
        if re.fullmatch(rf"[+~]*{re.escape(key)}(=.*)?", text):
            return text
    return key


def _missing_option(message: str, overrides: list[str]) -> str:
    found = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
    options = re.findall(r"^\t(\S+)$", message.split("Config search path:")[0], flags=re.MULTILINE)
    if found is None:
        return message.splitlines()[0]
    group, option = found.groups()
    chosen = [o for o in overrides if o.split("=")[0].lstrip("+~") == group]
    typed = next((o for o in chosen if o.partition("=")[2] == option), chosen[0] if chosen else None)
    where = f"`{typed}`" if typed else f"`{group}: {option}` (from a config file)"
    accepted = f"; expected one of: {', '.join(options)}" if options else ""
    return f"{where} is not an option of the config group `{group}`{accepted}."


def _composition(message: str, overrides: list[str], multirun: bool) -> str:
    first = message.splitlines()[0] if message else "the config cannot be composed"
    found = re.search(r"Could not override '([^']+)'", message)
    if found:
        key = found.group(1)
        value = _typed(key, overrides).partition("=")[2]
        group = key.split(".")[0]
        if f"{group}=none" in overrides:
            typed = _typed(key, overrides)
            return f"`{typed}` sets a key of `{group}=none`, which has none: drop it, or choose a {group}."
        hint = " (any argument of lightning.pytorch.Trainer can be added so)" if key.startswith("trainer.") else ""
        return (
            f"`{_typed(key, overrides)}` sets a key the config does not have; to add it, write `+{key}={value}`{hint}."
        )
    found = re.search(r"An item is already at '([^']+)'", message)
    if found:
        key = found.group(1)
        value = _typed(key, overrides).partition("=")[2]
        return f"`{_typed(key, overrides)}` adds a key the config already has: write `{key}={value}` (without `+`)."
    found = re.search(r"Ambiguous value for argument '([^']+)'", message)
    if found:
        return f"`{found.group(1)}` gives several values: add -m to run one job for each, or write a list as key=[a,b]."
    found = re.search(r"Could not delete from config. (?:The value of )?'([^']+)'", message)
    if found:
        return f"`~{found.group(1)}` deletes a key the config does not have."
    return first


def _check_interpolations(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse an interpolation that cannot be resolved (``${oops}``, or a key removed with ``~``).

    Values from Hydra's run (``${hydra:...}``, the run directory) resolve only there and are left alone.
    """
    raw = OmegaConf.to_container(cfg, resolve=False)
    for key, value in _interpolated(raw, ""):  # type: ignore[arg-type]
        if key == "hydra" or key.startswith("hydra.") or "${hydra:" in value:
            continue
        try:
            OmegaConf.select(cfg, key, throw_on_resolution_failure=True, throw_on_missing=False)
        except Exception as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if "hydra" in reason.lower():  # through a value of Hydra's run (${output_dir})
                continue
            typed = _unescaped(_typed(key, overrides))
            where = f"`{typed}`" if typed != key else f"`{key}: {value}` (from the config)"
            missing = re.search(r"Interpolation key '([^']+)' not found", reason)
            removed = f" (removed by `~{missing.group(1)}`)" if missing and f"~{missing.group(1)}" in overrides else ""
            raise CommandLineError(f"{where} cannot be resolved: {reason}{removed}.") from None


def _unescaped(override: str) -> str:
    """An override as typed: Hydra's sweep expansion escapes the braces of an interpolation."""
    return override.replace("\\{", "{").replace("\\}", "}")


def _interpolated(node: object, prefix: str) -> list[tuple[str, str]]:
    """The ``(key, value)`` of every string value holding an interpolation, as written."""
    if isinstance(node, dict):
        return [
            kv for k, v in node.items() for kv in _interpolated(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
        ]
    if isinstance(node, list):
        return [kv for i, v in enumerate(node) for kv in _interpolated(v, f"{prefix}[{i}]")]
    return [(prefix, node)] if isinstance(node, str) and "${" in node else []


def _check_run_directory(cfg: DictConfig, multirun: bool) -> None:
    """Refuse a run (or sweep) directory, or a checkpoint or logger folder, where no folder can be written."""
    raw: dict = OmegaConf.to_container(cfg, resolve=False)  # type: ignore[assignment]  # as written
    kind = "sweep" if multirun else "run"
    candidates = [(f"hydra.{kind}.dir", raw.get("hydra", {}).get(kind, {}).get("dir"))]
    output_dir = raw.get("output_dir")
    if isinstance(output_dir, str) and "${" not in output_dir:  # set to a folder of its own
        candidates.append(("output_dir", output_dir))
    for group, key in (("callbacks", "dirpath"), ("logger", "save_dir")) if runs_here(cfg, multirun) else ():
        nodes = raw.get(group) or {}
        candidates += [
            (f"{group}.{name}.{key}", node.get(key)) for name, node in nodes.items() if isinstance(node, dict)
        ]
    for name, value in candidates:
        if not isinstance(value, str):
            continue
        fixed, interpolated, _ = value.partition("${")  # the part that no interpolation changes
        if interpolated and not fixed and name.startswith(("callbacks.", "logger.")):
            continue  # inside the run directory (${output_dir}/...), checked above
        path = Path(os.path.dirname(fixed) if interpolated and not fixed.endswith("/") else fixed or ".")
        problem = unwritable_folder(path)
        if problem:
            what = "the run directory " if name in (f"hydra.{kind}.dir", "output_dir") else ""
            raise CommandLineError(
                f"Cannot write {what}{value} (`{name}`): {problem}. Pick a writable place, e.g. {name}=/tmp/run."
            )


def unwritable_folder(path: Path) -> str | None:
    """Why no folder can be created at ``path`` (``None`` if one can)."""
    probe = path.absolute()
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".lightning_sam_probe.", dir=probe)
    except OSError as err:
        return f"{probe} is not writable ({err.strerror})"
    os.close(fd)
    os.unlink(name)
    return None
