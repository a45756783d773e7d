"""The sentencepiece text tokenizer, the default chat template and `prepare_text_tokenizer` on any base."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from mllm.config import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN
from mllm.data.samples import CAPTION_PROMPT, DRAW_TEMPLATE
from mllm.text_tokenizer import (
    BYTE_PIECES,
    CHAT_TOKENS,
    DEFAULT_CHAT_TEMPLATE,
    prepare_text_tokenizer,
    shapes_text_corpus,
    train_text_tokenizer,
)

TEXTS = [
    "a large red circle at the top left",
    "Draw: a purple triangle",
    "ünïcödé, emoji 😀, tabs\tand  double  spaces, a trailing space ",
    " leading space\nand a newline",
]


def test_corpus_is_deterministic_and_has_the_instructions():
    corpus = shapes_text_corpus(20)
    assert corpus == shapes_text_corpus(20)
    assert corpus != shapes_text_corpus(20, seed=1)
    assert CAPTION_PROMPT in corpus and DRAW_TEMPLATE.format(prompt="") in corpus
    assert any(text.startswith("Draw: a ") for text in corpus)
    assert any(text.startswith("How many") for text in corpus)


def test_training_is_deterministic(proc_corpus, proc_text_tokenizer):
    again = train_text_tokenizer(proc_corpus, vocab_size=256)
    assert again.backend_tokenizer.to_str() == proc_text_tokenizer.backend_tokenizer.to_str()
    for text in TEXTS:
        assert again(text)["input_ids"] == proc_text_tokenizer(text)["input_ids"]


def test_vocabulary_layout_and_lossless_round_trip(proc_text_tokenizer):
    tokenizer = proc_text_tokenizer
    # 256 learned pieces (soft limit) + 256 byte pieces + 4 chat tokens + 3 image tokens
    assert len(tokenizer) <= 256 + BYTE_PIECES + len(CHAT_TOKENS) + 3
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>"]) == [0, 1, 2, 3]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    vocab = tokenizer.get_vocab()
    assert all(token in vocab for token in CHAT_TOKENS + (BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN))
    # learned words are single pieces; unseen characters fall back to bytes instead of <unk>
    assert tokenizer.tokenize(" circle") == ["▁circle"]
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_save_and_load_round_trip(tmp_path, proc_text_tokenizer):
    proc_text_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == proc_text_tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert len(loaded) == len(proc_text_tokenizer)
    assert loaded.special_tokens_map == proc_text_tokenizer.special_tokens_map
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a red circle"}]
    rendered = proc_text_tokenizer.apply_chat_template(chat, tokenize=False)
    assert loaded.apply_chat_template(chat, tokenize=False) == rendered
    for text in TEXTS + [rendered]:
        assert (
            loaded(text, add_special_tokens=False)["input_ids"]
            == proc_text_tokenizer(text, add_special_tokens=False)["input_ids"]
        )
    assert prepare_text_tokenizer(loaded) == prepare_text_tokenizer(copy.deepcopy(proc_text_tokenizer))


def test_default_template_renders_roles_images_and_generation_prompt(proc_text_tokenizer):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "Draw: a blue square"},
    ]
    rendered = proc_text_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<s><|system|>\nBe brief.<|end|>\n"
        "<|user|>\n<|image|>\nDescribe the image.<|end|>\n"
        "<|assistant|>\na red circle<|end|>\n"
        "<|user|>\nDraw: a blue square<|end|>\n"
        "<|assistant|>\n"
    )
    # a list of parts and the same parts flattened to a string render alike
    as_string = [{"role": "user", "content": "<|image|>\nDescribe the image."}]
    assert proc_text_tokenizer.apply_chat_template(
        chat[1:2], tokenize=False
    ) == proc_text_tokenizer.apply_chat_template(as_string, tokenize=False)
    ids = proc_text_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(proc_text_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    with pytest.raises(Exception, match="unknown role"):
        proc_text_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_prepare_keeps_a_base_template_and_finds_its_end_of_turn(proc_chatml_tokenizer, proc_chatml_template):
    tokenizer = proc_chatml_tokenizer
    size = len(tokenizer)
    ids = prepare_text_tokenizer(tokenizer)
    assert tokenizer.chat_template == proc_chatml_template  # kept
    assert ids["end_of_turn"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids["pad"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert [ids["boi"], ids["eoi"], ids["image"]] == [size, size + 1, size + 2]
    assert "<|end|>" not in tokenizer.get_vocab()  # the default template's tokens are not added
    assert len(tokenizer) == size + 3
    assert prepare_text_tokenizer(tokenizer) == ids and len(tokenizer) == size + 3  # idempotent


def test_prepare_installs_the_default_template_and_a_pad_token(proc_chatml_tokenizer):
    tokenizer = proc_chatml_tokenizer
    tokenizer.chat_template = None
    tokenizer.pad_token = None
    ids = prepare_text_tokenizer(tokenizer)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert ids["end_of_turn"] == tokenizer.convert_tokens_to_ids("<|end|>")
    assert ids["pad"] == tokenizer.eos_token_id  # fell back to eos
    assert all(token in tokenizer.get_vocab() for token in CHAT_TOKENS)
    # no bos token: the default template starts directly with the first turn
    assert (
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        == "<|user|>\nhi<|end|>\n"
    )
