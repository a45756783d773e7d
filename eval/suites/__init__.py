"""Evaluation suites, found by name: every module here exposes `SUITES = {"name": factory}`."""

from __future__ import annotations

import importlib
import pkgutil
import textwrap

from eval.suites.base import Item, ScoreContext, Suite
from tokenizer_vision.schema import unknown_name


def _registry() -> dict[str, tuple[str, object]]:
    found: dict[str, tuple[str, object]] = {}
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for name, factory in getattr(module, "SUITES", {}).items():
            if name in found:
                raise RuntimeError(f"suite {name!r} is defined in both {found[name][0]} and {module.__name__}")
            found[name] = (module.__name__, factory)
    return found


def suite_names() -> list[str]:
    return sorted(_registry())


# What --data holds for a suite whose module does not say it (`Suite.data_help`).
_DATA_HELP = {
    "tokenizer": "required: image shards (e.g. runs/demo/data/test) or a folder of images; --model: a model or "
                 "vision tokenizer folder",
}


def data_help(name: str) -> str:
    """One line on what --data holds for suite `name` (its `data_help`)."""
    return get_suite(name).data_help or _DATA_HELP.get(name, "")


def suites_epilog() -> str:
    """The `mllm eval --help` epilog: every suite with what --data holds, one line each."""
    names = suite_names()
    width = max(len(name) for name in names) + 2
    lines = ["suites and what --data holds (.jpg, .jpeg and .png images all match an image name; full",
             "layouts with example trees: docs/evaluation.md):"]
    indent = " " * (2 + width)
    for name in names:
        lines += textwrap.wrap(data_help(name), 100, initial_indent=f"  {name:<{width}}", subsequent_indent=indent,
                               break_on_hyphens=False) or [f"  {name}"]
    return "\n".join(lines)


def get_suite(name: str) -> Suite:
    registry = _registry()
    if name not in registry:
        raise unknown_name("suite", name, registry)
    suite = registry[name][1]()
    suite.name = name
    return suite


__all__ = ["Item", "ScoreContext", "Suite", "data_help", "get_suite", "suite_names", "suites_epilog"]
