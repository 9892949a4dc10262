"""Typed configs from plain dicts, YAML/TOML/JSON files and `a.b=value` overrides.

Design: configs are frozen stdlib dataclasses that validate their own values in `__post_init__`.
The type walk (nested sections, tuples, optionals, numbers) is pydantic's: a dict is checked as
JSON in strict mode (an int field refuses `true` and `"3"`, a float field takes an int, a list
becomes a tuple) with unknown keys forbidden, and every problem comes back as one `ValueError`
naming the dotted field path, so a typo never silently falls back to a default. Files and
`--set` overrides go through the same path. Presets are plain dicts of name -> instance; a value
is either a preset name or a mapping with an optional `preset` key plus field overrides.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# Applied to every config dataclass the loader meets (stdlib dataclasses carry pydantic's settings in
# this attribute): unknown keys are errors, and JSON-strict types (see the module docstring).
_STRICT = {"extra": "forbid", "strict": True}


def _dataclasses_in(annotation: Any) -> list[type]:
    """The dataclasses an annotation names, through Optional / Union / tuple / list arguments."""
    found, stack = [], [annotation]
    while stack:
        item = stack.pop()
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            found.append(item)
        stack.extend(typing.get_args(item))
    return found


def _make_strict(cls: type) -> None:
    """Give `cls` and every dataclass in its fields pydantic's strict settings (once per class)."""
    if "__pydantic_config__" in cls.__dict__:
        return
    cls.__pydantic_config__ = _STRICT
    for annotation in typing.get_type_hints(cls).values():
        for inner in _dataclasses_in(annotation):
            _make_strict(inner)


@functools.cache
def _adapter(cls: type) -> Any:
    """pydantic's validator of dataclass `cls`, with `cls` and the dataclasses in its fields made strict."""
    _make_strict(cls)
    return _pydantic().TypeAdapter(cls)


def _pydantic() -> Any:
    """pydantic, imported on first validation: the model library imports this module for its presets, and
    code that only reads presets (the GPU benchmark on a stock PyTorch image) must not need pydantic."""
    import pydantic

    return pydantic


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not a config value")


def config_from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """Build dataclass `cls` from a plain dict; unknown keys, wrong types and invalid values raise ValueError."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    try:
        text = json.dumps(data, default=_jsonable)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    try:
        return _adapter(cls).validate_json(text)
    except _pydantic().ValidationError as exc:
        raise ValueError("; ".join(_describe(error, cls, where) for error in exc.errors())) from None


def _describe(error: dict[str, Any], cls: type, where: str) -> str:
    path = where + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
    kind, message = error["type"], error["msg"]
    if kind == "unexpected_keyword_argument":
        return f"{path}: unknown field; valid fields: {_field_names(cls, error['loc'][:-1])}"
    if kind == "missing_argument":
        return f"{path}: missing"
    if kind == "value_error":  # a __post_init__ check: its own message
        return f"{path}: {message.removeprefix('Value error, ')}"
    return f"{path}: {message} (got {error.get('input')!r})"


def _field_names(cls: type, loc: tuple) -> list[str]:
    """The field names of the dataclass found by following `loc` (field names, list indices) from `cls`."""
    node: Any = cls
    for part in loc:
        if isinstance(part, str) and dataclasses.is_dataclass(node):
            node = typing.get_type_hints(node)[part]
        inner = _dataclasses_in(node)
        node = inner[0] if inner else None
    return sorted(f.name for f in dataclasses.fields(node) if f.init) if node else []


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a (nested) config dataclass; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def replace(config: T, **changes: Any) -> T:
    """dataclasses.replace that re-runs validation and reports bad fields as ValueError."""
    return config_from_dict(type(config), {**config_to_dict(config), **changes})


def preset_or_dict(cls: type[T], presets: dict[str, T], value: str | dict[str, Any], where: str) -> T:
    """Resolve `value` as a preset name, or a dict with an optional `preset` key plus field overrides."""
    if isinstance(value, str):
        if value not in presets:
            raise ValueError(f"{where}: unknown preset {value!r}; choose one of {sorted(presets)}")
        return presets[value]
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a preset name or a mapping, got {value!r}")
    value = dict(value)
    base = {}
    if "preset" in value:
        name = value.pop("preset")
        if name not in presets:
            raise ValueError(f"{where}.preset: unknown preset {name!r}; choose one of {sorted(presets)}")
        base = config_to_dict(presets[name])
    base.update(value)
    return config_from_dict(cls, base, where=where)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict; values are parsed as YAML scalars/lists, and an empty
    value is the empty string (`--set text.encoder=` turns the text stage off; `null` is None)."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ValueError(f"override {item!r} has an empty key")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data
