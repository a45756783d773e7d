import dataclasses

import pytest

from training.components import LLMTrainConfig
from training.config import list_recipes, load_config, parse_overrides, recipe_path, save_config
from training.recipes import RECIPES
from training.train_ett import ETTTrainConfig
from training.train_tokenizer import TokenizerTrainConfig


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_validates(name):
    schema = RECIPES[name].config
    config = load_config(schema, name, ["data=/tmp/d", "out=/tmp/o", "teacher=/tmp/t"] if schema is TokenizerTrainConfig
                         else ["data=/tmp/d", "out=/tmp/o"])
    assert dataclasses.is_dataclass(config)
    header = recipe_path(name).read_text().splitlines()[0]
    assert header.startswith("#"), "every recipe starts with a comment saying what it is and how to run it"


def test_overrides_reach_nested_keys_and_coerce_types():
    config = load_config(TokenizerTrainConfig, "tokenizer-shapes",
                         ["data=d", "out=o", "teacher=t", "learning_rate=1e-4", "max_steps=7",
                          "tokenizer.codebook_size=256"])
    assert config.learning_rate == pytest.approx(1e-4)
    assert config.max_steps == 7 and isinstance(config.max_steps, int)
    assert config.tokenizer == {"codebook_size": 256}


def test_unknown_key_names_the_key_and_the_closest_one():
    with pytest.raises(ValueError, match="unknown config key 'learning_rat' \\(did you mean learning_rate\\?\\)"):
        load_config(TokenizerTrainConfig, "tokenizer-shapes", ["data=d", "out=o", "teacher=t", "learning_rat=1"])


def test_wrong_type_is_refused():
    with pytest.raises(ValueError, match="max_steps: expected an integer, got 'many'"):
        load_config(TokenizerTrainConfig, "tokenizer-shapes", ["data=d", "out=o", "teacher=t", "max_steps=many"])


def test_semantic_quantizer_without_teacher_explains_what_to_do():
    with pytest.raises(ValueError, match="--teacher"):
        load_config(TokenizerTrainConfig, "tokenizer-shapes", ["data=d", "out=o"])


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="unknown recipe 'no-such-recipe' .*tokenizer-shapes"):
        recipe_path("no-such-recipe")
    with pytest.raises(ValueError, match="did you mean shapes-sft"):
        recipe_path("shapes-sftt")


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "c=[1, 2]", "d=x"]) == {"a": {"b": 1}, "c": [1, 2], "d": "x"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["novalue"])


def test_generic_llm_recipes_are_shipped_with_their_stage_settings():
    align = load_config(LLMTrainConfig, "align", ["data=d", "out=o"])
    assert align.freeze_llm and align.lora is None and set(align.tasks) == {"caption", "t2i"}
    sft = load_config(LLMTrainConfig, "sft", ["data=d", "out=o"])
    assert sft.lora is not None and set(sft.tasks) == {"vqa", "chat", "t2i"}
    qwen = load_config(LLMTrainConfig, "qwen2.5-1.5b-lora", ["data=d", "out=o"])
    assert qwen.lora.r == 64 and qwen.lora.target_modules == "all-linear"
    assert qwen.precision == "bf16" and qwen.gradient_accumulation_steps > 1
    for name in ("ett", "shapes-ett"):
        ett = load_config(ETTTrainConfig, name, ["data=d", "out=o"])
        assert ett.ett.train_tokenizer and ett.ett.reconstruction_weight > 0 and ett.quantization is None


@pytest.mark.parametrize("name", ["shapes-sft", "shapes-ett", "tokenizer-shapes", "teacher-shapes"])
def test_a_saved_config_loads_back_as_the_recipe_it_came_from(name, tmp_path):
    schema = RECIPES[name].config
    config = load_config(schema, name, ["data=d", "out=o", "teacher=t"] if schema is TokenizerTrainConfig
                         else ["data=d", "out=o"])
    save_config(config, tmp_path / "saved.yaml")
    assert (tmp_path / "saved.yaml").read_text().startswith(f"recipe: {RECIPES[name].kind}\n")
    assert load_config(schema, tmp_path / "saved.yaml") == config


@pytest.mark.parametrize("name, kind", [("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_configs_parse(name, kind):
    import yaml

    from training.config import CONFIG_DIR

    path = CONFIG_DIR / "accelerate" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#") and "accelerate launch --config_file" in text
    config = yaml.safe_load(text)
    assert config["distributed_type"] == kind
    assert config["mixed_precision"] == "bf16" and config["num_processes"] >= 1
    # and accelerate itself reads it (what `accelerate launch --config_file` does first)
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(path)).distributed_type.value == kind
