"""Configuration: dataclass schemas with defaults, YAML deltas, dotted overrides, a saved resolved copy.

A run's configuration is built in three layers, each only stating what differs from the layer below:

1. the schema's dataclass defaults (the single source of truth for every key and its type);
2. zero or more YAML files holding only deltas; a file may start from another with ``_base_: other.yaml``
   (resolved relative to the file) so presets can share a parent;
3. dotted command-line overrides such as ``train.lr=1e-4`` or ``data.caption_fields=[txt,json.caption]``
   (values are parsed as YAML scalars / flow sequences).

Every key is checked against the schema: an unknown key is an error that names the closest valid keys,
and every value is coerced to the declared type or rejected with the key's dotted name.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from unimm.atomic import atomic_write_text
from unimm.errors import ConfigError

T = TypeVar("T")

BASE_KEY = "_base_"
RESOLVED_CONFIG_NAME = "config.yaml"


# ----------------------------------------------------------------------------------------------------
# Reading YAML deltas and overrides
# ----------------------------------------------------------------------------------------------------
def load_yaml_delta(path: str | os.PathLike) -> dict[str, Any]:
    """Read one YAML delta file, following its ``_base_`` chain; later files win key by key."""
    path = Path(path)
    return _load_yaml_delta(path, seen=())


def _load_yaml_delta(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass the path of a YAML file")
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"config files include each other in a loop: {chain}")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else "syntax error"
        raise ConfigError(f"config file '{path}' is not valid YAML ({first_line}); fix the file") from None
    if not isinstance(content, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(content).__name__}")
    base_name = content.pop(BASE_KEY, None)
    if base_name is None:
        return content
    base = _load_yaml_delta((path.parent / base_name), seen=(*seen, resolved))
    return deep_merge(base, content)


def deep_merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``delta``, recursing into nested mappings."""
    merged = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.lr=1e-4'`` -> ``('train.lr', 1e-4)``; values are YAML (numbers, booleans, [a, b], null)."""
    key, separator, raw_value = text.partition("=")
    key = key.strip()
    if not separator or not key:
        raise ConfigError(f"override '{text}' is not of the form key.path=value (e.g. train.lr=1e-4)")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value  # not YAML: keep the literal text, the schema decides whether a str fits
    # YAML 1.1 reads "1e-4" as a string (it wants "1.0e-4"); the schema coerces it to float later.
    return key, value


def overrides_to_delta(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Turn dotted overrides into a nested delta mapping."""
    delta: dict[str, Any] = {}
    for text in overrides:
        dotted_key, value = parse_override(text)
        node = delta
        parts = dotted_key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}' sets a key below '{part}', which was given a value")
            node = child
        node[parts[-1]] = value
    return delta


# ----------------------------------------------------------------------------------------------------
# Applying a delta to a schema
# ----------------------------------------------------------------------------------------------------
def build_config(
    schema: type[T],
    yaml_paths: typing.Iterable[str | os.PathLike] = (),
    overrides: typing.Iterable[str] = (),
) -> T:
    """Schema defaults, then each YAML delta in order, then the dotted overrides."""
    config = schema()
    for path in yaml_paths:
        config = apply_delta(config, load_yaml_delta(path), source=str(path))
    override_list = list(overrides)
    if override_list:
        config = apply_delta(config, overrides_to_delta(override_list), source="command-line overrides")
    return config


def apply_delta(config: T, delta: dict[str, Any], source: str = "delta", prefix: str = "") -> T:
    """Return a copy of the dataclass ``config`` with ``delta`` applied, every key and type checked."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{type(config).__name__} is not a dataclass")
    field_map = {field.name: field for field in dataclasses.fields(config) if field.init}
    type_hints = typing.get_type_hints(type(config))
    changes: dict[str, Any] = {}
    for key, value in delta.items():
        dotted = f"{prefix}{key}"
        if key not in field_map:
            raise ConfigError(_unknown_key_message(dotted, key, sorted(field_map), type(config), prefix, source))
        current = getattr(config, key)
        declared = type_hints[key]
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = apply_delta(current, value, source=source, prefix=f"{dotted}.")
        else:
            changes[key] = coerce_value(value, declared, dotted, source)
    return dataclasses.replace(config, **changes)


def _unknown_key_message(
    dotted: str, key: str, valid: list[str], schema: type, prefix: str, source: str
) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if close:
        hint = "did you mean " + " or ".join(f"'{prefix}{name}'" for name in close) + "?"
    else:
        hint = "valid keys here: " + ", ".join(f"'{prefix}{name}'" for name in valid)
    return f"unknown config key '{dotted}' in {source}; {hint}"


def coerce_value(value: Any, declared: Any, dotted: str, source: str = "config") -> Any:
    """Convert a YAML value to ``declared`` (int, float, bool, str, Path, Optional, list, tuple, dict,
    Literal, nested dataclass), or raise a ConfigError naming the key."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(
            f"config key '{dotted}' in {source} expects {expected}, got {value!r} ({type(value).__name__})"
        )

    origin = typing.get_origin(declared)
    arguments = typing.get_args(declared)

    if declared is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        for option in arguments:
            if option is type(None):
                continue
            try:
                return coerce_value(value, option, dotted, source)
            except ConfigError:
                continue
        raise fail(" or ".join(_type_name(a) for a in arguments))
    if origin is typing.Literal:
        if value in arguments and type(value) is type(next(a for a in arguments if a == value)):
            return value
        # YAML 1.1 reads a bare no/off/yes/on as a boolean: give it back the word when the choices are words.
        if isinstance(value, bool):
            for word in (("no", "off", "false") if not value else ("yes", "on", "true")):
                if word in arguments:
                    return word
        close = difflib.get_close_matches(str(value), [str(a) for a in arguments], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"config key '{dotted}' in {source} must be one of {list(arguments)}, got {value!r}{hint}"
        )
    if dataclasses.is_dataclass(declared):
        if isinstance(value, dict):
            return apply_delta(declared(), value, source=source, prefix=f"{dotted}.")
        raise fail(f"a mapping for {declared.__name__}")
    if origin in (list, tuple) or declared in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise fail("a list, e.g. [a, b]")
        if origin is tuple and arguments and arguments[-1] is not Ellipsis:
            if len(value) != len(arguments):
                raise fail(f"a list of exactly {len(arguments)} items")
            items = [coerce_value(v, a, f"{dotted}[{i}]", source) for i, (v, a) in enumerate(zip(value, arguments))]
        else:
            item_type = arguments[0] if arguments else Any
            items = [coerce_value(v, item_type, f"{dotted}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or declared is tuple) else items
    if origin is dict or declared is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        value_type = arguments[1] if len(arguments) == 2 else Any
        return {str(k): coerce_value(v, value_type, f"{dotted}.{k}", source) for k, v in value.items()}
    if declared is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if declared is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise fail("an integer")
    if declared is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if declared is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    if declared is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise fail("a path")
    raise ConfigError(f"config key '{dotted}' has a type ({_type_name(declared)}) this loader cannot read")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def config_to_dict(config: Any) -> Any:
    """Plain YAML-safe data: dataclasses to dicts, tuples to lists, paths to strings."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(item) for item in config]
    if isinstance(config, dict):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def config_from_dict(schema: type[T], data: dict[str, Any], source: str = "saved config") -> T:
    """Rebuild a config from a full dict (e.g. a run directory's ``config.yaml``), checking every key."""
    return apply_delta(schema(), data, source=source)


def save_resolved_config(config: Any, run_dir: str | os.PathLike) -> Path:
    """Write the fully resolved config as ``<run_dir>/config.yaml`` (every key, not just deltas)."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)
    return atomic_write_text(Path(run_dir) / RESOLVED_CONFIG_NAME, text)


def load_resolved_config(schema: type[T], run_dir: str | os.PathLike) -> T:
    """Read back what :func:`save_resolved_config` wrote."""
    path = Path(run_dir) / RESOLVED_CONFIG_NAME
    return config_from_dict(schema, load_yaml_delta(path), source=str(path))
