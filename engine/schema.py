"""Typed construction of dataclasses from plain dicts (parsed YAML), with errors that name the key.

``build(cls, data, where)`` turns a nested dict into an instance of the dataclass ``cls``:

- an unknown key fails, naming its dotted path and suggesting the closest known key;
- every value is checked against the field's annotation (``int``, ``float`` (ints accepted), ``bool``,
  ``str``, ``Literal[...]``, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, nested
  dataclasses); a wrong type fails, naming the key, the expected type and the value;
- missing keys take the dataclass defaults; a field without a default must be present;
- a key that moved to another section fails naming where it went: a dataclass lists such keys in a
  class attribute ``MOVED_KEYS = {"old_key": "section.new_key"}``.

The validate contract (every config dataclass, one way): a dataclass may define ``validate(self) -> None``
for checks beyond types (ranges, combinations). It raises :class:`ConfigError` whose message starts with
the offending key *relative to that dataclass* (``"hidden_dim: must be >= 1, got 0"``) and returns
nothing; ``build`` prefixes the section's path, so the user reads ``model.hidden_dim: must be >= 1, got 0``.
A dataclass that checks a nested one prefixes the nested key itself (``uvit3d.channels: ...``). Code that
needs filled-in values (presets, defaults) asks for them explicitly (e.g. ``DiTConfig.resolved()``).
The top-level dataclass is built at path ``""``, so its checks name full key paths.

``to_dict(obj)`` is the inverse (for writing the resolved recipe back to YAML).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from geoforge.engine.errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe value is unknown, mistyped or inconsistent. The message names the key."""


def key_path(where: str, key: str) -> str:
    """``where.key`` (just ``key`` at the top level, ``where == ""``)."""
    return f"{where}.{key}" if where else str(key)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _check(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return value
        raise ConfigError(f"{where}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_check(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {k: _check(vt, v, key_path(where, k)) for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (bool, str):
        if isinstance(value, tp):
            return value
    else:
        raise ConfigError(f"{where}: unsupported annotation {tp!r} in the schema")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def build(cls: type, data: Any, where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data`` (a dict, or an instance of ``cls``) at key path ``where``
    (``""``: the top level), then run its ``validate()`` (module docstring)."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the top level'}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    moved = getattr(cls, "MOVED_KEYS", {})
    for key in data:
        if key not in fields and key in moved:
            raise ConfigError(f"{key_path(where, key)}: this key moved to {moved[key]}; give it there")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key_path(where, key)}: unknown key{hint}; known keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check(hints[name], data[name], key_path(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key_path(where, name)}: required key is missing")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or 'the top level'}: {err}") from err
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(key_path(where, str(err))) from err
    return obj


def to_dict(obj: Any) -> Any:
    """Plain YAML-friendly data (dicts, lists, scalars) from a dataclass tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
