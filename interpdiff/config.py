"""Configs: dataclasses are the schema, YAML files fill them, ``a.b=value`` overrides on the CLI.

Built on OmegaConf structured configs: an unknown key (in the YAML or an override) or a value
of the wrong type fails at start-up with a ``ConfigError`` naming the key, the offending value
and where it came from. ``save_config`` writes the resolved config to a run folder atomically.

Typical entry-script use::

    cfg = parse_cli(TrainConfig, sys.argv[1:])   # --config configs/x.yaml a.b=1 c=foo
    save_config(cfg, run_dir)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from interpdiff.io import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the schema."""


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(f"{source}: unknown config key {key!r} ({msg})")
    if isinstance(exc, ValidationError):
        return ConfigError(f"{source}: bad value for config key {key!r}: {msg}")
    return ConfigError(f"{source}: {msg} (key {key!r})")


def _override(ov: str) -> DictConfig:
    """``a.b=v`` as a config; ``v`` is read as YAML (numbers, lists, booleans), and a value that is
    not valid YAML (a bare glob ``*.tar``, a lone ``:``) as the plain string it was typed as, so a
    key that takes a string gets it and any other key names the override in its type error."""
    key, value = ov.split("=", 1)
    try:
        return OmegaConf.from_dotlist([ov])
    except OmegaConfBaseException:
        raise
    except Exception as e:  # yaml.YAMLError and friends: not valid YAML
        if not key.strip() or any(not part for part in key.split(".")):
            raise ConfigError(f"override {ov!r}: {key!r} is not a config key (key.sub=value)") from None
        node: Any = value
        for part in reversed(key.split(".")):
            node = {part: node}
        try:
            return OmegaConf.create(node)
        except Exception:
            raise ConfigError(f"override {ov!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote it, "
                              f"e.g. {key}='\"{value}\"'") from None


def load_config(
    schema: type[T],
    path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Sequence[str] = (),
    select: Callable[[DictConfig], Any] | None = None,
) -> T:
    """Build ``schema`` from its defaults, then the YAML file(s) ``path`` merged in order, then
    ``overrides`` (``a.b=v``). Calls the result's ``validate()`` when it has one. ``select`` maps
    each loaded file to the part of it this schema reads (a tool that takes one section of a
    training config)."""
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"load_config: schema must be a dataclass type, got {schema!r}")
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    cfg = OmegaConf.structured(schema)
    for p in map(Path, paths):
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (expected a YAML file)")
        try:
            loaded = OmegaConf.load(p)
        except Exception as e:  # yaml syntax error
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {str(p)!r}: the top level must be a mapping of sections (key: value), "
                              f"got a {type(loaded).__name__.replace('Config', '').lower() or 'value'}")
        if select is not None:
            try:
                loaded = select(loaded)
            except ConfigError as e:
                raise ConfigError(f"config file {str(p)!r}: {e}") from None
            except Exception as e:  # a section of an unexpected type
                raise ConfigError(f"config file {str(p)!r}: {type(e).__name__}: {e}") from None
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise _explain(e, f"config file {str(p)!r}") from None
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key.sub=value")
        try:
            cfg = OmegaConf.merge(cfg, _override(ov))
        except OmegaConfBaseException as e:
            raise _explain(e, f"override {ov!r}") from None
    try:
        missing = OmegaConf.missing_keys(cfg)
        if missing:
            raise ConfigError(f"config keys without a value (set them in the YAML or as key=value): {sorted(missing)}")
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, "config") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:  # a range / consistency check: the entry scripts print it as one line
            raise ConfigError(str(e)) from e
    return obj  # type: ignore[return-value]


def split_cli(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``[--config PATH]... [key.sub=value ...]`` -> (config paths in order, overrides)."""
    paths: list[str] = []
    overrides: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--config", "-c"):
            if i + 1 >= len(args):
                raise ConfigError("--config needs a YAML path")
            paths.append(args[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            paths.append(a.split("=", 1)[1])
        elif a.startswith("-"):
            raise ConfigError(f"unknown option {a!r}; use --config PATH (repeatable) and key.sub=value overrides")
        else:
            overrides.append(a)
        i += 1
    return paths, overrides


def parse_cli(schema: type[T], argv: Sequence[str], select: Callable[[DictConfig], Any] | None = None) -> T:
    """``[--config PATH]... [key.sub=value ...]`` -> a ``schema`` instance (files merged in order;
    ``select`` as in ``load_config``)."""
    paths, overrides = split_cli(argv)
    return load_config(schema, paths, overrides, select)


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, run_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config to ``run_dir/name`` (temp file + rename)."""
    path = Path(run_dir) / name
    atomic_write_text(path, to_yaml(cfg))
    return path


def from_dict(schema: type[T], data: dict) -> T:
    """Rebuild a config (e.g. from checkpoint metadata), with the same key/type checks."""
    cfg = OmegaConf.structured(schema)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise _explain(e, "stored config") from None
