"""A mapping -> a typed config dataclass: the rules every section shares.

Types are checked and converted field by field, unknown keys are rejected with a suggestion, and a
string where a section is expected names the YAML file holding that section (`base:` honoured).
`loader.py` applies these rules to a whole `RunConfig`; `ConfigSection` gives a section defined on
its own (an encoder config) the same `from_dict` / `from_yaml`.  Imports no schema: the schema's
sections import this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Dict, List, Sequence, Type, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one line naming the fix."""


def _read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}".replace("\n", " ")) from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    """`top` over `base`; a mapping that names its own `base:` replaces the inherited one."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "base" not in v:
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _resolve_section_files(data: Dict[str, Any], here: str, cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in data.items():
        ftype = _unwrap_optional(hints.get(k))
        if dataclasses.is_dataclass(ftype) and isinstance(v, str):
            v = {"base": v}
        if dataclasses.is_dataclass(ftype) and isinstance(v, dict):
            v = dict(v)
            base = v.pop("base", None)
            if base is not None:
                sub_path = os.path.join(here, base)
                sub = _resolve_section_files(_read_yaml(sub_path), os.path.dirname(os.path.abspath(sub_path)), ftype)
                v = _deep_merge(sub, v)
            v = _resolve_section_files(v, here, ftype)
        out[k] = v
    return out


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value to the field's declared type."""
    if value is None:
        if _is_optional(tp):
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {getattr(tp, '__name__', tp)})")
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, List, Sequence):
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: Type[T], data: Dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints or key not in names:
            raise ConfigError(_unknown_key_message(path, key, names))
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a section's own __post_init__ check
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def load_section_file(cls: Type[T], path: str) -> T:
    """One section's dataclass from its own YAML file (e.g. an encoder config), `base:` honoured."""
    data = _resolve_section_files({"section": {"base": path}}, os.getcwd(), _SectionHolder.of(cls))["section"]
    return from_dict(cls, data, os.path.basename(path))


class _SectionHolder:
    """A one-field dataclass around `cls`, so section-file resolution can be reused as is."""

    @staticmethod
    def of(cls: type) -> type:
        return dataclasses.make_dataclass("SectionHolder", [("section", cls)])


def _unknown_key_message(path: str, key: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    return f"unknown config key '{path}'{hint}"


S = TypeVar("S", bound="ConfigSection")


class ConfigSection:
    """Mixin: typed construction of one section, unknown keys rejected (and a suggestion made)."""

    @classmethod
    def from_dict(cls: Type[S], data: dict) -> S:
        return from_dict(cls, data)

    @classmethod
    def from_yaml(cls: Type[S], path: str) -> S:
        return load_section_file(cls, path)
