"""UnifiedMLLM: forward, save/load round trips, codebook mode (bake, sync, gradients), peft adapters."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from mllm.config import MLLMConfig
from mllm.model import UnifiedMLLM
from tokenizer_vision import DualCodebookTokenizer


def _load(model_dir, **kwargs) -> UnifiedMLLM:
    # On the CPU: from_pretrained's default device is CUDA where there is one, while these tests compare with
    # plain transformers models and batches on the CPU.
    kwargs.setdefault("device", "cpu")
    return UnifiedMLLM.from_pretrained(model_dir, **kwargs)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_properties_and_learned_embeddings(model_tiny_dir, model_batch):
    model = _load(model_tiny_dir)
    assert not model.training and not model.vision_tokenizer.training
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.context_length == 512  # LLM_SIZES["tiny"]["max_position_embeddings"]
    assert model.projector is None and model.config.embedding_mode == "learned"
    assert model.num_parameters() == sum(p.numel() for p in model.llm.parameters())
    assert model.num_parameters(include_vision_tokenizer=True) > model.num_parameters()
    assert model.llm.config._attn_implementation == "sdpa"
    batch = model_batch(model)
    with torch.no_grad():
        embedded = model.embed_ids(batch["input_ids"])
    torch.testing.assert_close(embedded, model.llm.get_input_embeddings()(batch["input_ids"]))
    model.train()
    assert model.llm.training and not model.vision_tokenizer.training  # the tokenizer is left alone


def test_forward_loss_is_the_llm_loss(model_tiny_dir, model_batch):
    model = _load(model_tiny_dir)
    batch = model_batch(model)
    assert (batch["labels"] != -100).any()
    output = model(**batch)
    logits = output.logits[:, :-1].flatten(0, 1)
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/device_check.sh runs it there)")
def test_the_default_device_is_cuda_where_there_is_one_with_the_cpu_logits(model_tiny_dir, model_batch):
    model = UnifiedMLLM.from_pretrained(model_tiny_dir)
    assert model.device.type == "cuda" and next(model.vision_tokenizer.parameters()).device.type == "cuda"
    cpu = _load(model_tiny_dir)
    batch = model_batch(cpu)
    on_gpu = {key: value.to(model.device) for key, value in batch.items()}
    with torch.no_grad():
        logits = model(on_gpu["input_ids"], attention_mask=on_gpu["attention_mask"]).logits
    torch.testing.assert_close(logits.cpu(), _logits(cpu, batch), atol=2e-3, rtol=2e-3)


def test_learned_round_trip_gives_identical_logits(model_tiny_dir, model_batch, tmp_path):
    model = _load(model_tiny_dir)
    batch = model_batch(model)
    with torch.no_grad():  # make the saved weights differ from the initial ones
        model.llm.get_input_embeddings().weight[model.config.image_offset :] += 0.5
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path / "copy")
    loaded = _load(tmp_path / "copy")
    assert loaded.config.to_dict() == MLLMConfig.load(tmp_path / "copy").to_dict()
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=0, atol=0)
    # and a save over an existing model folder replaces it
    loaded.save_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_codebook_round_trip_gives_identical_logits(model_codebook_dir, model_batch, tmp_path):
    model = _load(model_codebook_dir)
    assert model.projector is not None
    with torch.no_grad():
        model.projector.fc2.bias += 0.1
    batch = model_batch(model)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path / "copy", bake=False)
    assert model.config.embedding_mode == "codebook"
    assert (tmp_path / "copy" / "projector.safetensors").is_file()
    loaded = _load(tmp_path / "copy")
    assert loaded.config.embedding_mode == "codebook"
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=0, atol=0)


def test_codebook_embeddings_use_the_projector_not_the_rows(model_codebook_dir, model_batch):
    model = _load(model_codebook_dir)
    batch = model_batch(model)
    with torch.no_grad():
        model.projector.fc2.bias += 1.0  # the matrix rows are now stale
        embedded = model.embed_ids(batch["input_ids"])
        image = model.vocab.is_image_id(batch["input_ids"])
        codes = model.vocab.ids_to_codes(batch["input_ids"][image])
        torch.testing.assert_close(embedded[image], model.image_embedding_rows()[codes])
        torch.testing.assert_close(embedded[~image], model.llm.get_input_embeddings()(batch["input_ids"])[~image])
        stale = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert not torch.allclose(stale, _logits(model, batch))
        model.sync_image_embeddings()  # id-based paths (generate with a KV cache) now agree
        synced = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert model.config.embedding_mode == "codebook" and model.projector is not None
    torch.testing.assert_close(synced, _logits(model, batch))


def test_bake_keeps_logits_and_the_baked_llm_alone_reproduces_them(model_codebook_dir, model_batch, tmp_path):
    model = _load(model_codebook_dir)
    with torch.no_grad():
        model.projector.fc2.bias += 1.0
    batch = model_batch(model)
    expected = _logits(model, batch)

    model.save_pretrained(tmp_path / "baked")  # bake=True by default; the model in memory keeps its mode
    assert model.config.embedding_mode == "codebook"
    assert not (tmp_path / "baked" / "projector.safetensors").exists()
    assert MLLMConfig.load(tmp_path / "baked").embedding_mode == "learned"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "baked" / "llm").eval()
    with torch.no_grad():
        alone = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(alone, expected)
    torch.testing.assert_close(_logits(_load(tmp_path / "baked"), batch), expected)

    model.bake()
    assert model.config.embedding_mode == "learned" and model.projector is None
    torch.testing.assert_close(_logits(model, batch), expected)


def test_codebook_gradient_reaches_projector_and_codebooks(model_codebook_dir, model_batch):
    vision_tokenizer = DualCodebookTokenizer.from_pretrained(
        model_codebook_dir / "vision_tokenizer", codebook_update="loss"
    )
    model = _load(model_codebook_dir, vision_tokenizer=vision_tokenizer)
    assert model.vision_tokenizer is vision_tokenizer
    batch = model_batch(model)
    embedded = model.embed_ids(batch["input_ids"])
    embedded.pow(2).sum().backward()
    for parameter in (model.projector.fc1.weight, model.projector.fc2.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    used = model.vocab.ids_to_codes(batch["input_ids"][model.vocab.is_image_id(batch["input_ids"])]).unique()
    for codebook in (vision_tokenizer.quantizer.codebook_sem, vision_tokenizer.quantizer.codebook_pix):
        assert codebook.grad is not None
        assert (codebook.grad[used].abs().sum(-1) > 0).all()  # every code in the batch gets a gradient
        unused = torch.ones(64, dtype=torch.bool)
        unused[used] = False
        assert codebook.grad[unused].abs().sum() == 0

    model.zero_grad(set_to_none=True)
    vision_tokenizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()  # the LM loss, too
    assert model.projector.fc1.weight.grad.abs().sum() > 0
    assert vision_tokenizer.quantizer.codebook_sem.grad.abs().sum() > 0


def test_peft_adapter_loads_with_identical_logits(model_tiny_dir, model_batch, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = _load(model_tiny_dir)
    batch = model_batch(model)
    base_logits = _logits(model, batch)
    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the adapter visibly changes the logits
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model.llm = get_peft_model(model.llm, lora)
    expected = _logits(model, batch)
    assert not torch.allclose(expected, base_logits)
    model.llm.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="peft adapter"):
        model.save_pretrained(tmp_path / "full")

    loaded = _load(model_tiny_dir, adapter=tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=0, atol=0)
    assert loaded.num_parameters() > model.num_parameters() - 1  # the adapter's weights are counted

    loaded.merge_adapter()
    torch.testing.assert_close(_logits(loaded, batch), expected)
    loaded.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "llm").eval()
    with torch.no_grad():
        merged = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(merged, expected)

    with pytest.raises(ValueError, match="not a peft adapter folder"):
        _load(model_tiny_dir, adapter=model_tiny_dir)


def test_loading_options_and_errors(model_tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="flash_attention_2"):
        _load(model_tiny_dir, attn_implementation="flash_attention_2", dtype="bf16")
    with pytest.raises(ValueError, match="attn_implementation"):
        _load(model_tiny_dir, attn_implementation="xformers")
    with pytest.raises(ValueError, match="dtype"):
        _load(model_tiny_dir, dtype="fp8")
    with pytest.raises(FileNotFoundError, match="mllm init"):
        _load(tmp_path)
    model = _load(model_tiny_dir, dtype="bf16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.vision_tokenizer.dtype == torch.float32
    assert model.llm.config._attn_implementation == "eager"


def test_a_failed_save_leaves_no_folder_and_keeps_the_old_one(model_tiny_dir, tmp_path, monkeypatch):
    model = _load(model_tiny_dir)

    def fail(directory):
        raise OSError("disk full")

    monkeypatch.setattr(model.vision_tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path) == []

    monkeypatch.undo()
    model.save_pretrained(tmp_path / "old")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "old").rglob("*"))
    monkeypatch.setattr(model.vision_tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "old")
    assert os.listdir(tmp_path) == ["old"]
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "old").rglob("*")) == before

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="not a model folder"):
        model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
