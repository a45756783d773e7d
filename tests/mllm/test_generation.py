"""Generation: the constrained CFG image loop (on a bare tiny Llama) and text / image / chat generation
on a tiny unified model built by `mllm.init.init_model`."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mllm import generation
from mllm.config import MLLMConfig
from mllm.generation import _ImageLogits, _left_pad, chat, generate_images, generate_text, sample_image_codes
from mllm.vocab import ImageVocabulary

# ------------------------------------------------------------------ the image loop on a bare Llama
# Fake vocabulary: text ids [0, 32) (pad 0, <|boi|> 1, <|eoi|> 2, <|image|> 3, end of turn 4),
# image ids [32, 48) for K = 16 codes, padding rows [48, 64).
K, OFFSET, BOI = 16, 32, 1




class BareModel(nn.Module):
    """What `sample_image_codes` needs of a UnifiedMLLM: config, llm, vocab, device, context_length."""

    def __init__(self, grid=(2, 3), sharpness: float = 60.0):
        super().__init__()
        self.config = MLLMConfig(
            image_offset=OFFSET,
            codebook_size=K,
            grid_size=grid,
            image_size=32,
            boi_token_id=BOI,
            eoi_token_id=2,
            image_token_id=3,
            end_of_turn_token_id=4,
            pad_token_id=0,
            vocab_size=64,
        )
        llm_config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
        self.llm = LlamaForCausalLM(llm_config).eval()
        with (
            torch.no_grad()
        ):  # peaked, context-dependent logits: samples then depend on the model, not only the RNG
            self.llm.lm_head.weight.mul_(sharpness)
        self.vocab = ImageVocabulary(self.config)

    @property
    def device(self):
        return self.llm.device

    @property
    def context_length(self):
        return self.llm.config.max_position_embeddings


@pytest.fixture(scope="module")
def bare():
    torch.manual_seed(0)
    return BareModel()


def _prefix(length, seed):
    ids = torch.randint(5, OFFSET, (length,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, torch.tensor([BOI])])


def test_image_loop_samples_exactly_grid_codes_in_range(bare):
    codes = sample_image_codes(
        bare, [_prefix(7, 0), _prefix(4, 1)], _prefix(3, 2), 3.0, 1.0, None, None, [0, 1]
    )
    assert codes.shape == (2, 2, 3) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < K


@pytest.mark.parametrize("decoding", ["sequential", "jacobi"])
def test_image_loop_feeds_only_image_ids_after_boi(bare, monkeypatch, decoding):
    fed = []
    real_call = _ImageLogits.__call__

    def spy(self, input_ids, attention_mask, position_ids, **kwargs):
        fed.append(input_ids.clone())
        return real_call(self, input_ids, attention_mask, position_ids, **kwargs)

    monkeypatch.setattr(_ImageLogits, "__call__", spy)
    stats = {}
    sample_image_codes(bare, [_prefix(5, 0)], _prefix(2, 1), 2.0, 1.0, None, None, [3], decoding=decoding,
                       stats=stats)
    assert stats["forwards"] == len(fed)
    if decoding == "sequential":
        assert len(fed) == 6  # prefill + h*w - 1 steps (the last code needs no forward)
    else:
        assert 1 <= len(fed) <= 6  # the first pass is the prefill; each pass decides at least one code
    assert bool((fed[0][:, -1] != BOI).all()) or decoding == "sequential"
    if len(fed) > 1:
        steps = torch.cat(fed[1:], dim=1)  # the conditional row and its unconditional twin
        assert torch.equal(steps[0], steps[1])
        assert bool(((steps >= OFFSET) & (steps < OFFSET + K)).all())


def test_cached_left_padded_steps_match_a_full_forward(bare):
    """Prefill of a left-padded batch + cached steps give the logits of the unpadded sequence run whole."""
    sequences = [_prefix(9, 0), _prefix(3, 1)]
    input_ids, mask = _left_pad(sequences, 0, "cpu")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    image_logits = _ImageLogits(bare.llm, OFFSET, OFFSET + K)
    assert image_logits.weight is not None  # the sliced-head path (plain Llama head)
    got = [image_logits(input_ids, mask, positions)]
    tokens = torch.tensor([[OFFSET + 3, OFFSET + 5], [OFFSET + 7, OFFSET + 1]])
    for step in range(2):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        got.append(image_logits(tokens[:, step : step + 1], mask, positions[:, -1:] + 1 + step))
    with torch.no_grad():
        for row, sequence in enumerate(sequences):
            full = bare.llm(torch.cat([sequence, tokens[row]])[None]).logits[0, :, OFFSET : OFFSET + K]
            for step in range(3):
                torch.testing.assert_close(
                    got[step][row], full[len(sequence) - 1 + step], rtol=1e-4, atol=1e-4
                )


def test_full_head_fallback_gives_the_same_codes(bare, monkeypatch):
    """Architectures off the plain-head list run the whole model and slice its logits: same result."""
    prefixes, unconditional = [_prefix(6, 0), _prefix(3, 1)], _prefix(4, 2)
    sliced = sample_image_codes(bare, prefixes, unconditional, 2.0, 1.0, None, None, [4, 5])
    monkeypatch.setattr(generation, "_PLAIN_HEAD_MODEL_TYPES", frozenset())
    assert _ImageLogits(bare.llm, OFFSET, OFFSET + K).weight is None
    assert torch.equal(
        sample_image_codes(bare, prefixes, unconditional, 2.0, 1.0, None, None, [4, 5]), sliced
    )


def test_guidance_combines_conditional_and_unconditional_logits(bare, monkeypatch):
    """Greedy decoding picks argmax(u + s * (c - u)), which differs from argmax(c) here."""
    conditional = torch.tensor([5.0, 4.0] + [0.0] * (K - 2))
    unconditional = torch.tensor([5.0, 1.0] + [0.0] * (K - 2))  # guided: 5 + 3 * 0 = 5 vs 1 + 3 * 3 = 10

    def fake(rows_of):
        def call(self, input_ids, attention_mask, position_ids, last=None):
            logits = torch.stack(rows_of(input_ids.shape[0]))  # (R, K)
            return logits if last is None else logits[:, None].expand(-1, last, -1)
        return call

    for decoding in ("sequential", "jacobi"):
        monkeypatch.setattr(_ImageLogits, "__call__", fake(lambda r: [conditional] * (r // 2) + [unconditional] * (r // 2)))
        guided = sample_image_codes(bare, [_prefix(4, 0)], _prefix(2, 1), 3.0, 0.0, None, None, [0], decoding=decoding)
        assert bool((guided == 1).all())
        monkeypatch.setattr(_ImageLogits, "__call__", fake(lambda r: [conditional] * r))
        plain = sample_image_codes(bare, [_prefix(4, 0)], None, 1.0, 0.0, None, None, [0], decoding=decoding)
        assert bool((plain == 0).all())


def test_guidance_scale_one_equals_the_plain_conditional_distribution(bare):
    prefixes = [_prefix(6, 0), _prefix(2, 1), _prefix(9, 2)]
    with_unconditional_rows = sample_image_codes(
        bare, prefixes, _prefix(4, 3), 1.0, 1.0, None, None, [5, 6, 7]
    )
    conditional_only = sample_image_codes(bare, prefixes, None, 1.0, 1.0, None, None, [5, 6, 7])
    assert torch.equal(with_unconditional_rows, conditional_only)
    guided = sample_image_codes(bare, prefixes, _prefix(4, 3), 4.0, 1.0, None, None, [5, 6, 7])
    assert not torch.equal(guided, conditional_only)


def test_seeds_are_per_row_and_reproducible(bare):
    prefixes = [_prefix(6, 0), _prefix(2, 1)]
    first = sample_image_codes(bare, prefixes, _prefix(4, 3), 2.0, 1.0, None, None, [10, 11])
    again = sample_image_codes(bare, prefixes, _prefix(4, 3), 2.0, 1.0, None, None, [10, 11])
    other = sample_image_codes(bare, prefixes, _prefix(4, 3), 2.0, 1.0, None, None, [12, 13])
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # A row batched with others equals the row generated alone with its seed.
    alone = sample_image_codes(bare, prefixes[1:], _prefix(4, 3), 2.0, 1.0, None, None, [11])
    assert torch.equal(first[1:], alone)


def test_top_k_one_is_greedy(bare):
    sampled = sample_image_codes(bare, [_prefix(6, 0)], _prefix(4, 3), 2.0, 1.0, 1, None, [1])
    greedy = sample_image_codes(bare, [_prefix(6, 0)], _prefix(4, 3), 2.0, 0.0, None, None, [2])
    assert torch.equal(sampled, greedy)


def test_prompt_too_long_for_the_context_is_an_error(bare):
    with pytest.raises(ValueError, match="context length"):
        sample_image_codes(bare, [_prefix(125, 0)], None, 1.0, 1.0, None, None, [0])



# ------------------------------------------------------------------ speculative Jacobi decoding
@pytest.fixture(scope="module")
def square():
    torch.manual_seed(1)
    return BareModel(grid=(4, 4), sharpness=8.0)  # 16 codes: several Jacobi passes, varied samples


@pytest.mark.parametrize("window", [2, 3, 5, 16, 40])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_jacobi_greedy_codes_equal_the_sequential_codes(square, window, guidance):
    """Left-padded prompts of different lengths, with and without CFG rows: the same greedy codes."""
    prefixes = [_prefix(7, 0), _prefix(3, 1), _prefix(11, 2)]
    unconditional = _prefix(2, 3) if guidance != 1.0 else None
    sequential = sample_image_codes(square, prefixes, unconditional, guidance, 0.0, None, None, [0, 1, 2],
                                    decoding="sequential")
    stats = {}
    jacobi = sample_image_codes(square, prefixes, unconditional, guidance, 0.0, None, None, [0, 1, 2],
                                decoding="jacobi", window=window, stats=stats)
    assert torch.equal(jacobi, sequential)
    assert stats["forwards"] <= 16  # never more passes than codes (the first pass is the prefill)
    alone = sample_image_codes(square, prefixes[1:2], unconditional, guidance, 0.0, None, None, [1],
                               decoding="jacobi", window=window)
    assert torch.equal(alone, sequential[1:2])


def test_jacobi_takes_fewer_passes_when_drafts_are_right(square, monkeypatch):
    """A model whose next code is always the same is decoded in two passes: every draft is accepted."""
    fixed = torch.full((K,), -30.0)
    fixed[5] = 30.0

    def call(self, input_ids, attention_mask, position_ids, last=None):
        logits = fixed.expand(input_ids.shape[0], K)
        return logits if last is None else logits[:, None].expand(-1, last, -1)

    monkeypatch.setattr(_ImageLogits, "__call__", call)
    stats = {}
    codes = sample_image_codes(square, [_prefix(4, 0)], None, 1.0, 1.0, None, None, [0], decoding="jacobi",
                               window=17, stats=stats)
    assert bool((codes == 5).all())
    # pass 1 (prefill): code 0 exact, the initial guesses (code 0 everywhere) rejected; pass 2: drafts from
    # pass 1's outputs (all 5) accepted up to the window.
    assert stats["forwards"] == 2 and stats["accepted_drafts"] == 15


def test_static_cache_gives_the_dynamic_cache_codes(square):
    prefixes, unconditional = [_prefix(6, 0), _prefix(2, 1)], _prefix(4, 2)
    dynamic = sample_image_codes(square, prefixes, unconditional, 2.0, 1.0, 8, 0.9, [4, 5], decoding="sequential")
    static = sample_image_codes(square, prefixes, unconditional, 2.0, 1.0, 8, 0.9, [4, 5], decoding="sequential",
                                cache="static")
    assert torch.equal(static, dynamic)


def test_decoding_options_are_checked(square):
    for bad in ({"decoding": "parallel"}, {"cache": "paged"}, {"window": 0},
                {"decoding": "jacobi", "cache": "static"}):
        with pytest.raises(ValueError):
            sample_image_codes(square, [_prefix(4, 0)], None, 1.0, 1.0, None, None, [0], **bad)


def _position_counts(model, decoding, samples, temperature=1.0, top_k=None, seed_base=0):
    prefixes = [_prefix(5, 0)] * samples
    codes = sample_image_codes(model, prefixes, _prefix(2, 1), 2.0, temperature, top_k, None,
                               list(range(seed_base, seed_base + samples)), decoding=decoding)
    flat = codes.view(samples, -1)
    return torch.stack([torch.bincount(flat[:, i], minlength=K) for i in range(flat.shape[1])])  # (h*w, K)


def _homogeneity_p_values(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per position: the chi-square test that two samples of codes come from one distribution."""
    from scipy.stats import chi2_contingency

    values = []
    for row_a, row_b in zip(a, b):
        seen = (row_a + row_b) > 0
        table = torch.stack([row_a[seen], row_b[seen]]).numpy()
        values.append(1.0 if table.shape[1] < 2 else float(chi2_contingency(table)[1]))
    return values


@pytest.mark.parametrize("top_k", [None, 4])
def test_jacobi_samples_the_sequential_distribution(square, top_k):
    """Per-position code frequencies of 1500 images each way: no position differs (chi-square, Bonferroni
    over 16 positions at 0.001). The same test does tell apart a sampler at another temperature."""
    pytest.importorskip("scipy")
    samples = 1500
    sequential = _position_counts(square, "sequential", samples, top_k=top_k)
    jacobi = _position_counts(square, "jacobi", samples, top_k=top_k, seed_base=10**6)
    assert min(_homogeneity_p_values(sequential, jacobi)) > 0.001 / 16
    hotter = _position_counts(square, "sequential", samples, temperature=1.5, top_k=top_k, seed_base=2 * 10**6)
    assert min(_homogeneity_p_values(sequential, hotter)) < 0.001 / 16

# ------------------------------------------------------------------ a tiny unified model
@pytest.fixture(scope="module")
def tiny(model_tiny_dir):
    from mllm.model import UnifiedMLLM

    return UnifiedMLLM.from_pretrained(model_tiny_dir, device="cpu")


def test_generate_images_shapes_and_ranges(tiny):
    h, w = tiny.config.grid_size
    result = generate_images(tiny, ["a red circle", "two blue squares", "a green triangle"], n=2, seed=0)
    assert len(result) == 3 and all(len(images) == 2 for images in result)
    for images in result:
        for codes in images:
            assert codes.shape == (h, w)
            assert codes.dtype == torch.long
            assert 0 <= int(codes.min()) and int(codes.max()) < tiny.config.codebook_size


@pytest.mark.parametrize("decoding", ["jacobi", "sequential"])
def test_generate_images_seeding(tiny, decoding):
    first = generate_images(tiny, "a red circle", n=2, seed=3, decoding=decoding)[0]
    other = generate_images(tiny, ["a red circle"], n=2, seed=4, decoding=decoding)[0]
    assert not torch.equal(first[0], other[0])  # another seed, another image
    assert not torch.equal(first[0], first[1])  # image j uses seed + j ...
    assert torch.equal(first[1], other[0])  # ... so image 1 of seed 3 is image 0 of seed 4
    # Same prompt and seed -> the same images, also when batched with another prompt.
    batched = generate_images(tiny, ["a blue square", "a red circle"], n=2, seed=[9, 3], decoding=decoding)
    assert all(torch.equal(a, b) for a, b in zip(batched[1], first))


def test_auto_decoding_is_jacobi_for_a_few_images_and_sequential_above(tiny):
    from mllm.config import JACOBI_AUTO_MAX_IMAGES

    for count, method in ((JACOBI_AUTO_MAX_IMAGES, "jacobi"), (JACOBI_AUTO_MAX_IMAGES + 1, "sequential")):
        stats = {}
        auto = generate_images(tiny, "a red circle", n=count, seed=3, stats=stats)[0]
        named = generate_images(tiny, "a red circle", n=count, seed=3, decoding=method)[0]
        assert stats["decoding"] == method
        assert all(torch.equal(a, b) for a, b in zip(auto, named))


def test_generate_images_restores_the_global_rng(tiny):
    torch.manual_seed(123)
    generate_images(tiny, "a red circle", seed=1)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))


def test_generate_text_is_seeded_and_stops_at_end_of_turn(tiny):
    conversation = [{"role": "user", "content": "What is in the image?"}]
    greedy = generate_text(tiny, [conversation, conversation], max_new_tokens=8)
    assert len(greedy) == 2 and greedy[0] == greedy[1]
    sampled = generate_text(tiny, conversation, max_new_tokens=8, temperature=1.0, seed=7)
    assert sampled == generate_text(tiny, conversation, max_new_tokens=8, temperature=1.0, seed=7)

    # With <|end|> the likeliest token everywhere, the reply ends at once: empty text.
    with biased_head(tiny, {tiny.config.end_of_turn_token_id: 100.0}):
        assert generate_text(tiny, conversation, max_new_tokens=8) == [""]


def test_generate_text_cuts_at_stop_strings(tiny):
    conversation = [{"role": "user", "content": "Describe the image."}]
    (full,) = generate_text(tiny, conversation, max_new_tokens=12, temperature=1.0, seed=0)
    words = re.findall(r"[a-z]{2,}", full[1:])
    assert words, full
    (cut,) = generate_text(tiny, conversation, max_new_tokens=12, temperature=1.0, seed=0, stop=[words[0]])
    assert cut == full[: full.find(words[0])].strip() and words[0] not in cut


def spy_text_generation(monkeypatch) -> list[list[int]]:
    """The prompt ids of every text generation call `chat` makes, in order."""
    text_calls = []
    real_generate_ids = generation._generate_ids

    def spy(model, input_ids, *args, **kwargs):
        text_calls.append(input_ids[0].tolist())
        return real_generate_ids(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(generation, "_generate_ids", spy)
    return text_calls


def test_chat_draws_an_image_after_boi(tiny, monkeypatch):
    """<|boi|> (made the likeliest token) starts an image of exactly h*w image ids closed by <|eoi|>;
    then text continues (here "red", the likeliest once <|boi|> is no longer allowed)."""
    config = tiny.config
    text_calls = spy_text_generation(monkeypatch)
    red = tiny.processor.text_tokenizer.encode("red", add_special_tokens=False)[0]
    per_image = config.image_tokens_per_image + 2  # the image is charged to the budget: 4 text tokens remain
    with biased_head(tiny, {config.boi_token_id: 200.0, red: 100.0}):
        reply = chat(
            tiny, [{"role": "user", "content": "Draw: a red circle"}], max_new_tokens=per_image + 4,
            max_images=1, seed=0,
        )
    assert len(reply["images"]) == 1
    assert reply["images"][0].size == (config.image_size, config.image_size)
    assert "red" in reply["text"]
    # The text generation after the image continues from prompt + <|boi|> h*w codes <|eoi|>.
    assert len(text_calls) == 2
    continued = torch.tensor(text_calls[1])
    ((start, codes),) = tiny.vocab.find_images(continued)
    assert start == len(text_calls[0]) and int(continued[-1]) == config.eoi_token_id
    assert len(continued) == start + config.image_tokens_per_image + 2
    assert list(reply["images"][0].getdata()) == list(
        tiny.vision_tokenizer.decode_images(codes[None])[0].getdata()
    )


def test_chat_continues_from_a_reply_prefix_ending_in_boi(tiny, monkeypatch):
    """reply_prefix (text already streamed + <|boi|>): the image is drawn right after it, nothing before it
    is generated again, and the reply's text starts with the prefix's text."""
    config = tiny.config
    blue = tiny.processor.text_tokenizer.encode("blue", add_special_tokens=False)
    prefix = [*blue, config.boi_token_id]
    text_calls = spy_text_generation(monkeypatch)
    rest_of_image = config.image_tokens_per_image + 1  # the codes and <|eoi|> (the prefix has the <|boi|>)
    reply = chat(tiny, [{"role": "user", "content": "Draw: a blue square"}],
                 max_new_tokens=len(prefix) + rest_of_image + 3, max_images=1, seed=0, reply_prefix=prefix)
    assert len(reply["images"]) == 1 and reply["text"].startswith("blue")
    # the only text call comes after the image: prompt + prefix + h*w codes + <|eoi|>
    assert len(text_calls) == 1
    ((start, _),) = tiny.vocab.find_images(torch.tensor(text_calls[0]))
    assert text_calls[0][start + 1 - len(prefix):start + 1] == prefix and text_calls[0][-1] == config.eoi_token_id


def test_chat_without_boi_returns_text_only(tiny):
    reply = chat(tiny, [{"role": "user", "content": "Hello"}], max_new_tokens=6, temperature=1.0, seed=0)
    assert reply["images"] == [] and isinstance(reply["text"], str)


@contextlib.contextmanager
def scripted_text(model, token_id: int, count: int):
    """Text generation writes `token_id` for the first `count` tokens of the reply, then asks for an image
    (<|boi|> likeliest) wherever <|boi|> is allowed (a forward hook on the LLM: image codes are unaffected,
    the image loop runs the decoder and the head's image rows on their own)."""
    boi, start = model.config.boi_token_id, {}

    def hook(module, args, kwargs, output):
        cache = getattr(output, "cache", None)  # transformers 5 (past_key_values before)
        cache = cache if cache is not None else output.past_key_values
        length = cache.get_seq_length()  # the sequence so far: the token predicted comes next
        start.setdefault("prompt", length)
        output.logits[:, -1, token_id if length - start["prompt"] < count else boi] += 1e4
        return output

    handle = model.llm.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _context_length(monkeypatch, length: int) -> None:
    from mllm.model import UnifiedMLLM

    monkeypatch.setattr(UnifiedMLLM, "context_length", property(lambda self: length))


def test_chat_never_starts_an_image_that_does_not_fit_the_context(tiny, monkeypatch):
    """Text, then <|boi|> near the end of the context: the image used to be checked only once the text was
    there, and the reply failed (a 400 after all the generation) when it no longer fitted."""
    config = tiny.config
    per_image = config.image_tokens_per_image + 2
    conversation = [{"role": "user", "content": "Draw: a red circle"}]
    prompt = len(generation._encode_prompts(tiny, [conversation])["input_ids"][0])
    red = tiny.processor.text_tokenizer.encode("red", add_special_tokens=False)[0]
    _context_length(monkeypatch, prompt + 3 + per_image)  # 3 text tokens and the image: just fits
    with scripted_text(tiny, red, 3):
        reply = chat(tiny, conversation, max_images=2, seed=0)
    assert len(reply["images"]) == 1 and reply["text"].startswith("red")
    _context_length(monkeypatch, prompt + 2 + per_image)  # one token short: not started, text goes on
    with scripted_text(tiny, red, 3):
        reply = chat(tiny, conversation, max_images=2, seed=0)
    assert reply["images"] == [] and reply["text"].startswith("red")
    # a prompt and reply prefix over the context: refused before anything is generated
    with pytest.raises(ValueError, match="exceed the context length"):
        chat(tiny, conversation, reply_prefix=[red] * (per_image + 3))


def test_chat_charges_drawn_images_to_max_new_tokens(tiny, monkeypatch):
    """max_new_tokens bounds the whole reply, images included (h*w + 2 tokens each); an image that does
    not fit the budget is not started. (Images used to come on top: up to 4 of them.)"""
    config = tiny.config
    per_image = config.image_tokens_per_image + 2
    conversation = [{"role": "user", "content": "Draw: a red circle"}]
    replies = []
    real_finish = generation._finish_text
    monkeypatch.setattr(generation, "_finish_text", lambda m, ids, stop: replies.append(list(ids)) or
                        real_finish(m, ids, stop))
    with biased_head(tiny, {config.boi_token_id: 200.0}):
        cases = ((per_image - 1, 0), (per_image, 1), (2 * per_image + 1, 2), (10 * per_image, 4))
        for budget, drawn in cases:
            reply = chat(tiny, conversation, max_new_tokens=budget, max_images=4, seed=0)
            assert len(reply["images"]) == drawn, budget
            assert len(replies[-1]) <= budget
            assert len(tiny.vocab.find_images(replies[-1])) == drawn
            assert reply["completion_tokens"] == len(replies[-1])  # the reply's tokens, its images included
    # a reply prefix's image counts too: one that does not fit is dropped, the reply goes on with text
    blue = tiny.processor.text_tokenizer.encode("blue", add_special_tokens=False)
    prefix = [*blue, config.boi_token_id]
    reply = chat(tiny, conversation, max_new_tokens=len(prefix) + 5, reply_prefix=prefix, max_images=1,
                 seed=0)
    assert reply["images"] == [] and reply["text"].startswith("blue")
    assert config.boi_token_id not in replies[-1] and len(replies[-1]) <= len(prefix) + 5
    # what a server reports for it: the reply's own tokens, and "length" when the budget ended it
    assert reply["completion_tokens"] == len(replies[-1])
    ended = replies[-1][-1] in generation._end_of_reply_ids(tiny)
    assert reply["finish_reason"] == ("stop" if ended else "length")


def test_generate_images_checks_room_before_sampling(tiny, monkeypatch):
    config = tiny.config
    per_image = config.image_tokens_per_image + 2
    prompt = len(generation._draw_prefixes(tiny, [tiny.processor.draw_conversation("a red circle")])[0]) - 1
    _context_length(monkeypatch, prompt + per_image - 1)
    sampled = []
    real_sample = generation.sample_image_codes
    monkeypatch.setattr(generation, "sample_image_codes", lambda *a, **k: sampled.append(a) or real_sample(*a, **k))
    with pytest.raises(ValueError, match=rf"'a red circle' takes {prompt} tokens .* over the context length"):
        generate_images(tiny, "a red circle", n=8, seed=0)
    assert sampled == []  # refused before the image loop
    _context_length(monkeypatch, prompt + per_image)  # exactly enough
    assert len(generate_images(tiny, "a red circle", n=8, seed=0)[0]) == 8


@contextlib.contextmanager
def biased_head(model, biases: dict[int, float]):
    """The LLM's output head with a bias added (id -> logit offset) inside the block."""
    llm = model.llm
    head = llm.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight = head.weight  # shared, not copied
        biased.bias.zero_()
        for token_id, offset in biases.items():
            biased.bias[token_id] = offset
    llm.set_output_embeddings(biased)
    try:
        yield
    finally:
        llm.set_output_embeddings(head)


def test_generation_module_keeps_model_mode(tiny):
    tiny.train()
    try:
        generate_images(tiny, "a red circle", seed=0)
        assert tiny.training
    finally:
        tiny.eval()


def test_codebook_mode_syncs_image_rows_before_decoding(model_codebook_dir):
    """In codebook mode the id-based loop must see projector(codebooks) in the embedding matrix."""
    from mllm.model import UnifiedMLLM

    model = UnifiedMLLM.from_pretrained(model_codebook_dir)
    start, end = model.vocab.image_id_range
    with torch.no_grad():
        model.llm.get_input_embeddings().weight[start:end] = 0.0  # stale rows
        expected = model.image_embedding_rows()
    codes = generate_images(model, "a red circle", seed=0)[0][0]
    torch.testing.assert_close(model.llm.get_input_embeddings().weight[start:end], expected)
    assert model.config.embedding_mode == "codebook"
    # and the loop's step logits equal the embedding path's (forward with inputs_embeds)
    prefix = torch.cat([torch.tensor([model.config.boi_token_id]), codes.reshape(-1)[:3] + start])
    with torch.no_grad():
        by_ids = model.llm(prefix[None]).logits
        by_embeddings = model(prefix[None]).logits
    torch.testing.assert_close(by_ids, by_embeddings)


def _control_ids(model) -> dict[str, int]:
    """The control ids a text reply must never hold (each decodes to nothing), by name."""
    tokenizer = model.processor.text_tokenizer
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "pad", "unk")}
    ids.update((token, tokenizer.convert_tokens_to_ids(token)) for token in ("<|system|>", "<|user|>", "<|assistant|>"))
    ids.update({"<|eoi|>": model.config.eoi_token_id, "<|image|>": model.config.image_token_id})
    assert len(set(ids.values())) == len(ids) and all(model.processor.decode_text([i]) == "" for i in ids.values())
    return ids


def test_a_text_reply_never_holds_ids_that_decode_to_nothing(tiny, monkeypatch):
    """A control token made the likeliest (as an undertrained model may make it) used to fill the reply with
    ids that decode to nothing: 16 ids of '' text (the server's `completion_tokens=16`, `content ''`)."""
    replies = []
    real_generate_ids = generation._generate_ids

    def spy(*args, **kwargs):
        replies.extend(real_generate_ids(*args, **kwargs))
        return replies[-1:]

    monkeypatch.setattr(generation, "_generate_ids", spy)
    conversation = [{"role": "user", "content": "What is in the image?"}]
    ends = {tiny.config.end_of_turn_token_id, tiny.processor.text_tokenizer.eos_token_id}
    for name, token_id in _control_ids(tiny).items():
        replies.clear()
        with biased_head(tiny, {token_id: 100.0}):
            (text,) = generate_text(tiny, conversation, max_new_tokens=16)
        (ids,) = replies
        body = ids[:-1] if ids and ids[-1] in ends else ids
        assert token_id not in ids and all(tiny.processor.decode_text([i]) != "" for i in body), (name, ids)
        assert text == tiny.processor.decode_text(body).strip()


def test_eos_ends_a_text_reply_like_the_end_of_turn(tiny):
    """A base model closes its text with eos, not the template's end of turn: the reply ends there (it used
    to go on with eos after eos, each decoding to nothing, until max_new_tokens)."""
    eos = tiny.processor.text_tokenizer.eos_token_id
    assert eos != tiny.config.end_of_turn_token_id
    conversation = [{"role": "user", "content": "What is in the image?"}]
    with biased_head(tiny, {eos: 100.0}):
        batch = generation._encode_prompts(tiny, [conversation])
        ids = generation._generate_ids(tiny, batch["input_ids"], batch["attention_mask"], 16, 0.0, None, None,
                                       None, stop_ids=generation._end_of_reply_ids(tiny), allow_boi=False)
        assert ids == [[eos]]
        assert generate_text(tiny, conversation, max_new_tokens=16) == [""]
        assert chat(tiny, conversation, max_new_tokens=16)["text"] == ""


def test_jacobi_drafts_start_from_the_models_greedy_unconditional_drawing(tiny, monkeypatch):
    """The prior is the greedy drawing of the unconditional draw prompt, computed once per model; a seed
    gives the same image with the prior computed fresh or reused, and greedy codes match sequential ones."""
    generation._DRAFT_PRIORS.pop(tiny, None)
    calls = []
    real = generation.sample_image_codes
    monkeypatch.setattr(generation, "sample_image_codes", lambda *a, **k: calls.append(k) or real(*a, **k))
    first = generate_images(tiny, "a red circle", n=2, seed=7)
    assert sum(1 for k in calls if k.get("prior") is False) == 1  # the prior's own decode
    again = generate_images(tiny, "a red circle", n=2, seed=7)
    assert sum(1 for k in calls if k.get("prior") is False) == 1  # reused
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    with generation._generation_mode(tiny):
        unconditional = generation._draw_prefixes(tiny, [tiny.processor.unconditional_draw_conversation()])[0]
        expected = real(tiny, [unconditional], None, 1.0, 0.0, None, None, [0], decoding="sequential")
        assert torch.equal(generation._draft_prior(tiny, 4), expected.reshape(-1))
    greedy = {d: generate_images(tiny, ["a red circle", "two blue squares"], temperature=0.0, decoding=d)
              for d in ("jacobi", "sequential")}
    assert all(torch.equal(a[0], b[0]) for a, b in zip(greedy["jacobi"], greedy["sequential"]))


def test_an_edit_sent_image_first_is_drawn_from_the_instruction_first_turn(tiny, monkeypatch):
    """A user turn of one image, then text (as chat clients send an edit): chat decides to draw from the turn
    as sent, and draws (and goes on) from the turn read instruction first, the order edits are trained in."""
    from mllm.generation import _encode_prompts, edit_order

    config = tiny.config
    h, w = config.grid_size
    image = {"type": "image", "codes": torch.arange(h * w).reshape(h, w) % config.codebook_size}
    instruction = {"type": "text", "text": "make the circle blue"}
    sent = [{"role": "user", "content": [image, instruction]}]
    read = edit_order(sent)
    assert read == [{"role": "user", "content": [instruction, image]}]
    assert read[0]["content"] == tiny.processor.edit_conversation(image, instruction["text"])[0]["content"]
    drawn_from = []
    real_sample = generation.sample_image_codes

    def spy(model, rows, *args, **kwargs):
        drawn_from.append(rows[0].tolist())
        return real_sample(model, rows, *args, **kwargs)

    monkeypatch.setattr(generation, "sample_image_codes", spy)
    text_calls = spy_text_generation(monkeypatch)
    per_image = config.image_tokens_per_image + 2
    with biased_head(tiny, {config.boi_token_id: 200.0}):
        reply = chat(tiny, sent, max_new_tokens=per_image + 2, max_images=1, seed=0)
    as_sent = _encode_prompts(tiny, [sent])["input_ids"][0].tolist()
    as_read = _encode_prompts(tiny, [read])["input_ids"][0].tolist()
    assert as_sent != as_read and sorted(as_sent) == sorted(as_read)  # the same tokens, another order
    assert len(reply["images"]) == 1
    assert text_calls[0] == as_sent  # the decision to draw: the turn as sent
    assert drawn_from == [as_read + [config.boi_token_id]]  # the drawing: the turn read instruction first
    assert text_calls[1][:len(as_read)] == as_read  # the text after the image follows the same reading


@pytest.mark.parametrize("content", [
    "make the circle blue",  # text only
    [{"type": "text", "text": "make the circle blue"}, {"type": "image", "image": "a.png"}],  # already instruction first
    [{"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"},
     {"type": "text", "text": "What changed between the two images?"}],  # two images
    [{"type": "image", "image": "a.png"}],  # no text
])
def test_edit_order_leaves_other_turns_alone(content):
    from mllm.generation import edit_order

    assert edit_order([{"role": "user", "content": content}]) is None
    assert edit_order([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                                    {"type": "text", "text": "t"}]},
                       {"role": "assistant", "content": "ok"}]) is None  # the last turn is not the user's


def test_chat_starts_an_image_where_its_chance_reaches_the_models_threshold(tiny, monkeypatch):
    """`config.chat_image_threshold`: on a turn of an image then text, the reply starts with an image whenever
    the model gives `<|boi|>` at least that chance as its first token (`image_start_chances`), even where
    another token is likelier; under it, or on a turn of text alone, the plain (greedy) decision stands."""
    from mllm.generation import image_start_chances

    config = tiny.config
    h, w = config.grid_size
    image = {"type": "image", "codes": torch.arange(h * w).reshape(h, w) % config.codebook_size}
    sent = [{"role": "user", "content": [image, {"type": "text", "text": "make the circle blue"}]}]
    text_only = [{"role": "user", "content": "make the circle blue"}]
    red = tiny.processor.text_tokenizer.encode("red", add_special_tokens=False)[0]
    with biased_head(tiny, {red: 10.0}):  # "red" the likeliest first token by far
        (base,) = image_start_chances(tiny, sent)
    bias = float(torch.log(torch.tensor(0.1 / 0.9 * (1 - base) / base)))  # about a 10% chance of <|boi|>
    per_image = config.image_tokens_per_image + 2
    monkeypatch.setattr(config, "chat_image_threshold", None)
    with biased_head(tiny, {red: 10.0, config.boi_token_id: bias}):
        chance, chance_text = image_start_chances(tiny, [sent, text_only])
        assert 0.02 < chance < 0.4
        plain = chat(tiny, sent, max_new_tokens=per_image + 2, max_images=1)
        assert plain["images"] == []  # greedy: <|boi|> is not the likeliest token
        for threshold, drawn in ((chance * 0.9, 1), (chance * 1.1, 0)):
            monkeypatch.setattr(config, "chat_image_threshold", threshold)
            reply = chat(tiny, sent, max_new_tokens=per_image + 2, max_images=1)
            assert len(reply["images"]) == drawn, threshold
        monkeypatch.setattr(config, "chat_image_threshold", min(chance, chance_text) * 0.5)
        assert chat(tiny, text_only, max_new_tokens=per_image + 2, max_images=1)["images"] == []


def test_chat_image_threshold_must_be_a_chance():
    with pytest.raises(ValueError, match="chat_image_threshold must be in"):
        BareModel().config.__class__(**{**BareModel().config.to_dict(), "chat_image_threshold": 1.5})
