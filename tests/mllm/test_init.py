"""`mllm init`: folder layout, named and base LLMs (Llama, Qwen2), new-row initialisation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mllm.cli import main as mllm_main
from mllm.config import MLLMConfig, padded_vocab_size
from mllm.init import init_model
from mllm.model import UnifiedMLLM


def _run_cli(argv: list[str]) -> int:
    return mllm_main(["init", *argv])


def test_cli_writes_the_model_folder_layout(tmp_path, capsys):
    out = tmp_path / "model"
    assert _run_cli(["--llm", "tiny", "--vision-tokenizer", "tiny", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out

    for name in ("mllm_config.json", "llm/config.json", "llm/model.safetensors", "llm/generation_config.json",
                 "vision_tokenizer/config.json", "vision_tokenizer/model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "projector.safetensors").exists()  # learned mode
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind

    config = MLLMConfig.load(out)
    assert config.embedding_mode == "learned"
    assert config.codebook_size == 64 and config.grid_size == (4, 4)
    assert config.vocab_size == padded_vocab_size(config.image_offset + config.codebook_size)
    assert config.vocab_size % 64 == 0
    assert set(config.versions) >= {"mllm", "torch", "transformers"}

    llm_config = json.loads((out / "llm/config.json").read_text())
    assert llm_config["model_type"] == "llama" and llm_config["vocab_size"] == config.vocab_size
    assert llm_config["tie_word_embeddings"] is False
    generation = json.loads((out / "llm/generation_config.json").read_text())
    assert generation["eos_token_id"] == config.end_of_turn_token_id
    assert generation["pad_token_id"] == config.pad_token_id

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tokenizer) == config.image_offset
    assert tokenizer.chat_template
    assert tokenizer.convert_tokens_to_ids("<|boi|>") == config.boi_token_id
    assert tokenizer.convert_tokens_to_ids("<|end|>") == config.end_of_turn_token_id


def test_llm_folder_alone_gives_the_unified_logits(model_tiny_dir, model_batch):
    model = UnifiedMLLM.from_pretrained(model_tiny_dir)
    batch = model_batch(model)
    assert bool(model.vocab.is_image_id(batch["input_ids"]).any())
    plain = AutoModelForCausalLM.from_pretrained(model_tiny_dir / "llm").eval()
    with torch.no_grad():
        expected = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert got.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _one_step_loss_drop(model, batch) -> tuple[float, float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = model(**batch).loss
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = model(**batch).loss
    return before.item(), after.item()


@pytest.mark.parametrize("base, embedding", [("llama", "learned"), ("qwen2", "learned"), ("qwen2", "codebook")])
def test_base_model_extends_and_trains(base, embedding, request, tmp_path, model_batch):
    base_dir = request.getfixturevalue(f"model_{base}_base")
    out = init_model(base_dir, "tiny", tmp_path / "model", embedding=embedding)
    model = UnifiedMLLM.from_pretrained(out)
    config = model.config
    base_tokenizer = AutoTokenizer.from_pretrained(base_dir)
    assert config.image_offset == len(model.processor.text_tokenizer)
    # train_text_tokenizer already adds the image tokens; the Qwen2-like tokenizer gets them here
    assert config.image_offset == len(base_tokenizer) + {"llama": 0, "qwen2": 3}[base]
    assert model.processor.text_tokenizer.convert_tokens_to_ids("<|boi|>") == config.boi_token_id
    assert config.vocab_size == padded_vocab_size(config.image_offset + 64)
    assert model.llm.get_input_embeddings().weight.shape[0] == config.vocab_size
    assert type(model.llm).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[base]
    if base == "qwen2":
        # The base's ChatML template is kept, and its end-of-turn token is found from it.
        assert config.end_of_turn_token_id == base_tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert model.processor.text_tokenizer.chat_template == base_tokenizer.chat_template
        tied = model.llm.lm_head.weight.data_ptr() == model.llm.model.embed_tokens.weight.data_ptr()
        assert tied == (embedding == "learned")  # codebook mode unties a tied base

    # Rows past the base tokenizer (specials, padding; Qwen2's untrained padding too) start at the mean of
    # the base's rows, input and output side. The image-id rows start from the tokenizer's codebooks
    # (--image-init codebook, the default) at the mean and spread of the base's rows: input side from the
    # projector (codebook mode) or a projection baked in (learned), output side when untied.
    base_llm = AutoModelForCausalLM.from_pretrained(base_dir)
    old = len(base_tokenizer)
    base_input = base_llm.get_input_embeddings().weight[:old].detach()
    base_output = base_llm.get_output_embeddings().weight[:old].detach()
    input_rows = model.llm.get_input_embeddings().weight.detach()
    output_rows = model.llm.get_output_embeddings().weight.detach()
    torch.testing.assert_close(input_rows[:old], base_input, rtol=0, atol=0)
    start, end = model.vocab.image_id_range
    for rows, base_rows in ((input_rows, base_input), (output_rows, base_output)):
        new_rows = torch.cat([rows[old:start], rows[end:]])
        torch.testing.assert_close(new_rows, base_rows.mean(0).expand_as(new_rows))
        image_rows = rows[start:end]
        torch.testing.assert_close(image_rows.mean(0), base_rows.mean(0), atol=1e-4, rtol=0)
        assert image_rows.std().item() == pytest.approx((base_rows - base_rows.mean(0)).std().item(), rel=0.05)
        assert len({tuple(row.tolist()) for row in image_rows}) == end - start  # distinct, not one mean row

    before, after = _one_step_loss_drop(model, model_batch(model))
    assert after < before


def test_codebook_image_init_follows_the_codebooks(tmp_path):
    """Codes whose codebook rows are alike start with alike LLM rows (input and output side), and
    --image-init mean keeps every image row at the mean of the text rows."""
    from mllm.model import codebook_features
    from tokenizer_vision import DualCodebookTokenizer

    vision = DualCodebookTokenizer.from_name("tiny").eval()
    with torch.no_grad():  # make code 1 a near copy of code 0 in both codebooks
        for branch in ("sem", "pix"):
            codebook = vision.quantizer.codebook(branch)
            codebook[1] = codebook[0] + 1e-3 * torch.randn_like(codebook[0])
    model = UnifiedMLLM.from_pretrained(init_model("tiny", vision, tmp_path / "codebook"))
    start, end = model.vocab.image_id_range
    features = codebook_features(model.vision_tokenizer, torch.arange(end - start)).detach()
    feature_similarity = torch.nn.functional.cosine_similarity(features[:, None], features[None], dim=-1)
    for matrix in (model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight):
        rows = matrix[start:end].detach()
        rows = rows - rows.mean(0)
        row_similarity = torch.nn.functional.cosine_similarity(rows[:, None], rows[None], dim=-1)
        assert row_similarity[0, 1] > 0.99
        assert row_similarity[0, 2:].abs().max() < 0.99
        # similarity in codebook space carries over to the rows
        upper = torch.triu_indices(end - start, end - start, 1)
        pairs = torch.stack([feature_similarity[upper[0], upper[1]], row_similarity[upper[0], upper[1]]])
        assert torch.corrcoef(pairs)[0, 1] > 0.5

    # --image-init mean: a fresh LLM keeps its random rows (a base LLM's would sit at the mean), unrelated to
    # the codebooks; the text rows are the same either way
    mean_model = UnifiedMLLM.from_pretrained(init_model("tiny", vision, tmp_path / "mean", image_init="mean"))
    rows = mean_model.llm.get_input_embeddings().weight[start:end].detach()
    assert torch.nn.functional.cosine_similarity(rows[0] - rows.mean(0), rows[1] - rows.mean(0), dim=0) < 0.9
    torch.testing.assert_close(mean_model.llm.get_input_embeddings().weight[:start],
                               model.llm.get_input_embeddings().weight[:start])
    with pytest.raises(ValueError, match="image_init"):
        init_model("tiny", vision, tmp_path / "bad", image_init="zeros")


def test_codebook_init_projects_at_the_scale_of_the_text_rows(model_codebook_dir):
    model = UnifiedMLLM.from_pretrained(model_codebook_dir)
    assert model.config.embedding_mode == "codebook"
    assert model.config.projector_hidden_size == model.llm.config.hidden_size
    text_rows = model.llm.get_input_embeddings().weight[: model.config.image_offset].detach()
    with torch.no_grad():
        image_rows = model.image_embedding_rows()  # (K, H)
    assert image_rows.shape == (64, model.llm.config.hidden_size)
    torch.testing.assert_close(image_rows.mean(0), text_rows.mean(0), atol=1e-4, rtol=0)
    assert image_rows.std().item() == pytest.approx((text_rows - text_rows.mean(0)).std().item(), rel=0.05)
    # init synced the projected rows into the matrix, so llm/ alone also sees them
    start, end = model.vocab.image_id_range
    torch.testing.assert_close(model.llm.get_input_embeddings().weight[start:end].detach(), image_rows)


def test_init_refuses_to_overwrite_and_names_bad_inputs(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        init_model("tiny", "tiny", out)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="named size"):
        init_model(tmp_path / "no_such_model", "tiny", tmp_path / "other")
    with pytest.raises(ValueError, match="neither a saved tokenizer folder"):
        init_model("tiny", tmp_path / "no_such_tokenizer", tmp_path / "other")
    with pytest.raises(ValueError, match="embedding"):
        init_model("tiny", "tiny", tmp_path / "other", embedding="frozen")


def test_text_corpus_file_trains_the_named_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox number {i} jumps over the lazy dog" for i in range(300)))
    out = init_model("tiny", "tiny", tmp_path / "model", text_corpus=corpus)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tokenizer.tokenize("the quick brown fox")) <= 4  # learned from this corpus
