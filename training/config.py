"""Typed recipe configs: a dataclass is the schema, a YAML file is an instance.

`load_config(Schema, "tokenizer-shapes", ["learning_rate=3e-4"])` reads a shipped recipe (or
any YAML path), applies `key=value` overrides (dotted keys reach nested dataclasses), checks
every key against the schema and coerces values to the declared types (`tokenizer_vision.schema`).
Unknown keys and wrong types are errors that name the key and the closest valid one, so a typo
never trains silently with a default.

A YAML file may name the kind of recipe it is with a top-level `recipe:` key (`recipe: ett`); a
schema declares its kind as `recipe_kind`, and `save_config` writes it, so a run's saved config
loads back as the recipe it came from (training.recipes picks the recipe by that key).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mllm.io import write_file
from tokenizer_vision.schema import from_dict, unknown_name

CONFIG_DIR = Path(__file__).parent / "configs"
RECIPE_KEY = "recipe"  # the top-level key of a YAML file that names its kind of recipe

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
        raise unknown_name("recipe", str(name_or_path), list_recipes())
    return shipped


def list_recipes() -> list[str]:
    """The names of the YAML files shipped in training/configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_recipe(source: str | Path) -> dict:
    """The mapping of a recipe YAML (a shipped name or a path)."""
    path = recipe_path(source)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"recipe {path} is not valid YAML: {_yaml_problem(error)} (fix the file)") from None
    except UnicodeDecodeError:
        raise ValueError(f"recipe {path} is not a text file (give a YAML file)") from None
    if isinstance(data, dict):
        return data
    raise ValueError(f"recipe {source} must be a YAML mapping, not a {type(data).__name__}")


def _yaml_problem(error: yaml.YAMLError) -> str:
    """`line 3, column 7: mapping values are not allowed here`: where and what, without PyYAML's excerpt."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or not problem:
        return " ".join(str(error).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def parse_overrides(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[1, 2]"]` -> `{"a": {"b": 1}, "c": [1, 2]}` (values parsed as YAML)."""
    result: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ValueError(f"--set {key.strip()}: cannot read the value {raw!r} (YAML)") from None
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


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def load_config(schema: type[T], source: str | Path | dict | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Schema defaults <- recipe YAML (name or path) <- `key=value` overrides."""
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        data = read_recipe(source)
    kind, expected = data.pop(RECIPE_KEY, None), getattr(schema, "recipe_kind", None)
    if kind is not None and kind != expected:
        name = source if isinstance(source, (str, Path)) else "config"
        raise ValueError(f"{name} says `{RECIPE_KEY}: {kind}`, but is read as a {expected or schema.__name__} recipe")
    merged = _merge(data, parse_overrides(overrides))
    try:
        config = from_dict(schema, merged)
    except ValueError as error:
        if isinstance(source, (str, Path)) and _fails_alone(schema, data, error):
            # the YAML file's own key or value, not a --set override: say which file holds it
            raise ValueError(f"recipe {source}: {error}") from None
        raise
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def _fails_alone(schema: type, data: dict, error: ValueError) -> bool:
    """Whether the recipe's own mapping, without the overrides, fails with the same error."""
    try:
        from_dict(schema, data)
    except ValueError as own:
        return str(own) == str(error)
    return False


def save_config(config: Any, path: str | Path) -> None:
    """`config` as YAML, with its `recipe:` kind first when the schema declares one (so it loads back)."""
    data = to_dict(config)
    kind = getattr(config, "recipe_kind", None)
    if kind is not None:
        data = {RECIPE_KEY: kind, **data}
    write_file(path, yaml.safe_dump(data, sort_keys=False))  # atomically: a kill never leaves half a recipe
