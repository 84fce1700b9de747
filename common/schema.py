"""Strict construction of typed dataclasses from YAML mappings.

One function, `build(cls, data, where)`, turns a mapping into a dataclass and refuses anything it does not
understand: an unknown key names its path, the valid keys and the closest match; a wrong type names the
expected type. Recipes are checked this way before anything runs, so a typo fails in a second rather than
after an hour of training.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from common.errors import InputError

MISSING = dataclasses.MISSING


def yaml_key(f: dataclasses.Field) -> str:
    """The key a field has in YAML (`from` is a Python keyword, so its field is `from_`)."""
    return f.metadata.get("key", f.name)


def unknown_key_error(key: str, valid: list[str], where: str, source: str) -> InputError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    listed = ", ".join(sorted(valid)) if len(valid) <= 25 else ", ".join(sorted(valid)[:25]) + ", …"
    return InputError(f"{source}: unknown key '{key}' at {where or 'top level'}; {hint}valid keys: {listed}")


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any, where: str, source: str) -> Any:
    """Return `value` checked (and, for nested dataclasses, built) against the annotation `tp`."""
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None  # an explicit null, not an empty mapping for the other option
        errors = []
        for option in typing.get_args(tp):
            try:
                return check_value(value, option, where, source)
            except InputError as e:
                errors.append(e)
        # A mapping meant for the one dataclass option deserves that option's precise message.
        dataclass_opts = [e for e, o in zip(errors, typing.get_args(tp), strict=True) if dataclasses.is_dataclass(o)]
        if isinstance(value, dict) and len(dataclass_opts) == 1:
            raise dataclass_opts[0]
        raise _type_error(value, tp, where, source)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _type_error(value, tp, where, source)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(value, tp, where, source)
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [check_value(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, tp, where, source)
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {check_value(k, key_tp, where, source): check_value(v, val_tp, f"{where}.{k}", source)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, source)
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(value, tp, where, source)
    if tp is float:
        # PyYAML reads `1e-4` (no dot) as a string; accept any number a float() understands.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(value, tp, where, source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(value, tp, where, source)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _type_error(value, tp, where, source)
    return value  # an annotation we do not model (a callable, a forward ref): leave it to the library


def _type_error(value: Any, tp: Any, where: str, source: str) -> InputError:
    return InputError(f"{source}: {where} must be {type_name(tp)}, got {value!r} ({type(value).__name__}); "
                      f"fix the value in the recipe or the --set override")


def build(cls: type, data: Any, where: str = "", source: str = "recipe") -> Any:
    """Build dataclass `cls` from mapping `data`; every key must be a field, every field typed right."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{source}: {where or 'top level'} must be a mapping of keys to values, "
                         f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {yaml_key(f): f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise unknown_key_error(str(key), list(fields), where, source)
    kwargs = {}
    for key, f in fields.items():
        path = f"{where}.{key}" if where else key
        if key in data:
            kwargs[f.name] = check_value(data[key], hints[f.name], path, source)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise InputError(f"{source}: missing required key '{path}' ({type_name(hints[f.name])}); add it")
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ checks that span several keys
        raise InputError(f"{source}: {where or 'top level'}: {e}") from None


def to_dict(obj: Any) -> Any:
    """The inverse of `build`: a dataclass as plain YAML-ready data, with YAML key names."""
    if dataclasses.is_dataclass(obj):
        return {yaml_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj
