"""Editing: `mllm.generation.edit_images` and `MLLM.edit` on a tiny unified model (untrained: these tests check
the plumbing, the seeds, the guidance branches and that Jacobi decoding from the source's codes samples what
sequential decoding samples), and the processor's edit conversation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mllm import generation
from mllm.api import MLLM
from mllm.data.shapes import make_scene, render
from mllm.generation import edit_images


@pytest.fixture(scope="module")
def tiny(model_tiny_dir):
    from mllm.model import UnifiedMLLM

    return UnifiedMLLM.from_pretrained(model_tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def scenes(tiny):
    return [render(make_scene(seed), tiny.config.image_size) for seed in (1, 2)]


def test_edit_conversation_and_its_dropped_branches(tiny, scenes):
    processor = tiny.processor
    full = processor.edit_conversation(scenes[0], "make the circle blue")
    assert [part["type"] for part in full[0]["content"]] == ["text", "image"]
    assert full[0]["content"][0]["text"] == "make the circle blue"
    image_only = processor.edit_conversation(scenes[0], "make the circle blue", drop="instruction")
    assert [part["type"] for part in image_only[0]["content"]] == ["image"]
    assert processor.edit_conversation(scenes[0], "x", drop="both") == processor.unconditional_draw_conversation()
    with pytest.raises(ValueError, match="drop must be"):
        processor.edit_conversation(scenes[0], "x", drop="image")


def test_edit_images_shapes_seeds_and_batches(tiny, scenes):
    h, w = tiny.config.grid_size
    kwargs = {"n": 2, "seed": 5, "guidance_scale": 2.0, "decoding": "sequential"}  # "auto" picks by the batch size
    out = edit_images(tiny, scenes, "make the circle blue", **kwargs)
    assert len(out) == 2 and all(len(per) == 2 for per in out)
    assert all(codes.shape == (h, w) and codes.dtype == torch.long for per in out for codes in per)
    assert all(0 <= int(codes.min()) and int(codes.max()) < tiny.config.codebook_size for per in out for codes in per)
    # An image depends on its source, instruction and seed only, not on what shares the batch.
    alone = edit_images(tiny, scenes[1:], ["make the circle blue"], **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(alone[0], out[1]))
    again = edit_images(tiny, scenes, "make the circle blue", **kwargs)
    assert all(torch.equal(a, b) for x, y in zip(out, again) for a, b in zip(x, y))
    # Another seed draws something else (the tiny model's codes are close to uniform).
    other = edit_images(tiny, scenes, "make the circle blue", **{**kwargs, "seed": 6})
    assert not all(torch.equal(a, b) for x, y in zip(out, other) for a, b in zip(x, y))


@pytest.mark.parametrize("guidance", ["instruction", "both"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_greedy_edits_are_the_same_with_jacobi_drafts_from_the_source(tiny, scenes, guidance, scale):
    """The source's codes as first drafts change the passes, never the codes."""
    kwargs = {"guidance_scale": scale, "guidance": guidance, "temperature": 0.0, "seed": 0}
    sequential = edit_images(tiny, scenes, ["make the circle blue", "remove the square"], decoding="sequential",
                             **kwargs)
    jacobi = edit_images(tiny, scenes, ["make the circle blue", "remove the square"], decoding="jacobi", **kwargs)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(sequential, jacobi))


@pytest.mark.parametrize("decoding", ["sequential", "jacobi"])
def test_two_guidances_reduce_to_each_single_guidance_at_its_limits(tiny, scenes, decoding):
    """u + s_I (i - u) + s_T (c - i): with s_I = s_T the image-alone branch cancels (guidance "both" at s_T);
    with s_I = 1 the unconditional one does (guidance "instruction" at s_T). Greedy codes are the same,
    and with other scales something else is drawn."""
    kwargs = {"temperature": 0.0, "seed": 0, "decoding": decoding}
    texts = ["make the circle blue", "remove the square"]

    def edits(**options):
        return [per[0] for per in edit_images(tiny, scenes, texts, **kwargs, **options)]

    both = edits(guidance_scale=3.0, guidance="both")
    instruction = edits(guidance_scale=3.0, guidance="instruction")
    assert all(torch.equal(a, b) for a, b in zip(edits(guidance_scale=3.0, image_guidance_scale=3.0), both))
    assert all(torch.equal(a, b) for a, b in zip(edits(guidance_scale=3.0, image_guidance_scale=1.0), instruction))
    mixed = edits(guidance_scale=3.0, image_guidance_scale=-4.0)
    assert not all(torch.equal(a, b) for a, b in zip(mixed, both))
    assert not all(torch.equal(a, b) for a, b in zip(mixed, instruction))


def test_the_unconditional_rows_follow_the_guidance_mode(tiny, scenes, monkeypatch):
    """guidance "instruction": each row's unconditional prefix is its own image alone; "both": the
    unconditional draw request; the drafts are the source's codes."""
    seen = {}
    real = generation.sample_image_codes

    def spy(model, prefixes, unconditional, *args, **kwargs):
        seen["prefixes"], seen["unconditional"], seen["prior"] = prefixes, unconditional, kwargs.get("prior")
        return real(model, prefixes, unconditional, *args, **kwargs)

    monkeypatch.setattr(generation, "sample_image_codes", spy)
    edit_images(tiny, scenes, "make the circle blue", guidance_scale=2.0, guidance="instruction", seed=0)
    image_token_count = tiny.config.grid_size[0] * tiny.config.grid_size[1]
    assert isinstance(seen["unconditional"], list) and len(seen["unconditional"]) == 2
    codes = tiny.processor.encode_images(scenes) + tiny.config.image_offset
    for prefix, unconditional, source in zip(seen["prefixes"], seen["unconditional"], codes):
        # The image's codes are in both rows; the unconditional row lacks the instruction's tokens.
        assert len(unconditional) < len(prefix)
        for row in (prefix, unconditional):
            assert int((row >= tiny.config.image_offset).sum()) == image_token_count
            assert torch.equal(row[row >= tiny.config.image_offset], source.reshape(-1))
    assert torch.equal(seen["prior"], tiny.processor.encode_images(scenes))
    edit_images(tiny, scenes, "make the circle blue", guidance_scale=2.0, guidance="both", seed=0)
    draw = generation._draw_prefixes(tiny, [tiny.processor.unconditional_draw_conversation()])[0]
    assert torch.equal(seen["unconditional"], draw)


def test_an_edit_without_a_scale_uses_the_models_own(tiny, scenes, monkeypatch):
    """guidance_scale None (the default of MLLM.edit and edit_images): the model's `edit_guidance_scale`; 1 runs
    the conditional rows alone."""
    from mllm.config import EDIT_GUIDANCE_SCALE

    scales = []
    real = generation.sample_image_codes

    def spy(model, prefixes, unconditional, guidance_scale, *args, **kwargs):
        scales.append((guidance_scale, unconditional is not None))
        return real(model, prefixes, unconditional, guidance_scale, *args, **kwargs)

    monkeypatch.setattr(generation, "sample_image_codes", spy)
    assert tiny.config.edit_guidance_scale == EDIT_GUIDANCE_SCALE  # a model that sets none: the library's
    MLLM(tiny).edit(scenes[0], "make the circle blue", seed=0)
    monkeypatch.setattr(tiny.config, "edit_guidance_scale", 1.0)
    default = MLLM(tiny).edit(scenes[0], "make the circle blue", seed=0)[0]
    named = MLLM(tiny).edit(scenes[0], "make the circle blue", seed=0, guidance_scale=1.0)[0]
    MLLM(tiny).edit(scenes[0], "make the circle blue", seed=0, guidance_scale=2.0)
    assert scales == [(EDIT_GUIDANCE_SCALE, True), (1.0, False), (1.0, False), (2.0, True)]
    assert list(default.getdata()) == list(named.getdata())


def test_edit_errors(tiny, scenes):
    with pytest.raises(ValueError, match="2 images but 3 instructions"):
        edit_images(tiny, scenes, ["a", "b", "c"])
    with pytest.raises(ValueError, match="guidance must be one of"):
        edit_images(tiny, scenes, "a", guidance="image")
    with pytest.raises(ValueError, match="n must be at least 1"):
        edit_images(tiny, scenes, "a", n=0)
    assert edit_images(tiny, [], "a") == []


def test_mllm_edit_returns_pil_images(tiny, scenes):
    model = MLLM(tiny)
    one = model.edit(scenes[0], "make the circle blue", seed=0)
    assert len(one) == 1 and isinstance(one[0], Image.Image)
    assert one[0].size == (tiny.config.image_size, tiny.config.image_size)
    many = model.edit(scenes, "remove the square", n=2, seed=0)
    assert len(many) == 2 and all(len(per) == 2 for per in many)
    # The same seed, the same picture, through the Python API as through edit_images.
    assert list(one[0].getdata()) == list(model.edit(scenes[0], "make the circle blue", seed=0)[0].getdata())


def test_a_description_the_model_writes_goes_before_the_image(tiny, scenes, monkeypatch):
    """A model trained to describe the result first writes it (greedily, up to its <|boi|>) and draws after
    it; one that starts with <|boi|> draws at once; one that ends its turn still gets its image."""
    config = tiny.config
    words = tiny.processor.text_tokenizer.encode("a blue circle", add_special_tokens=False)
    end = generation._end_of_reply_ids(tiny)[0]
    replies = [[*words, config.boi_token_id], [config.boi_token_id], [*words, end]]
    seen = {}

    def fake_generate_ids(model, input_ids, attention_mask, max_new_tokens, *args, **kwargs):
        seen["rows"], seen["max_new_tokens"] = input_ids.shape[0], max_new_tokens
        return replies[: input_ids.shape[0]]

    monkeypatch.setattr(generation, "_generate_ids", fake_generate_ids)
    prompts = generation._draw_prefixes(tiny, [tiny.processor.edit_conversation(image, "make the circle blue")
                                               for image in (scenes[0], scenes[1], scenes[0])])
    stats = {}
    prefixes = generation._edit_prefaces(tiny, prompts, stats)
    assert seen == {"rows": 3, "max_new_tokens": generation.EDIT_DESCRIPTION_TOKENS}
    assert prefixes[0].tolist() == prompts[0][:-1].tolist() + words + [config.boi_token_id]
    assert prefixes[1].tolist() == prompts[1].tolist()  # image-only reply: the prefix as it was
    assert prefixes[2].tolist() == prompts[2][:-1].tolist() + words + [config.boi_token_id]
    assert stats["descriptions"] == ["a blue circle", "", "a blue circle"]
    # and edit_images draws after the description: its rows are those prefixes
    drawn = {}
    real = generation.sample_image_codes

    def spy(model, rows, *args, **kwargs):
        drawn["rows"] = rows
        return real(model, rows, *args, **kwargs)

    monkeypatch.setattr(generation, "sample_image_codes", spy)
    edit_images(tiny, scenes[:1], "make the circle blue", guidance_scale=1.0, seed=0)
    assert drawn["rows"][0].tolist() == prefixes[0].tolist()
