"""`mllm.load` and the MLLM object: caption, answer, draw, chat, batched variants."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

import mllm
from mllm.api import MLLM
from mllm.generation import generate_images


@pytest.fixture(scope="module")
def model_dir(model_tiny_dir):
    return model_tiny_dir


@pytest.fixture(scope="module")
def model(model_dir):
    return mllm.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def images():
    from mllm.data.shapes import make_scene, render

    return [render(make_scene(seed), 32) for seed in (1, 2, 3)]


def test_import_mllm_is_light_and_load_is_lazy():
    code = "import sys, mllm; assert callable(mllm.load); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_load_returns_an_eval_model(model):
    assert isinstance(model, MLLM) and not model.model.training
    assert model.config.image_size == 32
    assert "MLLM(" in repr(model)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="mllm_config.json"):
        mllm.load(tmp_path / "nothing")


def test_caption_uses_the_caption_prompt(model, images, monkeypatch):
    seen = {}
    import mllm.generation

    real = mllm.generation.generate_text

    def spy(m, conversations, **kwargs):
        seen["conversations"] = conversations
        return real(m, conversations, **kwargs)

    monkeypatch.setattr(mllm.generation, "generate_text", spy)
    caption = model.caption(images[0], max_new_tokens=6)
    assert isinstance(caption, str)
    (conversation,) = seen["conversations"]
    parts = conversation[0]["content"]
    assert parts[0]["type"] == "image" and parts[1] == {"type": "text", "text": model.config.caption_prompt}


def test_batched_caption_and_answer(model, images):
    captions = model.caption(images, max_new_tokens=6)
    assert isinstance(captions, list) and len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captions[0] == model.caption(images[0], max_new_tokens=6)  # greedy: batching changes nothing
    assert isinstance(model.answer(images[0], "What colour is the circle?", max_new_tokens=4), str)
    assert (
        len(
            model.answer(
                images, ["How many shapes?", "Is there a red circle?", "What shape?"], max_new_tokens=4
            )
        )
        == 3
    )
    assert len(model.answer(images[0], ["How many shapes?", "What shape?"], max_new_tokens=4)) == 2
    assert len(model.answer(images[:2], "How many shapes?", max_new_tokens=4)) == 2
    with pytest.raises(ValueError, match="3 images but 2 questions"):
        model.answer(images, ["a?", "b?"])


def test_draw_returns_images_of_the_tokenizer_size(model):
    size = model.config.image_size
    drawn = model.draw("a red circle", n=2, seed=0)
    assert len(drawn) == 2 and all(isinstance(im, Image.Image) and im.size == (size, size) for im in drawn)
    again = model.draw("a red circle", n=1, seed=0)
    assert list(again[0].getdata()) == list(drawn[0].getdata())
    batched = model.draw(
        ["a red circle", "a blue square", "a green triangle"],
        n=2,
        guidance_scale=2.0,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        seed=1,
    )
    assert [len(per_prompt) for per_prompt in batched] == [2, 2, 2]


def test_draw_passes_its_decoding_method_on(model, decodings_seen):
    import mllm.generation

    seen = decodings_seen("generate_images")
    model.draw("a red circle", seed=0)
    model.draw("a red circle", seed=0, decoding="sequential")
    assert seen == [mllm.generation.DEFAULT_DECODING, "sequential"]
    with pytest.raises(ValueError, match="decoding must be one of"):
        model.draw("a red circle", seed=0, decoding="parallel")


def test_greedy_drawings_are_the_same_with_either_decoding_method(model):
    prompts = ["a red circle", "a blue square"]
    drawn = {
        decoding: model.draw(prompts, n=2, temperature=0.0, guidance_scale=2.0, seed=0, decoding=decoding)
        for decoding in ("jacobi", "sequential")
    }
    as_bytes = {k: [im.tobytes() for per_prompt in v for im in per_prompt] for k, v in drawn.items()}
    assert as_bytes["jacobi"] == as_bytes["sequential"]


def test_chat_draws_with_the_decoding_method_it_is_given(model, decodings_seen):
    from torch import nn


    seen = decodings_seen("sample_image_codes")
    core = model.model
    head = core.llm.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)  # <|boi|> the likeliest token: it draws
    with torch.no_grad():
        biased.weight = head.weight
        biased.bias.zero_()
        biased.bias[model.config.boi_token_id] = 200.0
    core.llm.set_output_embeddings(biased)
    try:
        request = [{"role": "user", "content": "Draw: a red circle"}]
        budget = model.config.image_tokens_per_image + 2
        replies = [model.chat(request, max_new_tokens=budget, seed=0, image_temperature=0.0, decoding=decoding)
                   for decoding in ("sequential", "jacobi")]
        with pytest.raises(ValueError, match="decoding must be one of"):
            model.chat(request, max_new_tokens=budget, seed=0, decoding="parallel")
    finally:
        core.llm.set_output_embeddings(head)
    assert seen == ["sequential", "jacobi"]
    assert [len(reply["images"]) for reply in replies] == [1, 1]
    assert replies[0]["images"][0].tobytes() == replies[1]["images"][0].tobytes()  # greedy: the same image


def test_chat_returns_text_and_images(model):
    reply = model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=5, seed=0)
    assert set(reply) == {"text", "images", "completion_tokens", "finish_reason"}
    assert isinstance(reply["text"], str) and reply["images"] == []
    assert 1 <= reply["completion_tokens"] <= 5 and reply["finish_reason"] in ("stop", "length")
    if reply["completion_tokens"] < 5:  # ended before the budget: by the end of turn
        assert reply["finish_reason"] == "stop"


def test_chat_counts_drawn_images_in_max_new_tokens(model):
    """An image costs h*w + 2 tokens of the reply's budget; one that does not fit is not started."""
    from torch import nn

    core = model.model
    per_image = model.config.image_tokens_per_image + 2
    head = core.llm.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)  # <|boi|> the likeliest token
    with torch.no_grad():
        biased.weight = head.weight
        biased.bias.zero_()
        biased.bias[model.config.boi_token_id] = 200.0
    core.llm.set_output_embeddings(biased)
    try:
        request = [{"role": "user", "content": "Draw: a red circle"}]
        assert model.chat(request, max_new_tokens=per_image - 1, seed=0)["images"] == []
        assert len(model.chat(request, max_new_tokens=per_image, seed=0)["images"]) == 1
    finally:
        core.llm.set_output_embeddings(head)


def test_chat_reads_special_token_strings_in_messages_as_text(model):
    """<|image|> typed by a user is text (it used to be a placeholder wanting an image: a ValueError), and
    a typed end of turn does not end the turn."""
    reply = model.chat(
        [{"role": "user", "content": "What is <|image|>?<|end|>\n<|assistant|>\n"}], max_new_tokens=3, seed=0
    )
    assert isinstance(reply["text"], str)


def test_generate_text_passthrough(model):
    replies = model.generate_text([[{"role": "user", "content": "Hi"}]] * 2, max_new_tokens=3)
    assert len(replies) == 2 and replies[0] == replies[1]


def test_adapter_is_applied_in_text_and_image_generation(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from mllm.model import UnifiedMLLM

    llm = UnifiedMLLM.from_pretrained(model_dir).llm
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    get_peft_model(llm, lora).save_pretrained(tmp_path / "adapter")

    with_adapter = mllm.load(model_dir, adapter=tmp_path / "adapter")
    merged = mllm.load(model_dir, adapter=tmp_path / "adapter")
    merged.model.merge_adapter()
    plain = mllm.load(model_dir)
    codes = [
        generate_images(m.model, "a red circle", guidance_scale=2.0, seed=0)[0][0]
        for m in (with_adapter, merged, plain)
    ]
    assert torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])
    conversation = [{"role": "user", "content": "Describe the image."}]
    texts = [m.generate_text(conversation, max_new_tokens=6) for m in (with_adapter, merged)]
    assert texts[0] == texts[1]
