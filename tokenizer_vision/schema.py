"""Typed configs: a dataclass is the schema, a mapping (YAML, JSON, `--set` overrides) is an instance.

Every config of the project (the vision tokenizer's, the unified model's, the training recipes',
LoRA's, ETT's) is read through this module, so an unknown key, an unknown name and a wrongly
typed value fail the same way everywhere: a `ValueError` that names the key and the closest
valid choice ("did you mean learning_rate?"). It sits in the lowest package because every other
package builds on it (the import rule: tokenizer_vision <- mllm <- training, eval, serve).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The valid choice nearest to a misspelled `name`, or None when nothing is close."""
    choices = [str(choice) for choice in choices]
    matches = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
    if not matches:
        # A prefix or substring ("sft" for "shapes-sft", "lr" in "learning_rate" does not count).
        matches = [c for c in choices if len(str(name)) >= 3 and (c.startswith(str(name)) or str(name) in c)]
    return matches[0] if matches else None


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> ValueError:
    """`unknown recipe 'sftt'; did you mean sft? (choose from: ...)` as a ValueError to raise."""
    choices = sorted(str(choice) for choice in choices)
    suggestion = closest(name, choices)
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    return ValueError(f"unknown {kind} {name!r}{hint} (choose from: {', '.join(choices)})")


def field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def check_keys(data: dict[str, Any], known: Iterable[str], where: str, prefix: str = "") -> None:
    """The one unknown-key check: raise a ValueError naming the first unknown key and its nearest
    known one. `where` says whose keys these are ("TokenizerConfig", "mllm_config.json", ...)."""
    known = list(known)
    unknown = [key for key in data if key not in known]
    if not unknown:
        return
    key = unknown[0]
    suggestion = closest(key, known)
    if suggestion:
        hint = f"did you mean {prefix}{suggestion}?"
    else:
        hint = f"known keys: {', '.join(prefix + k for k in known)}" if known else "it takes none"
    more = f" (and {len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""
    raise ValueError(f"unknown {where} key {prefix + str(key)!r}{more} ({hint})")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        choices = [arg for arg in args if arg is not type(None)]
        if len(choices) == 1:  # `X | None`: X's own error says what is wrong ("did you mean lora.r?")
            return _coerce(value, choices[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                pass
        expected = " or ".join(getattr(a, "__name__", str(a)) for a in args if a is not type(None))
        raise ValueError(f"{key}: {value!r} is not a valid {expected}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin is typing.Literal:
        if value not in args:
            suggestion = closest(str(value), [str(a) for a in args])
            hint = f"; did you mean {suggestion}?" if suggestion else ""
            raise ValueError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[]") for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def coerce_fields(schema: type, data: dict[str, Any], prefix: str = "", where: str | None = None) -> dict[str, Any]:
    """`data` checked against the fields of `schema` (unknown keys refused with a suggestion) and coerced to
    their declared types, without building the dataclass: for overrides merged into defaults later."""
    check_keys(data, field_names(schema), where or "config", prefix=prefix)
    hints = typing.get_type_hints(schema)
    return {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}


def from_dict(schema: type[T], data: dict[str, Any], prefix: str = "", where: str | None = None) -> T:
    """Build the dataclass `schema` from a mapping: unknown keys refused (with a suggestion), declared
    types coerced (nested dataclasses included), then the dataclass's own `__post_init__` checks run."""
    check_keys(data, field_names(schema), where or "config", prefix=prefix)
    hints = typing.get_type_hints(schema)
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return schema(**kwargs)


__all__ = ["check_keys", "closest", "coerce_fields", "field_names", "from_dict", "unknown_name"]
