"""The recipe registry: every shipped recipe by name, with its config class and the `main` that runs it.

    recipe, cfg = load_recipe("shapes-sft", ["model=m", "data=d", "out=o", "lora.r=8"])
    final = run_recipe("shapes-sft", ["model=m", "data=d", "out=o"], max_steps=100)   # loads, then runs

A recipe is a YAML file of training/configs (the values) read into a config dataclass (the schema) and
run by a recipe module's `main(cfg, resume) -> Path`. Four kinds exist: `llm` (training.train_llm),
`ett` (training.train_ett), `tokenizer` (training.train_tokenizer) and `teacher`
(training.train_teacher). A shipped recipe's kind is written here, in `RECIPES`; a YAML given by path
names its kind with a top-level `recipe:` key (`recipe: ett`), and without one it is of the kind the
command runs (`mllm train`: llm). Configs and entry points are named as "module:attribute" and imported
when used, so listing the recipes (`mllm train --help`) imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizer_vision.schema import unknown_name
from training.config import CONFIG_DIR, RECIPE_KEY, load_config, read_recipe


def _resolve(reference: str) -> Any:
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Recipe:
    """One kind of recipe: its config class, its entry point and the `mllm` command that runs it."""

    kind: str  # llm | ett | tokenizer | teacher
    config_class: str  # "module:Class", a dataclass with `recipe_kind` == kind
    entry_point: str  # "module:function", main(cfg[, resume]) -> Path
    command: str  # the `mllm` subcommand
    noun: str  # in messages: "recipe NAME is {noun}"
    resumable: bool = True  # main takes `resume` (the teacher trains in minutes and keeps no checkpoints)
    scales_warmup: bool = False  # a shorter --max-steps shrinks warmup_steps with it

    @property
    def config(self) -> type:
        return _resolve(self.config_class)

    @property
    def main(self) -> Callable[..., Path]:
        return _resolve(self.entry_point)


KINDS: dict[str, Recipe] = {
    "llm": Recipe("llm", "training.components:LLMTrainConfig", "training.train_llm:main", "train",
                  "an LLM recipe", scales_warmup=True),
    "ett": Recipe("ett", "training.train_ett:ETTTrainConfig", "training.train_ett:main", "train",
                  "an ETT recipe", scales_warmup=True),
    "tokenizer": Recipe("tokenizer", "training.train_tokenizer:TokenizerTrainConfig", "training.train_tokenizer:main",
                        "train-tokenizer", "a tokenizer recipe"),
    "teacher": Recipe("teacher", "training.train_teacher:TeacherConfig", "training.train_teacher:main",
                      "train-teacher", "a teacher recipe", resumable=False),
}

# Every YAML of training/configs, by file name (tests/training/test_recipes.py holds the two in step).
RECIPES: dict[str, Recipe] = {
    "align": KINDS["llm"],
    "pretrain": KINDS["llm"],
    "sft": KINDS["llm"],
    "chat": KINDS["llm"],
    "qwen2.5-1.5b-lora": KINDS["llm"],
    "shapes-pretrain": KINDS["llm"],
    "shapes-pretrain-tasks": KINDS["llm"],
    "shapes-sft": KINDS["llm"],
    "ett": KINDS["ett"],
    "shapes-ett": KINDS["ett"],
    "tokenizer-shapes": KINDS["tokenizer"],
    "tokenizer-photo": KINDS["tokenizer"],
    "teacher-shapes": KINDS["teacher"],
}


def recipe_names(kinds: Iterable[str] | None = None) -> list[str]:
    """The shipped recipes (of the given kinds), sorted."""
    return sorted(name for name, recipe in RECIPES.items() if kinds is None or recipe.kind in kinds)


def find_recipe(name_or_path: str | Path, default_kind: str = "llm") -> tuple[Recipe, Path]:
    """(Recipe, YAML file) for a shipped name, or for a YAML path: of the kind its `recipe:` key names,
    else `default_kind`. An unknown name is a ValueError with the closest shipped one."""
    if Path(name_or_path).suffix not in (".yaml", ".yml"):
        name = str(name_or_path)
        if name not in RECIPES:
            raise unknown_name("recipe", name, RECIPES)
        return RECIPES[name], CONFIG_DIR / f"{name}.yaml"
    path = Path(name_or_path)
    kind = read_recipe(path).get(RECIPE_KEY, default_kind)
    if kind not in KINDS:
        raise ValueError(f"{path}: {unknown_name('recipe kind', str(kind), KINDS)}")
    return KINDS[kind], path


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = (), kinds: Sequence[str] | None = None,
                max_steps: int | None = None) -> tuple[Recipe, Any]:
    """(Recipe, validated config) for a recipe name or YAML path with `key=value` overrides. `kinds`: the
    kinds the caller runs (the first is the default of a YAML without a `recipe:` key); another kind is a
    ValueError that names the command to run it with.

    `max_steps` overrides the recipe's number of optimizer steps. For the LLM recipes a shortened run keeps
    the recipe's shape: warmup shrinks in proportion (unless `warmup_steps` is among the overrides), so a
    100-step run does not spend all of it warming up towards a peak it never reaches."""
    recipe, path = find_recipe(name_or_path, default_kind=kinds[0] if kinds else "llm")
    if kinds is not None and recipe.kind not in kinds:
        raise ValueError(f"recipe {name_or_path} is {recipe.noun}: run it with `mllm {recipe.command}`")
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    overrides = list(overrides)
    if max_steps is not None and not recipe.scales_warmup:
        overrides.append(f"max_steps={max_steps}")
    cfg = load_config(recipe.config, path, overrides)
    if max_steps is not None and recipe.scales_warmup:
        set_keys = {item.split("=", 1)[0].strip() for item in overrides}
        if "warmup_steps" not in set_keys and max_steps < cfg.max_steps:
            warmup = round(cfg.warmup_steps * max_steps / cfg.max_steps)
            print(f"--max-steps {max_steps} (recipe: {cfg.max_steps}): warmup_steps {cfg.warmup_steps} -> {warmup}")
            cfg.warmup_steps = warmup
        cfg.max_steps = max_steps
    return recipe, cfg


def run_recipe(name_or_path: str | Path, overrides: Sequence[str] = (), resume: bool = False,
               max_steps: int | None = None, kinds: Sequence[str] | None = None) -> Path:
    """Load a recipe (`load_recipe`) and run its `main`; returns what that returns (the trained folder)."""
    recipe, cfg = load_recipe(name_or_path, overrides, kinds, max_steps)
    if not recipe.resumable:
        if resume:
            raise ValueError(f"{recipe.noun} keeps no checkpoints to resume from: rerun it without resume")
        return recipe.main(cfg)
    return recipe.main(cfg, resume=resume)


__all__ = ["KINDS", "RECIPES", "Recipe", "find_recipe", "load_recipe", "recipe_names", "run_recipe"]
