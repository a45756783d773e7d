"""training.recipes: the registry agrees with training/configs, every recipe loads as its kind, and every
user mistake is a one-line ValueError that names the key or recipe (with the closest valid one)."""

import dataclasses

import pytest

from training.config import list_recipes
from training.recipes import KINDS, RECIPES, find_recipe, load_recipe, run_recipe

REQUIRED = {"tokenizer": ["data=d", "out=o", "teacher=t"]}


def _required(recipe) -> list[str]:
    return REQUIRED.get(recipe.kind, ["data=d", "out=o"])


def test_the_registry_names_every_shipped_yaml_and_nothing_else():
    assert sorted(RECIPES) == list_recipes()
    assert set(KINDS.values()) >= set(RECIPES.values())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_shipped_recipe_loads_and_validates_as_its_registered_kind(name):
    recipe, path = find_recipe(name)
    assert path.is_file() and path.stem == name
    recipe, cfg = load_recipe(name, _required(RECIPES[name]))
    assert recipe is RECIPES[name]
    assert type(cfg) is recipe.config and dataclasses.is_dataclass(cfg)
    assert cfg.recipe_kind == recipe.kind
    assert callable(recipe.main)


def test_the_typed_sections_are_dataclasses():
    from mllm.lora import LoraSettings
    from training.train_ett import ETTSettings

    _, sft = load_recipe("shapes-sft", ["data=d", "out=o", "lora.r=8"])
    assert isinstance(sft.lora, LoraSettings) and sft.lora.r == 8 and sft.lora.target_modules == [
        "q_proj", "k_proj", "v_proj", "o_proj"]
    _, full = load_recipe("shapes-sft", ["data=d", "out=o", "lora=null"])
    assert full.lora is None
    _, ett = load_recipe("shapes-ett", ["data=d", "out=o", "ett.train_tokenizer=false"])
    assert isinstance(ett.ett, ETTSettings) and ett.ett.train_tokenizer is False
    with pytest.raises(ValueError, match="reconstruction_weight and tokenizer_learning_rate must be >= 0"):
        load_recipe("shapes-ett", ["data=d", "out=o", "ett.reconstruction_weight=-1"])


@pytest.mark.parametrize("name, overrides, kinds, message", [
    # a misspelled recipe or key: the closest valid one
    ("sftt", [], None, "unknown recipe 'sftt'.*did you mean sft\\?"),
    ("shapes-sftt", [], None, "did you mean shapes-sft\\?"),
    ("shapes-sft", ["learnig_rate=1"], None, "unknown config key 'learnig_rate' \\(did you mean learning_rate\\?\\)"),
    ("shapes-ett", ["ett.reconstruction_weigth=1"], None, "did you mean ett.reconstruction_weight\\?"),
    ("tokenizer-shapes", ["max_step=1"], None, "did you mean max_steps\\?"),
    ("shapes-sft", ["lora.rr=4"], None, "unknown config key 'lora.rr' \\(did you mean lora.r\\?\\)"),
    ("shapes-sft", ["lora.r=0"], None, "LoRA rank r must be >= 1"),
    # a wrong value: the key
    ("shapes-pretrain", ["learning_rate=fast"], None, "learning_rate: expected a number, got 'fast'"),
    ("shapes-pretrain", ["learning_rate"], None, "--set expects key=value, got 'learning_rate'"),
    ("shapes-pretrain", ["learning_rate=[1"], None, "--set learning_rate: cannot read the value"),
    # another command's recipe: that command
    ("tokenizer-shapes", [], ("llm", "ett"), "is a tokenizer recipe: run it with `mllm train-tokenizer`"),
    ("shapes-ett", [], ("tokenizer",), "recipe shapes-ett is an ETT recipe: run it with `mllm train`"),
])
def test_a_user_mistake_is_a_value_error_that_names_it(name, overrides, kinds, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(name, ["data=d", "out=o", "teacher=t" if name.startswith("tokenizer") else "seed=0",
                           *overrides], kinds)


def test_max_steps_must_be_positive():
    with pytest.raises(ValueError, match="max_steps must be positive"):
        load_recipe("shapes-pretrain", ["data=d", "out=o"], max_steps=0)


def test_a_yaml_path_names_its_kind_with_a_recipe_key(tmp_path):
    ett = tmp_path / "mine-ett.yaml"
    ett.write_text("recipe: ett\ntasks: {caption: 1.0}\nett: {bake: false}\n")
    recipe, cfg = load_recipe(ett, ["data=d", "out=o"], kinds=("llm", "ett"))
    assert recipe.kind == "ett" and cfg.ett.bake is False
    plain = tmp_path / "mine.yaml"
    plain.write_text("tasks: {caption: 1.0}\n")
    assert load_recipe(plain, ["data=d", "out=o"], kinds=("llm", "ett"))[0].kind == "llm"
    vision = tmp_path / "vision.yaml"
    vision.write_text("batch_size: 8\n")
    assert load_recipe(vision, ["data=d", "out=o", "teacher=t"], kinds=("tokenizer",))[0].kind == "tokenizer"
    assert load_recipe(vision, ["data=d", "out=o"], kinds=("teacher",))[0].kind == "teacher"
    with pytest.raises(ValueError, match="unknown config key 'ett'"):  # no detection by the section
        load_recipe(tmp_path / "mine.yaml", ["data=d", "out=o", "ett.bake=false"])
    typo = tmp_path / "typo.yaml"
    typo.write_text("recipe: et\n")
    with pytest.raises(ValueError, match="did you mean ett\\?"):
        find_recipe(typo)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_recipe(tmp_path / "missing.yaml")


def test_max_steps_is_a_plain_override_outside_the_llm_recipes(monkeypatch):
    import training.train_teacher
    import training.train_tokenizer

    seen = []
    monkeypatch.setattr(training.train_tokenizer, "main", lambda cfg, resume=False: seen.append((cfg, resume)))
    monkeypatch.setattr(training.train_teacher, "main", lambda cfg: seen.append((cfg, None)))
    run_recipe("tokenizer-shapes", ["data=d", "out=o", "teacher=t"], resume=True, max_steps=7)
    run_recipe("teacher-shapes", ["data=d", "out=o"], max_steps=5)
    assert [(cfg.max_steps, cfg.warmup_steps, resume) for cfg, resume in seen] == [(7, 100, True), (5, 100, None)]
    with pytest.raises(ValueError, match="no checkpoints"):
        run_recipe("teacher-shapes", ["data=d", "out=o"], resume=True)


def test_missing_data_is_named(tmp_path):
    from mllm.data.arrays import load_image_arrays
    from training.components import load_task_pools

    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'} does not exist"):
        load_task_pools(str(tmp_path / "nowhere"), {"caption": 1.0})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_arrays(str(tmp_path / "nowhere"), 32)


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "sftt"], "did you mean sft?"),
    (["--recipe", "shapes-sft", "--set", "learnig_rate=1"], "did you mean learning_rate?"),
    (["--recipe", "shapes-sft", "--set", "learning_rate=fast"], "learning_rate: expected a number, got 'fast'"),
    (["--recipe", "tokenizer-shapes"], "run it with `mllm train-tokenizer`"),
])
def test_mllm_train_reports_a_user_error_in_one_line(argv, message, capsys):
    from mllm.cli import main

    assert main(["train", *argv, "--model", "x", "--data", "y", "--out", "z"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mllm train: error: ") and message in err, err
