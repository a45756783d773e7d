"""The `chat` recipe trains on LLaVA-style conversations (`mllm data convert-llava` output: task chat only);
a recipe whose other tasks the data lacks says so in one line, once; a wrong --data is named before the
model loads; a LoRA / QLoRA run warns of nothing deprecated."""

import json
import warnings

import pytest

from training.recipes import load_recipe, run_recipe


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(model folder, shards converted from LLaVA JSON: 6 multi-turn chats about shapes scenes)."""
    from mllm.data.llava import convert_llava, write_llava
    from mllm.data.samples import caption_qa_chat
    from mllm.data.shapes import iter_samples
    from mllm.init import init_model

    root = tmp_path_factory.mktemp("chat_recipe")
    model_dir = init_model("tiny", "tiny", root / "model", seed=0)
    chats = [caption_qa_chat(s["key"], s["image"], s["caption"], s["qa"]) for s in iter_samples(6, size=32)]
    json_path = write_llava(chats, root / "llava", progress=False)
    convert_llava(json_path, root / "llava", root / "shards", progress=False)
    return model_dir, root / "shards"


def _overrides(llava, out, **extra):
    model_dir, data = llava
    values = {"model": model_dir, "data": data, "out": out, "per_device_batch_size": 2, "precision": "fp32",
              "logging_steps": 1, "save_steps": 100, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def _deprecations(caught) -> list[str]:
    return [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
            if issubclass(w.category, (FutureWarning, DeprecationWarning))]


def test_the_chat_recipe_is_chat_only_lora():
    _, cfg = load_recipe("chat", ["model=m", "data=d", "out=o"])
    assert cfg.tasks == {"chat": 1.0}
    assert cfg.lora is not None and cfg.quantization is None and not cfg.freeze_llm


def test_the_chat_recipe_trains_on_converted_llava_data_without_notes_or_deprecations(llava, tmp_path, capsys):
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = run_recipe("chat", _overrides(llava, out), max_steps=3)
    assert _deprecations(caught) == []
    assert final == out / "adapter" and (final / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["label_tokens_chat"] > 0 and r["loss_chat"] == pytest.approx(r["loss"]) for r in records)
    printed = capsys.readouterr().out
    assert "samples in" not in printed and "12 examples {'chat': 12}" in printed  # 3 steps x 2 x 2 accumulated


def test_missing_tasks_are_one_line_once(llava, capsys, monkeypatch):
    from training.components import load_task_pools

    _, cfg = load_recipe("sft", ["model=m", f"data={llava[1]}", "out=o"])
    pools = load_task_pools(cfg.data, cfg.tasks)
    assert sorted(pools) == ["chat"] and len(pools["chat"]) == 6
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == [(f"note: no vqa or t2i samples in {llava[1]}; training on chat only (recipe `chat` is made "
                     "for conversation data)")]
    monkeypatch.setenv("RANK", "1")  # another process of the same run: silent
    load_task_pools(cfg.data, cfg.tasks)
    assert capsys.readouterr().out == ""


def test_no_sample_of_any_task_names_the_recipe_to_use(llava):
    from training.components import load_task_pools

    with pytest.raises(ValueError, match="holds no samples of the tasks \\['vqa', 't2i'\\].*--recipe chat"):
        load_task_pools(str(llava[1]), {"vqa": 1.0, "t2i": 0.5})


def test_a_data_folder_that_does_not_exist_is_named_before_the_model_loads(llava, tmp_path, monkeypatch):
    from mllm.model import UnifiedMLLM

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(UnifiedMLLM, "from_pretrained", refuse)
    with pytest.raises(FileNotFoundError, match="data /nope does not exist"):
        run_recipe("chat", _overrides(llava, tmp_path / "run", data="/nope"), max_steps=1)


def test_a_4bit_base_with_lora_warns_of_nothing_deprecated(llava):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    from mllm.lora import LoraSettings, add_lora, load_base_4bit

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_base_4bit(llava[0])
        add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    assert _deprecations(caught) == []
    assert model.llm.base_model.model.is_activation_checkpointing  # turned on through the current API
