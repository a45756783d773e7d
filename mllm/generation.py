"""Text and image generation for a `UnifiedMLLM`.

    generate_text(model, conversations)            -> ["answer", ...]          transformers generate()
    generate_images(model, ["a red circle"], n=2)  -> [[codes (h, w), codes]]  constrained, batched CFG
    edit_images(model, [image], ["make the circle blue"]) -> [[codes (h, w)]]  the same loop, an image in
    chat(model, conversation)                      -> {"text": str, "images": [PIL, ...]}

Text goes through `model.llm.generate()` (KV cache, greedy or sampling, end of turn, stop
strings). Images use a short decode loop of our own over the same transformers pieces
(`DynamicCache`, `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`): after
`<|boi|>` exactly h*w ids are sampled from the image-id range, then `<|eoi|>` is forced. CFG
runs the conditional and unconditional rows in ONE batch (rows doubled) and combines
`logits = u + s * (c - u)` on the image slice; both rows of a pair receive the sampled token.
`generate()` with transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor` runs a second,
separate forward per step for the unconditional branch and computes full-vocabulary logits; the
loop here is measured against it in `scripts/bench_generate.py` (figures in BENCHMARKS.md).

Two ways to run that loop, the same distribution (`decoding=`): "sequential", one forward pass per code,
and "jacobi", speculative Jacobi decoding (`_jacobi_codes`): a window of draft codes verified per pass
by the speculative-sampling rule, about 3x fewer passes on the demo model. "auto" (the default) takes
"jacobi" for a few images per call and "sequential" for larger batches, where on a CPU it is faster.

Seeding: a seed is scoped (the global RNG state is restored afterwards). Image rows are seeded
one by one (image j of a prompt gets `seed + j`, each row with its own `torch.Generator`), so an
image depends on its prompt and seed only, not on what else shares the batch.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StaticCache
from transformers.generation.logits_process import (
    LogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mllm.config import (
    DECODING_METHODS,
    DEFAULT_DECODING,
    DRAW_GUIDANCE_SCALE,
    DRAW_TEMPERATURE,
    EDIT_GUIDANCE,
    EDIT_GUIDANCE_MODES,
    EDIT_TEMPERATURE,
    JACOBI_AUTO_MAX_IMAGES,
)
from mllm.vocab import special_token_ids

Conversation = list[dict[str, Any]]

# Architectures whose output head is a plain linear map of the final hidden state (no logit
# soft-capping or scaling). For them the image loop multiplies the last hidden state by the K
# image rows of lm_head only: the text rows are never sampled while drawing, and for a large text
# vocabulary (Qwen2: 151k rows) they are a large share of the bytes each decode step reads.
_PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "olmo", "olmo2", "starcoder2", "gemma"}
)


# Image decoding (see sample_image_codes): DECODING_METHODS and DEFAULT_DECODING live in mllm.config (the
# commands offer them without importing torch). JACOBI_WINDOW: tokens per forward pass of "jacobi" (the
# known token and JACOBI_WINDOW - 1 drafts), the measured best on the demo model (BENCHMARKS.md).
JACOBI_WINDOW = 10
# KV cache of the image loop: "static" preallocates it with its mask and positions (sequential only); the
# dynamic cache is the default, faster on CPU (BENCHMARKS.md, "Image generation").
CACHE_KINDS = ("dynamic", "static")
DEFAULT_CACHE = "dynamic"
# Longest description of an edit's result written before its image (a shapes caption of three objects is
# ~30 tokens).
EDIT_DESCRIPTION_TOKENS = 64

# ---------------------------------------------------------------------------- text
@torch.no_grad()
def generate_text(
    model,
    conversations: Conversation | Sequence[Conversation],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
) -> list[str]:
    """One reply per conversation (a conversation alone counts as a list of one).

    Greedy when temperature == 0, else sampling with temperature / top_k / top_p. A reply ends at the
    end of turn (or the tokenizer's eos), at the first `stop` string (not included in the text) or after
    `max_new_tokens`. Image ids, `<|boi|>` and the text tokenizer's other control tokens are suppressed:
    these are text replies, and every id in them decodes to text.
    """
    conversations = _as_conversation_list(conversations)
    with _generation_mode(model), _seeded(seed, model.device):
        batch = _encode_prompts(model, conversations)
        new_ids = _generate_ids(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            stop,
            stop_ids=_end_of_reply_ids(model),
            allow_boi=False,
        )
    return [_finish_text(model, ids, stop) for ids in new_ids]


# ---------------------------------------------------------------------------- images
@torch.no_grad()
def generate_images(
    model,
    prompts: str | Sequence[str],
    n: int = 1,
    guidance_scale: float = DRAW_GUIDANCE_SCALE,
    temperature: float = DRAW_TEMPERATURE,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
    decoding: str = DEFAULT_DECODING,
    window: int = JACOBI_WINDOW,
    cache: str = DEFAULT_CACHE,
    stats: dict[str, Any] | None = None,
) -> list[list[torch.Tensor]]:
    """`n` images per prompt: `result[i][j]` is image j of prompt i as codes (h, w) on the CPU.

    Each prompt is the draw conversation (`processor.draw_conversation`) rendered with the
    generation prompt and `<|boi|>` appended. guidance_scale == 1 samples the plain conditional
    distribution (the unconditional rows are skipped); any other value runs CFG against
    `processor.unconditional_draw_conversation()`. Image j of prompt i is sampled with seed
    `seeds[i] + j`, where `seeds` is `seed` per prompt (a list) or the same int for every prompt;
    seed None draws one from torch's global RNG (so `torch.manual_seed` makes it reproducible).
    A prompt that leaves no room in the context for its image (h*w + 2 tokens: <|boi|>, the codes,
    <|eoi|>) is a ValueError before anything is sampled.
    `decoding`, `window`, `cache` and `stats`: see `sample_image_codes` (the default, speculative Jacobi
    decoding, samples the same distribution as "sequential" in fewer forward passes).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not prompts:
        return []
    base_seeds = _prompt_seeds(seed, len(prompts))
    with _generation_mode(model):
        processor = model.processor
        prefixes = _draw_prefixes(model, [processor.draw_conversation(p) for p in prompts])
        _check_image_room(model, prompts, prefixes)
        unconditional = None
        if guidance_scale != 1.0:
            unconditional = _draw_prefixes(model, [processor.unconditional_draw_conversation()])[0]
        rows = [prefix for prefix in prefixes for _ in range(n)]
        row_seeds = [base + j for base in base_seeds for j in range(n)]
        codes = sample_image_codes(
            model, rows, unconditional, guidance_scale, temperature, top_k, top_p, row_seeds,
            decoding=decoding, window=window, cache=cache, stats=stats,
        ).cpu()  # (len(prompts) * n, h, w)
    return [list(codes[i * n : (i + 1) * n]) for i in range(len(prompts))]


@torch.no_grad()
def edit_images(
    model,
    images: Sequence[Any],
    instructions: str | Sequence[str],
    n: int = 1,
    guidance_scale: float | None = None,
    guidance: str = EDIT_GUIDANCE,
    temperature: float = EDIT_TEMPERATURE,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
    decoding: str = DEFAULT_DECODING,
    window: int = JACOBI_WINDOW,
    stats: dict[str, Any] | None = None,
    image_guidance_scale: float | None = None,
) -> list[list[torch.Tensor]]:
    """`n` edits per (image, instruction) pair: `result[i][j]` is edit j of image i as codes (h, w), CPU.

    Each pair is `processor.edit_conversation(image, instruction)` (the instruction, then the image)
    rendered with the generation prompt and `<|boi|>` appended; the loop is `sample_image_codes`'s. One
    instruction goes with every image. `guidance_scale` None: the model's own (`config.edit_guidance_scale`,
    EDIT_GUIDANCE_SCALE unless its training measured another). `guidance` names what the unconditional branch of classifier-free
    guidance drops, as training drops it: "instruction" (each image alone: guidance pushes towards what the
    instruction changes) or "both" (the unconditional draw request); guidance_scale 1 runs no guidance.
    `image_guidance_scale` (None: off) runs both branches at once, each with its own scale, as InstructPix2Pix
    does: logits = u + image_guidance_scale * (i - u) + guidance_scale * (c - i), with c the conditional
    rows, i the image alone and u the unconditional draw request (three rows per edit; `guidance` is then
    unused). Seeds as in `generate_images`. Jacobi decoding drafts from the source image's own codes: an edit keeps
    most of them, so most drafts are accepted (the distribution is the same whatever the drafts).

    A model trained to describe the result before drawing it (edit records with a `target_caption`) writes
    that description first, greedily, up to its `<|boi|>` (`_edit_prefaces`; `stats["descriptions"]`
    receives them); a model trained on image-only replies starts its reply with `<|boi|>` and draws at once.
    """
    images = list(images)
    instructions = [instructions] * len(images) if isinstance(instructions, str) else list(instructions)
    if len(instructions) != len(images):
        raise ValueError(f"got {len(images)} images but {len(instructions)} instructions")
    if guidance not in EDIT_GUIDANCE_MODES:
        raise ValueError(f"guidance must be one of {EDIT_GUIDANCE_MODES}, got {guidance!r}")
    if guidance_scale is None:
        guidance_scale = model.config.edit_guidance_scale
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not images:
        return []
    base_seeds = _prompt_seeds(seed, len(images))
    with _generation_mode(model):
        processor = model.processor
        source_codes = processor.encode_images(images)  # (B, h, w), once: the prompts reuse them as codes
        sources = [{"type": "image", "codes": codes} for codes in source_codes]
        prefixes = _draw_prefixes(model, [processor.edit_conversation(source, text)
                                          for source, text in zip(sources, instructions)])
        prefixes = _edit_prefaces(model, prefixes, stats)
        _check_image_room(model, instructions, prefixes)
        unconditional, branches = None, None
        if image_guidance_scale is not None:
            image_alone = _draw_prefixes(model, [processor.edit_conversation(source, "", drop="instruction")
                                                 for source in sources])
            neither = _draw_prefixes(model, [processor.edit_conversation(None, "", drop="both")])[0]
            # c * s_T + i * (s_I - s_T) + u * (1 - s_I): the form above, as coefficients of the branches
            branches = [([prefix for prefix in image_alone for _ in range(n)], image_guidance_scale - guidance_scale),
                        ([neither] * (len(prefixes) * n), 1.0 - image_guidance_scale)]
        elif guidance_scale != 1.0:
            if guidance == "both":
                unconditional = _draw_prefixes(model, [processor.edit_conversation(None, "", drop="both")])[0]
            else:
                dropped = _draw_prefixes(model, [processor.edit_conversation(source, "", drop="instruction")
                                                 for source in sources])
                unconditional = [prefix for prefix in dropped for _ in range(n)]
        rows = [prefix for prefix in prefixes for _ in range(n)]
        row_seeds = [base + j for base in base_seeds for j in range(n)]
        prior = source_codes.repeat_interleave(n, dim=0).to(model.device)
        codes = sample_image_codes(
            model, rows, unconditional, guidance_scale, temperature, top_k, top_p, row_seeds,
            decoding=decoding, window=window, stats=stats, prior=prior, branches=branches,
        ).cpu()
    return [list(codes[i * n : (i + 1) * n]) for i in range(len(images))]


def _edit_prefaces(model, prefixes: list[torch.Tensor], stats: dict[str, Any] | None = None) -> list[torch.Tensor]:
    """Each edit prefix (prompt + `<|boi|>`) with the model's own text before its image, if it writes any:
    the reply is generated greedily from the prompt until `<|boi|>` (at most EDIT_DESCRIPTION_TOKENS). A reply
    that starts with `<|boi|>` (image-only training) keeps its prefix; one that ends its turn or runs out of
    tokens without starting an image gets `<|boi|>` appended after its text (the edit is drawn anyway)."""
    config = model.config
    boi = config.boi_token_id
    prompts = [prefix[:-1] for prefix in prefixes]
    input_ids, attention_mask = _left_pad(prompts, config.pad_token_id, model.device)
    ends = _end_of_reply_ids(model)
    new_rows = _generate_ids(model, input_ids, attention_mask, EDIT_DESCRIPTION_TOKENS, 0.0, None, None, None,
                             [boi, *ends], allow_boi=True)
    out, descriptions = [], []
    for prompt, row in zip(prompts, new_rows):
        text_ids = [token for token in row if token != boi and token not in ends]
        descriptions.append(model.processor.decode_text(text_ids).strip())
        out.append(torch.cat([prompt, torch.tensor([*text_ids, boi], dtype=prompt.dtype, device=prompt.device)]))
    if stats is not None:
        stats["descriptions"] = descriptions
    return out


@torch.no_grad()
def sample_image_codes(
    model,
    prefixes: Sequence[torch.Tensor],
    unconditional_prefix: torch.Tensor | Sequence[torch.Tensor] | None,
    guidance_scale: float,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seeds: Sequence[int],
    decoding: str = DEFAULT_DECODING,
    window: int = JACOBI_WINDOW,
    cache: str = DEFAULT_CACHE,
    stats: dict[str, Any] | None = None,
    prior: bool | torch.Tensor = True,
    branches: Sequence[tuple[Sequence[torch.Tensor], float]] | None = None,
) -> torch.Tensor:
    """The constrained image loop: one image per prefix -> codes (N, h, w).

    `prefixes`: N 1-D id tensors, each ending with `<|boi|>` (the conditional rows).
    `unconditional_prefix`: one 1-D id tensor ending with `<|boi|>` for CFG (N unconditional rows
    are added to the same batch), a list of N of them (one per row), or None for no guidance. `seeds`: one per conditional row.
    The `<|eoi|>` after the codes is implied: callers append it (nothing is sampled for it).

    `decoding`: "jacobi" (speculative Jacobi decoding: a window of `window` tokens per forward pass,
    see `_jacobi_codes`), "sequential" (one forward pass per code) or "auto" ("jacobi" for up to
    JACOBI_AUTO_MAX_IMAGES prefixes, else "sequential": the faster one on a CPU). Both sample the same
    distribution; greedy decoding (temperature 0) gives the same codes either way, but a sampled image
    with a given seed differs between them (they use the random numbers differently), so with "auto"
    it also depends on how many images the call draws: name the method to rule that out.
    `cache`: "dynamic" (transformers' DynamicCache) or "static" (a preallocated StaticCache with
    preallocated mask and positions; sequential decoding only). `stats`, when given, receives
    "forwards" (sequential forward passes of the LLM, prefill included), "decoding" (the method used)
    and, for "jacobi", "accepted_drafts" (draft tokens accepted over all rows). `prior`: "jacobi" starts
    its drafts from the model's greedy unconditional drawing (`_draft_prior`; False: from nothing; codes
    (N, h, w): each row's own first drafts, e.g. an edit's source image).
    `branches`, in place of `unconditional_prefix` and `guidance_scale`: guidance with several other
    branches, each (N prefixes, coefficient w_g); the logits sampled are (1 - sum w_g) * conditional +
    sum w_g * branch_g (editing's two guidances, `edit_images(image_guidance_scale=...)`).
    """
    if decoding not in DECODING_METHODS:
        raise ValueError(f"decoding must be one of {DECODING_METHODS}, got {decoding!r}")
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {CACHE_KINDS}, got {cache!r}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if decoding == "auto":  # jacobi for a few images; static cache is a sequential path
        decoding = "jacobi" if len(prefixes) <= JACOBI_AUTO_MAX_IMAGES and cache != "static" else "sequential"
    if decoding == "jacobi" and cache == "static":
        raise ValueError('cache="static" is for sequential decoding; jacobi decoding uses the dynamic cache')
    config, llm = model.config, model.llm
    height, width = config.grid_size
    steps = height * width
    rows = len(prefixes)
    if len(seeds) != rows:
        raise ValueError(f"got {len(seeds)} seeds for {rows} images")
    if any(int(p[-1]) != config.boi_token_id for p in prefixes):
        raise ValueError("every image prefix must end with <|boi|>")
    if branches is not None and unconditional_prefix is not None:
        raise ValueError("pass either unconditional_prefix (with guidance_scale) or branches, not both")
    use_cfg = unconditional_prefix is not None
    if isinstance(unconditional_prefix, torch.Tensor):
        unconditional_prefix = [unconditional_prefix] * rows
    if use_cfg and len(unconditional_prefix) != rows:
        raise ValueError(f"got {len(unconditional_prefix)} unconditional prefixes for {rows} images")
    sequences = list(prefixes) + (list(unconditional_prefix) if use_cfg else [])
    coefficients = None
    if branches is not None:
        if any(len(branch) != rows for branch, _ in branches):
            raise ValueError(f"every guidance branch needs {rows} prefixes, got {[len(b) for b, _ in branches]}")
        sequences += [prefix for branch, _ in branches for prefix in branch]
        weights = [weight for _, weight in branches]
        coefficients = [1.0 - sum(weights), *weights]
    longest = max(len(s) for s in sequences)
    if longest + steps + 1 > model.context_length:
        raise ValueError(
            f"a prompt of {longest} tokens plus an image of {steps + 1} tokens exceeds the context length "
            f"{model.context_length}"
        )

    device = model.device
    input_ids, attention_mask = _left_pad(sequences, config.pad_token_id, device)  # (R, T) with R = N or 2N
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    start, end = model.vocab.image_id_range
    max_cache_len = input_ids.shape[1] + steps if cache == "static" else None
    image_logits = _ImageLogits(llm, start, end, max_cache_len=max_cache_len)
    loop = _DrawLoop(
        image_logits=image_logits,
        rows=rows,
        guidance_scale=guidance_scale if use_cfg else None,
        coefficients=coefficients,
        warpers=_image_warpers(temperature, top_k, top_p),
        generators=[_generator(device, s) for s in seeds],
        greedy=temperature == 0,
        offset=config.image_offset,
        height=height,
        width=width,
    )
    if decoding == "jacobi" and window > 1:
        if isinstance(prior, torch.Tensor):
            if prior.shape != (rows, height, width):
                raise ValueError(f"prior must be codes ({rows}, {height}, {width}), got {tuple(prior.shape)}")
            prior = prior.reshape(rows, steps).to(device)
        else:
            prior = _draft_prior(model, window) if prior else None
        codes = _jacobi_codes(loop, input_ids, attention_mask, position_ids, window, config.boi_token_id, prior)
    else:
        codes = _sequential_codes(loop, input_ids, attention_mask, position_ids)
    if stats is not None:
        stats.update(loop.stats, decoding="jacobi" if decoding == "jacobi" and window > 1 else "sequential")
    return codes.view(rows, height, width)


class _DrawLoop:
    """What both decoding methods share: the cached LLM, CFG, the warpers and one generator per image."""

    def __init__(self, image_logits, rows, guidance_scale, warpers, generators, greedy, offset, height, width,
                 coefficients: Sequence[float] | None = None):
        self.image_logits = image_logits
        self.rows = rows
        self.guidance_scale = guidance_scale  # None: no CFG rows
        # Several guidance branches: one coefficient per group of `rows` rows (the conditional rows first).
        self.coefficients = coefficients
        self.groups = len(coefficients) if coefficients is not None else (1 if guidance_scale is None else 2)
        self.warpers = warpers
        self.generators = generators
        self.greedy = greedy
        self.offset = offset
        self.height, self.width = height, width
        self.steps = height * width
        self.stats = {"forwards": 0}

    def forward(self, input_ids, attention_mask, position_ids, last: int | None = None) -> torch.Tensor:
        """One forward pass -> guided image logits of the conditional rows: (N, K) for the last position,
        or (N, last, K) for the `last` positions."""
        self.stats["forwards"] += 1
        logits = self.image_logits(input_ids, attention_mask, position_ids, last=last)
        if self.coefficients is not None:
            groups = logits.view(self.groups, self.rows, *logits.shape[1:])
            return sum(weight * group for weight, group in zip(self.coefficients, groups))
        if self.guidance_scale is None:
            return logits
        conditional, unconditional = logits[: self.rows], logits[self.rows :]
        return unconditional + self.guidance_scale * (conditional - unconditional)

    def both_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The conditional rows' tokens, repeated for the rows of each guidance branch."""
        return tokens if self.groups == 1 else torch.cat([tokens] * self.groups)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, L, K) guided logits -> (N, L, K) the distribution sampled from (one-hot at the argmax when greedy)."""
        rows, length, size = logits.shape
        flat = logits.reshape(rows * length, size)
        if self.greedy:
            return F.one_hot(flat.argmax(-1), size).to(flat.dtype).view(rows, length, size)
        # The warpers (temperature, top-k, top-p) act row by row and never read input_ids.
        warped = self.warpers(flat.new_zeros((rows * length, 0), dtype=torch.long), flat)
        return F.softmax(warped, dim=-1).view(rows, length, size)


def _sequential_codes(loop: _DrawLoop, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """One forward pass per code -> codes (N, h*w)."""
    rows, steps = loop.rows, loop.steps
    static = loop.image_logits.static
    if static:  # the whole mask and every position exist before the first step (no per-step allocation)
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], steps)], 1)
        positions = position_ids[:, -1:] + torch.arange(1, steps + 1, device=input_ids.device)  # (R, steps)
        logits = loop.forward(input_ids, full_mask, position_ids)
    else:
        logits = loop.forward(input_ids, attention_mask, position_ids)  # (N, K): prefill, cache filled
    next_position = position_ids[:, -1:] + 1  # (R, 1)
    codes = torch.empty(rows, steps, dtype=torch.long, device=input_ids.device)
    for step in range(steps):
        codes[:, step] = _sample(loop.warpers(codes[:, :step], logits), loop.generators, greedy=loop.greedy)
        if step == steps - 1:
            break
        token = loop.both_rows(codes[:, step : step + 1] + loop.offset)  # both rows of a CFG pair: same token
        if static:
            logits = loop.forward(token, full_mask, positions[:, step : step + 1])
            continue
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        logits = loop.forward(token, attention_mask, next_position)
        next_position = next_position + 1
    return codes


def _draft_prior(model, window: int) -> torch.Tensor | None:
    """Codes (h*w,) that Jacobi decoding uses as first drafts: the model's greedy drawing for its
    processor's unconditional draw prompt (None for a model without a processor).

    Drafts only change the speed, never the distribution. This one is a deterministic function of the
    model, so a seed still gives the same image on every call; it is computed once per model and prompt
    (one greedy Jacobi decode) and kept with the model. Image codes depend strongly on their grid
    position (borders, background), which this drawing already has: on the demo model it saves about a
    fifth of the passes (BENCHMARKS.md).
    """
    processor = getattr(model, "processor", None)
    if processor is None:
        return None
    prefix = _draw_prefixes(model, [processor.unconditional_draw_conversation()])[0]
    key = (tuple(int(i) for i in prefix), tuple(model.config.grid_size))
    priors = _DRAFT_PRIORS.setdefault(model, {})
    if key not in priors:
        codes = sample_image_codes(model, [prefix], None, 1.0, 0.0, None, None, [0], decoding="jacobi",
                                   window=window, prior=False)
        priors.clear()  # one prompt per model in practice; never grows
        priors[key] = codes.reshape(-1).to(model.device)
    return priors[key]


# model -> {(unconditional prompt ids, grid): codes}; weak, so a model that is dropped takes its prior along.
_DRAFT_PRIORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _jacobi_codes(loop: _DrawLoop, input_ids, attention_mask, position_ids, window: int, boi: int,
                  prior: torch.Tensor | None = None) -> torch.Tensor:
    """Speculative Jacobi decoding (Teng et al., 2024) -> codes (N, h*w): the sequential sampler's
    distribution in fewer forward passes.

    Every row keeps a "known" token (sampled from its exact distribution, not yet in the cache; at
    first `<|boi|>`) and `window - 1` draft tokens after it, each with the distribution q it was
    drawn from. One forward pass feeds the known token and the drafts; output m is the exact
    distribution p of draft m + 1's position as long as drafts 1..m are accepted. Drafts are
    accepted left to right with probability min(1, p(x) / q(x)); the first rejected one is replaced
    by a sample of the residual max(0, p - q) (normalised), and if all are accepted the last output
    gives one more exact sample. That is speculative sampling's rule, so every code has the
    sequential sampler's distribution whatever the drafts are; good drafts only make it faster.

    Drafts: after a rejection, the window's later outputs (conditioned on the rejected drafts) become
    the next drafts' q. A position that already had a draft keeps it with probability
    min(1, q_new(x) / q_old(x)) and otherwise samples the residual max(0, q_new - q_old): its draft has
    law q_new but changes as little as possible between passes (a maximal coupling, as in MC-SJD),
    so drafts settle and get accepted. Positions with no output yet get a deterministic draft (q
    one-hot): the `prior`'s code there (`_draft_prior`: (h*w,) for every row, or (N, h*w) per row), else
    the code one image row above (or the code before it in the first row).

    Cache: rejected drafts' keys stay in the DynamicCache but are masked out of the attention mask
    (rows of a batch accept different numbers of drafts); the columns no row kept are cropped.
    Under greedy decoding p and q are one-hot and this gives exactly the sequential codes.
    """
    rows, steps, width = loop.rows, loop.steps, loop.width
    device = input_ids.device
    cache = loop.image_logits.cache
    size = loop.image_logits.end - loop.image_logits.start  # K
    slots = window - 1  # drafts per row and pass
    # The first pass is also the prefill: the prompts without their final <|boi|> (every row's first known
    # token), then the pass's tokens.
    prefix_ids, prefix_positions = input_ids[:, :-1], position_ids[:, :-1]
    attention_mask = attention_mask[:, :-1]
    known_position = position_ids[:, -1].clone()  # (R,) position of each row's known token
    done = [0] * rows  # codes decided per row; the known token is code done - 1 (or <|boi|>)
    known = [None] * rows  # the known code (None: <|boi|>)
    codes = torch.zeros(rows, steps, dtype=torch.long, device=device)
    # Drafts for codes done, done + 1, ... (the first min(slots, steps - done) of each row count) and the
    # distribution each was drawn from (one-hot for a deterministic draft).
    drafts = torch.zeros(rows, max(slots, 1), dtype=torch.long, device=device)
    draft_q = torch.zeros(rows, max(slots, 1), size, device=device)
    accepted_total = 0

    def guesses(row: int, first: int, count: int, known_drafts: torch.Tensor) -> torch.Tensor:
        """Deterministic drafts for codes first .. first + count - 1 that follow `known_drafts` (drafts for
        the codes just before them): the prior's codes, else the code above (or before) each."""
        if prior is not None:
            return prior[first : first + count] if prior.dim() == 1 else prior[row, first : first + count]
        values = list(known_drafts.tolist())
        origin = first - len(values)  # code index of values[0]
        out = []
        for index in range(first, first + count):
            source = index - width if index >= width else index - 1
            if source < 0:
                value = 0
            elif source >= origin:
                value = values[source - origin]
            else:
                value = int(codes[row, source])
            values.append(value)
            out.append(value)
        return torch.tensor(out, dtype=torch.long, device=device)

    def set_drafts(row: int, first: int, derived: torch.Tensor, derived_q: torch.Tensor) -> None:
        """Drafts of `row` for codes first ...: `derived` (with their q), then deterministic guesses."""
        total = min(slots, steps - first)
        rest = guesses(row, first + len(derived), total - len(derived), derived)
        drafts[row, : len(derived)] = derived
        draft_q[row, : len(derived)] = derived_q
        drafts[row, len(derived) : total] = rest
        draft_q[row, len(derived) : total] = F.one_hot(rest, size).to(draft_q.dtype)

    empty = torch.zeros(0, dtype=torch.long, device=device)
    for row in range(rows):
        set_drafts(row, 0, empty, draft_q.new_zeros(0, size))

    while any(d < steps for d in done):
        length = 1 + max(min(slots, steps - d) for d in done if d < steps)  # known + drafts
        tokens = torch.cat([torch.zeros(rows, 1, dtype=torch.long, device=device), drafts[:, : length - 1]], 1)
        tokens = tokens + loop.offset
        for row in range(rows):
            tokens[row, 0] = boi if known[row] is None else known[row] + loop.offset
        positions = known_position[:, None] + torch.arange(length, device=device)  # (R, L)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], length)], 1)
        pass_ids = loop.both_rows(tokens)
        if prefix_ids is not None:
            pass_ids, positions = torch.cat([prefix_ids, pass_ids], 1), torch.cat([prefix_positions, positions], 1)
            prefix_ids = None
        p = loop.probabilities(loop.forward(pass_ids, attention_mask, positions, last=length))  # (N, L, K)
        keep = [0] * rows  # columns of this pass each row keeps in its cache (the known token + accepted drafts)
        for row in range(rows):
            if done[row] >= steps:
                continue
            generator, count = loop.generators[row], min(length - 1, steps - done[row])
            x, q = drafts[row, :count], draft_q[row, :count]  # (count,), (count, K)
            accepted = 0
            if count:
                p_x = p[row, :count].gather(-1, x[:, None])[:, 0]
                q_x = q.gather(-1, x[:, None])[:, 0]
                coins = torch.rand(count, generator=generator, device=device)
                accepted = int(torch.cumprod((coins * q_x < p_x).long(), 0).sum())
            keep[row] = 1 + accepted
            start = done[row]
            codes[row, start : start + accepted] = x[:accepted]
            accepted_total += accepted
            if accepted < count:  # the first rejected draft: a sample of the residual
                new_code = _sample_rows(p[row, accepted : accepted + 1], q[accepted : accepted + 1], generator,
                                        loop.greedy)[0]
            elif start + accepted < steps:  # all accepted: the last output is exact
                new_code = _sample_rows(p[row, accepted : accepted + 1], None, generator, loop.greedy)[0]
            else:
                new_code = None  # the image is complete
            done[row] = start + accepted
            if new_code is not None:
                codes[row, done[row]] = new_code
                done[row] += 1
                known[row] = int(new_code)
            known_position[row] += accepted + 1
            for group in range(1, loop.groups):  # its guidance rows (other prompt lengths) move alike
                known_position[group * rows + row] += accepted + 1
            if done[row] >= steps:
                continue
            # Next drafts for codes done[row], ...: this pass's later outputs (p[row, m] is its distribution
            # for code start + m), coupled with the drafts these codes had, then guesses.
            first = done[row]
            derived = 0
            if accepted < count:
                derived = max(0, min(slots, steps - first, length - (first - start)))
            outputs = p[row, first - start : first - start + derived]  # (derived, K)
            with_old = max(0, min(derived, count - (first - start)))  # codes that had a draft this pass
            new = torch.cat([
                _couple_rows(outputs[:with_old], q[first - start : first - start + with_old],
                             x[first - start : first - start + with_old], generator, loop.greedy),
                _sample_rows(outputs[with_old:], None, generator, loop.greedy),
            ])
            set_drafts(row, first, new, outputs)
        # Masks: a row's columns after what it kept are dropped; columns no row kept leave the cache.
        kept_columns = max(keep)
        for row in range(rows):
            if keep[row] < kept_columns:
                attention_mask[row, attention_mask.shape[1] - length + keep[row] :] = 0
                for group in range(1, loop.groups):
                    attention_mask[group * rows + row, attention_mask.shape[1] - length + keep[row] :] = 0
        if kept_columns < length:
            cache.crop(-(length - kept_columns))
            attention_mask = attention_mask[:, : attention_mask.shape[1] - (length - kept_columns)]
    loop.stats["accepted_drafts"] = accepted_total
    return codes


def _sample_rows(p: torch.Tensor, q: torch.Tensor | None, generator: torch.Generator, greedy: bool) -> torch.Tensor:
    """One code per row of p (n, K), or of the residual max(0, p - q) normalised where q (n, K) is given
    (a row whose residual is empty, p == q, samples p itself)."""
    if len(p) == 0:
        return torch.zeros(0, dtype=torch.long, device=p.device)
    if q is not None:
        residual = (p - q).clamp(min=0)
        p = torch.where(residual.sum(-1, keepdim=True) > 1e-12, residual, p)
    if greedy:
        return p.argmax(-1)
    return torch.multinomial(p, 1, generator=generator)[:, 0]


def _couple_rows(q_new: torch.Tensor, q_old: torch.Tensor, old: torch.Tensor, generator: torch.Generator,
                 greedy: bool) -> torch.Tensor:
    """Drafts with law q_new (n, K) that equal the old drafts `old` (n,), drawn from q_old, as often as
    possible: each is kept with probability min(1, q_new(old) / q_old(old)), else resampled from the
    residual max(0, q_new - q_old) (a maximal coupling)."""
    if greedy or len(q_new) == 0:
        return q_new.argmax(-1) if len(q_new) else old[:0]
    coins = torch.rand(len(old), generator=generator, device=old.device)
    kept = coins * q_old.gather(-1, old[:, None])[:, 0] < q_new.gather(-1, old[:, None])[:, 0]
    return torch.where(kept, old, _sample_rows(q_new, q_old, generator, greedy))


# ---------------------------------------------------------------------------- chat
@torch.no_grad()
def chat(
    model,
    conversation: Conversation,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    guidance_scale: float = 1.0,
    image_temperature: float = DRAW_TEMPERATURE,
    image_top_k: int | None = None,
    image_top_p: float | None = None,
    max_images: int = 4,
    reply_prefix: Sequence[int] | None = None,
    decoding: str = DEFAULT_DECODING,
) -> dict[str, Any]:
    """The assistant's next turn: {"text": str, "images": [PIL, ...]}.

    Text is generated until the end of turn or `<|boi|>`. After `<|boi|>` an image is generated
    (constrained; CFG against the unconditional draw prompt when guidance_scale != 1), `<|eoi|>`
    is appended and text generation continues, until the end of turn, a `stop` string, the token
    budget or the context length. At most `max_images` images per turn.

    `max_new_tokens` is the budget of the whole reply: its text tokens AND each drawn image's h*w + 2
    tokens (`<|boi|>`, the codes, `<|eoi|>`), as a server's usage counts them. An image is only started
    when it fits both the budget and the context: `<|boi|>` is suppressed wherever the image would not
    fit (the reply goes on with text), so a reply never fails half-way for lack of room.
    `reply_prefix`: ids the reply already has (e.g. text a server streamed, ending in `<|boi|>`): the turn
    continues from them instead of starting over, so its text begins with theirs; they count towards
    the budget. A prefix that ends in `<|boi|>` has its image drawn first, if it fits; if not, that
    `<|boi|>` is dropped and the reply goes on with text. A prompt (with the prefix) over the context
    length is a ValueError before anything is generated. `decoding`: how images are decoded
    (`sample_image_codes`).
    """
    if decoding not in DECODING_METHODS:
        raise ValueError(f"decoding must be one of {DECODING_METHODS}, got {decoding!r}")
    config = model.config
    boi, eoi = config.boi_token_id, config.eoi_token_id
    per_image = config.image_tokens_per_image + 2
    stop_strings = _stop_list(stop)
    with _generation_mode(model), _seeded(seed, model.device):
        # Image seeds come from the (seeded) global RNG, so one chat seed fixes text and images.
        prompt = _encode_prompts(model, [conversation])["input_ids"][0]
        generated: list[int] = [int(i) for i in reply_prefix or ()]
        if len(prompt) + len(generated) > model.context_length:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) and the reply prefix ({len(generated)} tokens) exceed "
                f"the context length {model.context_length}"
            )
        limit = min(model.context_length, len(prompt) + max_new_tokens)  # the reply ends by this length
        edit_turn = edit_order(conversation)
        image_codes: list[torch.Tensor] = []
        draw = bool(generated) and generated[-1] == boi
        if draw and len(prompt) + len(generated) - 1 + per_image > limit:
            generated.pop()  # the prefix's image does not fit: it is not started
            draw = False
        while True:
            if not draw:
                if len(prompt) + len(generated) >= limit:
                    break
                # The reply's first token on a turn of an image then text: `config.chat_image_threshold`.
                floor = config.chat_image_threshold if edit_turn is not None and not generated else None
                new = _next_text(model, prompt, generated, limit, len(image_codes) < max_images, temperature,
                                 top_k, top_p, stop_strings, image_floor=floor)
                generated += new
                if not new or new[-1] != boi:
                    break
            draw = False
            if edit_turn is not None and not image_codes:
                # An edit request sent image first (as chat clients send it): its image is drawn from the turn
                # read in the order edits are trained in, which draws them far better (docs/editing.md). The
                # reply so far is the same; the budget stays the reply's.
                reordered = _encode_prompts(model, [edit_turn])["input_ids"][0]
                reordered_limit = min(model.context_length, len(reordered) + (limit - len(prompt)))
                if len(reordered) + len(generated) - 1 + per_image <= reordered_limit:
                    limit, prompt = reordered_limit, reordered
            unconditional = None
            if guidance_scale != 1.0:
                unconditional = _draw_prefixes(model, [model.processor.unconditional_draw_conversation()])[0]
            image_seed = int(torch.randint(0, 2**31 - 1, (1,)))
            prefix = torch.tensor(prompt.tolist() + generated, device=model.device)
            codes = sample_image_codes(
                model,
                [prefix],
                unconditional,
                guidance_scale,
                image_temperature,
                image_top_k,
                image_top_p,
                [image_seed],
                decoding=decoding,
            )[0]
            image_codes.append(codes.cpu())
            generated += (codes.reshape(-1) + config.image_offset).tolist() + [eoi]
        text = _finish_text(model, generated, stop_strings)
        ended = bool(generated) and generated[-1] in _end_of_reply_ids(model)
        stopped = any(s in model.processor.decode_text(generated) for s in stop_strings)
    images = model.vision_tokenizer.decode_images(torch.stack(image_codes)) if image_codes else []
    # completion_tokens: the reply's tokens, images included (h*w + 2 each), as a server's usage counts them
    return {"text": text, "images": images, "completion_tokens": len(generated),
            "finish_reason": "stop" if ended or stopped else "length"}


# ---------------------------------------------------------------------------- helpers
def edit_order(conversation: Conversation) -> Conversation | None:
    """The conversation with its last user turn read as an edit request is trained (`processor.edit_conversation`:
    the instruction, then the image), when that turn is one image followed by text, as chat clients send an
    edit; None when the turn is anything else (already instruction first, no image, several images, ...).

    Chat decides whether to draw from the turn as sent (models are trained to start an image for both orders,
    `edit_image_first`), and draws from this reading: the decision is the same, the edit much better."""
    if not conversation or conversation[-1].get("role") != "user":
        return None
    content = conversation[-1].get("content")
    if isinstance(content, str):
        return None
    if not isinstance(content, (list, tuple)) or not all(isinstance(part, dict) for part in content):
        return None
    kinds = ["image" if part.get("type") in ("image", "image_url") else part.get("type") for part in content]
    if kinds.count("image") != 1 or kinds[0] != "image" or "text" not in kinds:
        return None
    texts = [part for part in content if part.get("type") == "text"]
    return [*conversation[:-1], {**conversation[-1], "content": [*texts, content[0]]}]


def _next_text(model, prompt: torch.Tensor, generated: list[int], limit: int, may_draw: bool, temperature,
               top_k, top_p, stop_strings: list[str], image_floor: float | None = None) -> list[int]:
    """chat(): the next stretch of reply text after prompt + generated, up to the end of turn, the
    `limit` (total length) or `<|boi|>`. `<|boi|>` is allowed (when `may_draw`) only where its image
    (h*w + 2 tokens) still fits under `limit`; with `image_floor`, the first token is `<|boi|>` whenever
    the model gives it at least that chance (`_ImageStart`)."""
    config = model.config
    ids = torch.tensor([prompt.tolist() + generated], device=model.device)
    last_start = limit - (config.image_tokens_per_image + 2)  # the longest sequence an image may follow
    can_draw = may_draw and ids.shape[1] <= last_start
    ends, boi = _end_of_reply_ids(model), config.boi_token_id
    processors: list[LogitsProcessor] = []
    if can_draw:
        processors.append(_ImageRoom(boi, last_start))
        if image_floor is not None:
            processors.append(_ImageStart(boi, ids.shape[1], [image_floor]))
    return _generate_ids(model, ids, torch.ones_like(ids), limit - ids.shape[1], temperature, top_k, top_p,
                         stop_strings, stop_ids=[*ends, boi] if can_draw else ends, allow_boi=can_draw,
                         logits_processors=processors or None)[0]


def image_start_chances(model, conversations: Sequence[Conversation]) -> list[float]:
    """The chance the model gives `<|boi|>` as the first token of its reply to each conversation, among the
    tokens chat may start a reply with (image ids and other control tokens suppressed, as `chat` does): what
    `config.chat_image_threshold` is compared with. One forward pass per conversation."""
    return [chance for chance, _ in image_start_decisions(model, conversations)]


def image_start_decisions(model, conversations: Sequence[Conversation]) -> list[tuple[float, bool]]:
    """`image_start_chances`, each with whether `<|boi|>` is the likeliest first token (the plain greedy
    decision to start an image)."""
    config = model.config
    ends, boi = _end_of_reply_ids(model), config.boi_token_id
    suppressed = _suppressed_ids(model, [*ends, boi], allow_boi=True)
    out = []
    with _generation_mode(model), torch.no_grad():
        for conversation in conversations:
            batch = _encode_prompts(model, [conversation])
            ids = batch["input_ids"][:, batch["attention_mask"][0].bool()]
            logits = model.llm(input_ids=ids).logits[0, -1].float()
            logits[suppressed] = -float("inf")
            out.append((float(torch.softmax(logits, dim=-1)[boi]), int(logits.argmax()) == boi))
    return out


class _ImageStart(LogitsProcessor):
    """At sequence length `at` (the reply's first token): `<|boi|>` in each row whose chance of it, from the
    scores as they reach this processor (after the suppression of ids a reply may not start with; before
    temperature), is at least the row's floor (`config.chat_image_threshold`; None: the row is left alone).
    `floors`: one per row of the batch."""

    def __init__(self, boi_token_id: int, at: int, floors: Sequence[float | None]) -> None:
        self.boi_token_id, self.at = boi_token_id, at
        self.floors = torch.tensor([2.0 if floor is None else floor for floor in floors])  # 2: never reached

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.at:
            return scores
        chance = torch.softmax(scores.float(), dim=-1)[:, self.boi_token_id]
        forced = chance >= self.floors.to(chance.device)
        if not bool(forced.any()):
            return scores
        scores = scores.clone()
        scores[forced] = -float("inf")
        scores[forced, self.boi_token_id] = 0.0
        return scores


class _ImageRoom(LogitsProcessor):
    """Suppresses `<|boi|>` once the sequence is longer than `last_start`: an image started later would
    not fit (the context or the reply's token budget)."""

    def __init__(self, boi_token_id: int, last_start: int) -> None:
        self.boi_token_id, self.last_start = boi_token_id, last_start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] <= self.last_start:
            return scores
        scores = scores.clone()
        scores[:, self.boi_token_id] = -float("inf")
        return scores


def _check_image_room(model, prompts: Sequence[str], prefixes: Sequence[torch.Tensor]) -> None:
    """Each draw prefix (ending in <|boi|>) + h*w codes + <|eoi|> must fit the context."""
    height, width = model.config.grid_size
    per_image = height * width + 2
    for prompt, prefix in zip(prompts, prefixes):
        needed = len(prefix) - 1 + per_image
        if needed > model.context_length:
            shown = prompt if len(prompt) <= 60 else prompt[:60] + "..."
            raise ValueError(
                f"the draw prompt {shown!r} takes {len(prefix) - 1} tokens and its image {per_image} more "
                f"(<|boi|>, {height}x{width} codes, <|eoi|>): {needed} tokens, over the context length "
                f"{model.context_length}"
            )


def _as_conversation_list(conversations) -> list[Conversation]:
    if isinstance(conversations, Sequence) and conversations and isinstance(conversations[0], dict):
        return [list(conversations)]  # one conversation
    return [list(c) for c in conversations]


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def _encode_prompts(model, conversations: list[Conversation]) -> dict[str, torch.Tensor]:
    """Generation prompts -> left-padded `input_ids` and `attention_mask` on the device (no labels: a
    prompt needs none, and finding reply spans would cost more than rendering)."""
    batch = model.processor(
        conversations,
        add_generation_prompt=True,
        padding_side="left",
        max_length=model.context_length,
        return_labels=False,
    )
    length = batch["input_ids"].shape[1]
    if length >= model.context_length:
        raise ValueError(f"the prompt has {length} tokens; the context length is {model.context_length}")
    return {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask")}


def _draw_prefixes(model, conversations: list[Conversation]) -> list[torch.Tensor]:
    """Draw conversations -> 1-D prompt ids (generation prompt included) + <|boi|>, on the device."""
    batch = _encode_prompts(model, conversations)
    boi = torch.tensor([model.config.boi_token_id], device=model.device)
    return [
        torch.cat([ids[mask.bool()], boi]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])
    ]


def _generate_ids(
    model,
    input_ids,
    attention_mask,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    stop,
    stop_ids,
    allow_boi,
    streamer=None,
    stopping_criteria=None,
    logits_processors=None,
) -> list[list[int]]:
    """`model.llm.generate()` for text: image ids (and <|boi|> unless allowed) suppressed, and every other
    control token of the text tokenizer that is not a stop id (bos, pad, unk, role markers, ...): they decode
    to nothing, so an undertrained model that prefers one would otherwise fill the reply with ids of no
    text (a reply of `max_new_tokens` ids and '' text).

    Returns the new ids of each row up to and including the first stop id. `streamer` (a transformers
    BaseStreamer: `put` gets the prompt, then each step's (B,) new ids) and `stopping_criteria` (a
    StoppingCriteriaList, e.g. per-row budgets or cancellation) are passed to `generate` (the server's
    engine uses them); `logits_processors` are applied after the suppression.
    """
    config = model.config
    suppressed = _suppressed_ids(model, stop_ids, allow_boi)
    sampling = temperature > 0
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        # 0 / 1.0 switch the warpers off explicitly (None would take the model's or the library's defaults).
        top_k=(top_k or 0) if sampling else None,
        top_p=(top_p or 1.0) if sampling else None,
        eos_token_id=list(stop_ids),
        pad_token_id=config.pad_token_id,
        stop_strings=_stop_list(stop) or None,
        use_cache=True,
    )
    output = model.llm.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=generation_config,
        logits_processor=LogitsProcessorList(
            [SuppressTokensLogitsProcessor(suppressed, device=input_ids.device), *(logits_processors or ())]
        ),
        tokenizer=model.processor.text_tokenizer,  # read by the stop-string criterion only
        streamer=streamer,
        stopping_criteria=stopping_criteria,
    )
    new_rows = []
    for row in output[:, input_ids.shape[1] :].tolist():
        for position, token in enumerate(row):
            if token in stop_ids:
                row = row[: position + 1]
                break
        new_rows.append(row)
    return new_rows


def _suppressed_ids(model, stop_ids: Sequence[int], allow_boi: bool) -> list[int]:
    """The ids text generation never emits: image ids (and padding rows) and every control id of the text
    tokenizer that is not a stop id (nor `<|boi|>` where it is allowed)."""
    config = model.config
    vocab_rows = model.llm.get_output_embeddings().weight.shape[0]
    allowed = set(stop_ids) | ({config.boi_token_id} if allow_boi else set())
    control = special_token_ids(model.processor.text_tokenizer) | {
        config.boi_token_id, config.eoi_token_id, config.image_token_id}
    return list(range(config.image_offset, vocab_rows)) + sorted(
        i for i in control if i not in allowed and 0 <= i < config.image_offset)


def _end_of_reply_ids(model) -> list[int]:
    """The ids that end a text reply: the template's end of turn, and the text tokenizer's eos where it is
    another token (a base model closes its text with eos; generation must stop there, not go on with ids
    that decode to nothing)."""
    end = model.config.end_of_turn_token_id
    eos = model.processor.text_tokenizer.eos_token_id
    return [end] if eos is None or int(eos) == end else [end, int(eos)]


def _finish_text(model, ids: list[int], stop: str | Sequence[str] | None) -> str:
    text = model.processor.decode_text(ids)
    for stop_string in _stop_list(stop):
        cut = text.find(stop_string)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


def _left_pad(sequences: Sequence[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long, device=device)
    for row, sequence in enumerate(sequences):
        input_ids[row, longest - len(sequence) :] = sequence.to(device)
        attention_mask[row, longest - len(sequence) :] = 1
    return input_ids, attention_mask


def _image_warpers(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    warpers = LogitsProcessorList()
    if temperature > 0 and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def _sample(logits: torch.Tensor, generators: list[torch.Generator], greedy: bool) -> torch.Tensor:
    """(N, K) warped logits -> (N,) codes."""
    if greedy:
        return logits.argmax(-1)
    probs = F.softmax(logits, dim=-1)
    # One generator per row: a row's sample does not depend on the other rows of the batch.
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def _prompt_seeds(seed: int | Sequence[int] | None, count: int) -> list[int]:
    if seed is None:
        return torch.randint(0, 2**31 - 1, (count,)).tolist()
    if isinstance(seed, int):
        return [seed] * count
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} prompts")
    return seeds


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


def _cache_argument(module: nn.Module) -> str:
    """transformers 5.x renamed the forward argument `past_key_values` to `cache`; accept both."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class _ImageLogits:
    """Forward steps of the LLM with a KV cache, returning only the image-id logits in fp32: (R, K) for
    the last position, or (R, last, K) for the `last` positions.

    The cache is a DynamicCache, or with `max_cache_len` a StaticCache of that length (its mask then
    covers the whole cache: callers pass a preallocated one)."""

    def __init__(self, llm: nn.Module, start: int, end: int, max_cache_len: int | None = None):
        self.start, self.end = start, end
        self.static = max_cache_len is not None
        if self.static:
            self.cache = StaticCache(config=llm.config, max_cache_len=max_cache_len)
        else:
            self.cache = DynamicCache(config=llm.config)
        head = llm.get_output_embeddings()
        model_type = getattr(llm.config, "model_type", None)
        if model_type in _PLAIN_HEAD_MODEL_TYPES and type(head) is nn.Linear:
            self.body = llm.get_decoder()
            self.weight = head.weight[start:end]  # (K, H): a view, no copy
            self.bias = head.bias[start:end] if head.bias is not None else None
        else:
            # The transformers model under a peft wrapper (its LoRA layers are injected in place, so
            # calling it directly keeps them): its forward names the cache argument.
            base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
            self.body, self.weight, self.bias = base, None, None
        self.cache_argument = _cache_argument(self.body)
        self.keeps_last = "logits_to_keep" in inspect.signature(self.body.forward).parameters

    def __call__(self, input_ids, attention_mask, position_ids, last: int | None = None) -> torch.Tensor:
        kwargs = {self.cache_argument: self.cache, "use_cache": True}
        if self.weight is None and self.keeps_last:
            kwargs["logits_to_keep"] = last or 1
        output = self.body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        keep = -1 if last is None else slice(-last, None)
        if self.weight is None:
            return output.logits[:, keep, self.start : self.end].float()
        hidden = output.last_hidden_state[:, keep]  # (R, H) or (R, L, H)
        return F.linear(hidden, self.weight, self.bias).float()


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG inside the block and restore its state afterwards."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def _generation_mode(model) -> Iterator[None]:
    """Eval mode (restored afterwards) and, in codebook mode, image rows of the input embedding
    matrix synced from the projector, so id-based decoding with a KV cache sees the same embeddings
    as the embedding path."""
    was_training = model.training
    model.eval()
    try:
        if model.config.embedding_mode == "codebook":
            with torch.no_grad():
                model.sync_image_embeddings()
        yield
    finally:
        model.train(was_training)
