"""Typed settings from plain mappings (YAML, JSON): `build_dataclass` makes a frozen dataclass
from a dict, checking every key (an unknown one is an error listing the valid ones) and every
value against its type hint (numbers finite), and builds dataclass-typed fields the same way.
Recipes and all their sections, DataConfig among them, are read through it."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, TypeVar

from canon.errors import ConfigError

Settings = TypeVar("Settings")


def build_dataclass(cls: type[Settings], values: Any, where: str) -> Settings:
    """`cls(**values)`, checked; `where` names the mapping in errors ("recipe", "data")."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names), key=str)  # YAML keys may be numbers too
    if unknown:
        full = "" if where == "recipe" else f" ({', '.join(f'{where}.{k}' for k in unknown)})"
        raise ConfigError(
            f"unknown {where} key(s) {unknown}{full}; valid keys in {where}: {', '.join(names)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    missing = dataclasses.MISSING
    for field in dataclasses.fields(cls):
        key = field.name if where == "recipe" else f"{where}.{field.name}"
        if field.name not in values:
            if field.default is missing and field.default_factory is missing:
                raise ConfigError(f"{where} lacks the required key {key}")
            continue
        value = values[field.name]
        if dataclasses.is_dataclass(hints[field.name]):  # a section left empty: null alone
            kwargs[field.name] = build_dataclass(hints[field.name],
                                                 {} if value is None else value, key)
        else:
            kwargs[field.name] = _coerce(value, hints[field.name], key)
    return cls(**kwargs)


def plain(value: Any) -> Any:
    """Dataclasses' values as YAML/JSON-able ones (tuples become lists); see build_dataclass."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: plain(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint (int, float, bool, str, tuples, Optional)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(inner) != len(value):
            raise ConfigError(f"{key} must hold {len(inner)} values, got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, inner, strict=True))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))
    ):
        raise ConfigError(f"{key} must be of type {hint.__name__}, got {value!r}")
    return value


def one_or_many(values: Any) -> list[Any]:
    """An argument that takes one item or several, as a list: a single string, path or number
    is one item (a string's characters are not its items)."""
    if isinstance(values, str | os.PathLike | int | float):
        return [values]
    return list(values)
