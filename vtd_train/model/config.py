"""Build the frozen config dataclasses from plain dicts (parsed YAML), validating every key.

``config_from_dict(VTDNetConfig, {"backbone": {"name": "swin_t"}, "tasks": ["det", "ins"]},
source="configs/x.yaml")``: unknown keys and values of the wrong type are a
:class:`~data_pipeline.errors.VTDInputError` that names the source, the key path and the value;
range checks are the dataclasses' own ``__post_init__`` (their errors get the source prefixed).
Lists become tuples; missing keys keep their defaults.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

from data_pipeline.errors import VTDInputError

T = TypeVar("T")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise VTDInputError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise VTDInputError(f"{where}: must not be null")
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(arm, value, where)
            except VTDInputError as e:
                errors.append(str(e))
        raise VTDInputError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise VTDInputError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise VTDInputError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise VTDInputError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise VTDInputError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise VTDInputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise VTDInputError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type[T], data: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}: " if where else ""
    unknown = sorted(set(data) - names)
    if unknown:
        raise VTDInputError(f"{prefix}unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # VTDInputError is a ValueError
        raise VTDInputError(f"{prefix}{e}") from e


def config_from_dict(cls: type[T], data: dict, *, source: str = "<config>") -> T:
    """``cls(**data)`` with nested dataclasses built and every key and value checked."""
    if not isinstance(data, dict):
        raise VTDInputError(f"{source}: expected a mapping, got {type(data).__name__}")
    try:
        return _build(cls, data, "")
    except VTDInputError as e:
        raise VTDInputError(f"{source}: {e}") from e


def read_yaml_mapping(path: str, *, what: str = "config") -> dict:
    """A YAML file (local path or fsspec URI) whose top level is a mapping; a missing file, a
    non-UTF-8 one, invalid YAML or another top level is one error naming ``path``."""
    import yaml

    from data_pipeline import fsio

    try:
        text = fsio.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what} file") from None
    except UnicodeDecodeError as e:
        raise VTDInputError(f"{path}: not UTF-8 text: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise VTDInputError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise VTDInputError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
