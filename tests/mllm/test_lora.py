"""mllm/lora.py and `mllm merge`: LoRA training of the LLM with the new vocabulary rows as peft trainable
tokens, adapter save/load (plain peft and UnifiedMLLM), merging into a full model folder, and QLoRA on
the CPU through bitsandbytes."""

from __future__ import annotations

import shutil

import pytest
import torch

from mllm.lora import LoraSettings, add_lora, load_base_4bit, new_token_ids
from mllm.model import UnifiedMLLM
from tokenizer_vision.schema import from_dict

STEPS = 5


def _batch(model) -> dict[str, torch.Tensor]:
    """A caption sample and a drawing sample (image ids in the user turn and in the assistant turn), as
    conftest's `model_batch` builds them (that fixture is function-scoped; the trained model here is not)."""
    from mllm.data.shapes import caption, make_scene, render

    size = model.config.image_size
    scenes = [make_scene(seed) for seed in (3, 4)]
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": render(scenes[0], size)},
                    {"type": "text", "text": "Describe the image."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": caption(scenes[0])}]},
        ],
        [
            {"role": "user", "content": [{"type": "text", "text": f"Draw: {caption(scenes[1])}"}]},
            {"role": "assistant", "content": [{"type": "image", "image": render(scenes[1], size)}]},
        ],
    ]
    return dict(model.processor(conversations))


@pytest.fixture(scope="module")
def trained(model_tiny_dir, tmp_path_factory):
    """A tiny model with LoRA trained STEPS steps on one repeated batch, its adapter saved."""
    torch.manual_seed(0)
    model = UnifiedMLLM.from_pretrained(model_tiny_dir)
    batch = _batch(model)
    embed_before = model.llm.get_input_embeddings().weight.detach().clone()
    head_before = model.llm.get_output_embeddings().weight.detach().clone()
    peft_model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    adapter = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(adapter)
    return {
        "model": model,
        "batch": batch,
        "losses": losses,
        "logits": logits,
        "adapter": adapter,
        "embed_before": embed_before,
        "head_before": head_before,
    }


def test_settings_validate():
    assert LoraSettings().target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="all-linear"):
        LoraSettings(target_modules="q_proj")
    # A recipe's `lora:` section is parsed by the schema, which refuses unknown keys and coerces types.
    with pytest.raises(ValueError, match="unknown LoRA settings key 'rank'"):
        from_dict(LoraSettings, {"rank": 4}, where="LoRA settings")
    assert from_dict(LoraSettings, {"r": 8, "target_modules": "all-linear"}) == LoraSettings(
        r=8, target_modules="all-linear")


def test_new_token_ids_are_the_added_specials_and_image_ids(model_tiny_dir):
    model = UnifiedMLLM.from_pretrained(model_tiny_dir)
    config, tokenizer = model.config, model.processor.text_tokenizer
    ids = new_token_ids(model)
    # The tiny text tokenizer has no chat template, so init added the chat tokens before the image ones.
    assert tokenizer.convert_ids_to_tokens(ids[:4]) == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert {
        config.boi_token_id,
        config.eoi_token_id,
        config.image_token_id,
        config.end_of_turn_token_id,
    } <= set(ids)
    assert ids[-1] == config.image_offset + config.codebook_size - 1
    assert ids == list(range(ids[0], ids[-1] + 1))
    assert tokenizer.convert_ids_to_tokens(ids[0] - 1) not in ("<|system|>", "<|boi|>")


def test_only_lora_and_new_rows_train(trained):
    model = trained["model"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "trainable_tokens_delta" in name for name in trainable)
    deltas = [name for name in trainable if "trainable_tokens_delta" in name]
    assert len(deltas) == 2  # the input embedding and the (untied) LM head
    assert any("lm_head" in name for name in deltas)


def test_loss_decreases(trained):
    losses = trained["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


def test_adapter_files_and_plain_peft_load(trained, model_tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = trained["adapter"]
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    llm = AutoModelForCausalLM.from_pretrained(model_tiny_dir / "llm", local_files_only=True)
    llm = PeftModel.from_pretrained(llm, adapter).eval()
    batch = trained["batch"]
    with torch.no_grad():
        logits = llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, trained["logits"], atol=1e-6, rtol=0)


def test_unified_load_with_adapter_and_new_rows_restored(trained, model_tiny_dir):
    model = UnifiedMLLM.from_pretrained(model_tiny_dir, adapter=trained["adapter"])
    with torch.no_grad():
        logits = model(**trained["batch"]).logits
    torch.testing.assert_close(logits, trained["logits"], atol=1e-6, rtol=0)

    # The new rows (image ids included) were updated by training, in the loaded model as in memory;
    # the base's own rows were not.
    ids = torch.tensor(new_token_ids(model))
    image_ids = torch.arange(*model.vocab.image_id_range)
    embedding = model.llm.get_input_embeddings()
    loaded_rows = (
        embedding.token_adapter.get_merged_weights(["default"])
        if hasattr(embedding, "token_adapter")
        else None
    )
    assert loaded_rows is not None
    trained_rows = trained["model"].llm.get_input_embeddings().token_adapter.get_merged_weights(["default"])
    torch.testing.assert_close(loaded_rows, trained_rows, atol=0, rtol=0)
    changed = (loaded_rows - trained["embed_before"]).abs().sum(1) > 0  # (V,)
    assert bool(changed[image_ids].all())
    assert set(changed.nonzero().flatten().tolist()) <= set(ids.tolist())


def test_merge_command(trained, model_tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from mllm.cli import main

    out = tmp_path / "merged"
    assert (
        main(
            ["merge", "--base", str(model_tiny_dir), "--adapter", str(trained["adapter"]), "--out", str(out)]
        )
        == 0
    )
    batch = trained["batch"]
    merged = UnifiedMLLM.from_pretrained(out)
    with torch.no_grad():
        logits = merged(**batch).logits
    torch.testing.assert_close(logits, trained["logits"], atol=1e-5, rtol=0)

    # llm/ alone is a plain HF causal LM carrying the trained rows, input side and output side.
    llm = AutoModelForCausalLM.from_pretrained(out / "llm", local_files_only=True).eval()
    assert type(llm).__module__.startswith("transformers.")
    with torch.no_grad():
        plain = llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(plain, trained["logits"], atol=1e-5, rtol=0)
    image_ids = torch.arange(*merged.vocab.image_id_range)
    for weight, before in (
        (llm.get_input_embeddings().weight, trained["embed_before"]),
        (llm.get_output_embeddings().weight, trained["head_before"]),
    ):
        assert bool(((weight - before).abs().sum(1) > 0)[image_ids].all())
        torch.testing.assert_close(weight[: new_token_ids(merged)[0]], before[: new_token_ids(merged)[0]])


def test_merge_errors(trained, model_tiny_dir, tmp_path, capsys):
    from mllm.cli import main

    adapter = str(trained["adapter"])
    assert (
        main(["merge", "--base", str(tmp_path / "nope"), "--adapter", adapter, "--out", str(tmp_path / "o")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "merge",
                "--base",
                str(model_tiny_dir),
                "--adapter",
                str(model_tiny_dir),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "not a peft adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_codebook_mode_trains_only_output_rows_of_image_ids(model_codebook_dir):
    model = UnifiedMLLM.from_pretrained(model_codebook_dir)
    add_lora(model, LoraSettings(r=2))
    embedding = model.llm.get_input_embeddings().token_adapter.token_indices["default"]
    head = model.llm.get_output_embeddings().token_adapter.token_indices["default"]
    assert max(embedding) < model.config.image_offset
    assert head[-1] == model.config.image_offset + model.config.codebook_size - 1


def test_qlora_4bit_step_on_cpu(model_tiny_dir, model_batch, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install 'mllm[quant]')")
    import bitsandbytes as bnb

    base = tmp_path / "base"
    shutil.copytree(model_tiny_dir, base)
    torch.manual_seed(0)
    model = load_base_4bit(base)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.llm.modules())
    add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    batch = model_batch(model)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    losses = []
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[1] < losses[0]
    # Every LoRA B matrix starts at zero; after the steps all trainable tensors have moved.
    assert all(not torch.equal(b, p) for b, p in zip(before, parameters))


def test_load_base_4bit_rejects_a_non_model_folder(tmp_path):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_base_4bit(tmp_path)


def test_tied_base_trains_new_rows_through_the_shared_matrix(model_qwen2_base, tmp_path):
    """A Qwen2-like base (tied head, its own ChatML tokens): only <|boi|> <|eoi|> <|image|> and the image ids
    are new; peft ties the head to the embedding's trainable tokens, and the merge keeps the tie."""
    from mllm.init import init_model
    from mllm.merge import merge_adapter

    base = init_model(model_qwen2_base, "tiny", tmp_path / "base", seed=0)
    model = UnifiedMLLM.from_pretrained(base)
    ids = new_token_ids(model)
    assert model.processor.text_tokenizer.convert_ids_to_tokens(ids[:3]) == [
        "<|boi|>",
        "<|eoi|>",
        "<|image|>",
    ]
    torch.manual_seed(0)
    add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    deltas = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    assert len(deltas) == 1 and "embed_tokens" in deltas[0]
    batch = _batch(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    model.llm.save_pretrained(tmp_path / "adapter")
    merged = UnifiedMLLM.from_pretrained(merge_adapter(base, tmp_path / "adapter", tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, logits, atol=1e-5, rtol=0)
    llm = merged.llm
    assert llm.get_output_embeddings().weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()


def test_no_warning_about_an_optional_4bit_kernel():
    """bitsandbytes warns at import that it cannot fetch an optional CPU kernel; importing `mllm` first (as
    every entry point does) keeps that line out of `train` and `merge`."""
    pytest.importorskip("bitsandbytes")
    import subprocess
    import sys

    code = "import mllm, bitsandbytes, peft"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "gemm_4bit_forward" not in result.stderr and "kernels" not in result.stderr


def test_missing_bitsandbytes_is_one_line_with_the_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    from mllm.lora import load_base_4bit

    monkeypatch.setattr(builtins, "__import__", without_bitsandbytes)
    with pytest.raises(ValueError, match=r"needs bitsandbytes.*pip install 'bitsandbytes>=0.48'"):
        load_base_4bit("/nonexistent")
