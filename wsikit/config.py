"""Validated YAML configs: any settings dataclass is built from a mapping, unknown keys refused by name.

The settings classes are the stages' own dataclasses (``TileConfig``, ``ExtractConfig`` …), so a config
file and a Python call can never drift apart; this module only reads YAML, rejects unknown keys listing
the allowed ones, checks types with pydantic and turns errors into one line naming the file and key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import reprlib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

from wsikit.io import jsonable, read_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the file, the key and the fix."""


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping gives one clear line."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    text = read_text(path, "config", ConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` onto ``base`` (command-line values over the file's); None means unset."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass a field type refers to (directly, optionally, or as tuple/list items), if any."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    for arg in typing.get_args(tp):
        found = _dataclass_of(arg)
        if found is not None:
            return found
    return None


def _check_keys(cls: type, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
    for name, value in data.items():
        inner = _dataclass_of(hints.get(name))
        if inner is None:
            continue
        items = value if isinstance(value, list | tuple) else [value]
        for i, item in enumerate(items):
            suffix = f"[{i}]" if isinstance(value, list | tuple) else ""
            _check_keys(inner, item, f"{where}.{name}{suffix}")


#: Values echoed in errors are cut (cost bounded by these limits, not by the value: a YAML alias bomb
#: expands to billions of leaves).
_SHORT = reprlib.Repr()  # keyword arguments need Python 3.12
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 60, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def build(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build the settings dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    data = data or {}
    _check_keys(cls, data, where)
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        if err["type"] == "value_error":  # the dataclass's own check: its message says it all
            raise ConfigError(f"{where}{loc}: {err['msg'].removeprefix('Value error, ')}") from exc
        if err["type"] == "missing":  # pydantic's input here is the whole section: name the key only
            raise ConfigError(f"{where}{loc}: missing (required)") from exc
        raise ConfigError(f"{where}{loc}: {err['msg']} (got {_SHORT.repr(err.get('input'))})") from exc
    except ValueError as exc:  # the dataclass's own checks (__post_init__)
        raise ConfigError(f"{where}: {exc}") from exc


def fingerprint(settings: dict[str, Any]) -> str:
    """A short stable hash of the settings that change a stage's outputs (stored in status records, so a
    resumed run redoes slides done with other settings)."""
    return hashlib.sha1(json.dumps(jsonable(settings), sort_keys=True).encode()).hexdigest()[:12]
