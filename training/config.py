"""Typed recipe configs: a dataclass is the schema, a YAML file is an instance.

`load_config(Schema, "tokenizer-shapes", ["learning_rate=3e-4"])` reads a shipped recipe (or
any YAML path), applies `key=value` overrides (dotted keys reach nested dataclasses), checks
every key against the schema and coerces values to the declared types. Unknown keys and wrong
types are errors that name the key and the accepted ones, so a typo never trains silently with
a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"

T = TypeVar("T")


def recipe_path(name_or_path: str | Path) -> Path:
    """A shipped recipe name (`tokenizer-shapes`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no recipe named {name_or_path!r}; shipped recipes: {names}")
    return shipped


def list_recipes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def parse_overrides(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[1, 2]"]` -> `{"a": {"b": 1}, "c": [1, 2]}` (values parsed as YAML)."""
    result: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return result


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(f"{key}: {value!r} matches none of {annotation}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise TypeError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[]") for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{key}: expected true/false, got {value!r}")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise TypeError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise TypeError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(schema: type[T], data: dict, prefix: str = "") -> T:
    """Build `schema` from a mapping, refusing unknown keys and coercing declared types."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"accepted: {', '.join(prefix + k for k in fields)}"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return schema(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def load_config(schema: type[T], source: str | Path | dict | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Schema defaults <- recipe YAML (name or path) <- `key=value` overrides."""
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        with open(recipe_path(source)) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"recipe {source} must be a YAML mapping")
    data = _merge(data, parse_overrides(overrides))
    config = from_dict(schema, data)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def save_config(config: Any, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
