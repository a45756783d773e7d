"""Evaluation suites, found by name: every module here exposes `SUITES = {"name": factory}`."""

from __future__ import annotations

import importlib
import pkgutil

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


def get_suite(name: str) -> Suite:
    registry = _registry()
    if name not in registry:
        raise unknown_name("suite", name, registry)
    suite = registry[name][1]()
    suite.name = name
    return suite


__all__ = ["Item", "ScoreContext", "Suite", "get_suite", "suite_names"]
