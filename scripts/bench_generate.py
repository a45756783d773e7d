"""Image generation with CFG: five decoders side by side on one model, in one run.

    python scripts/bench_generate.py [--model DIR | --llama-100m] [--device auto] [--dtype fp32|bf16|fp16]
        [--attn sdpa|eager|flash_attention_2] [--methods generate janus sequential static jacobi]
        [--batch-sizes 1 8 32] [--repeats 5] [--guidance 3.0] [--temperature 0.6] [--window N] [--threads N]
        [--bandwidth-mib 512] [--seed 0] [--quick]

The model: --model DIR, or (default) a fresh demo-sized model (`mllm init --llm shapes --vision-tokenizer
shapes`: Llama, 3 layers of 512, 8x8 codes, K = 1024) built in a temp folder, or --llama-100m: a randomly
initialised (seeded) Llama of 116M parameters (hidden 768, 12 layers, 12 heads, MLP 3072; 113M without the
embedding tables) saved with a shapes text tokenizer as a local base folder and extended by `init_model(llm=
that folder, vision_tokenizer="shapes")`, loaded in bf16 unless --dtype says otherwise. Random weights are
fine here: every method below samples exactly h*w codes whatever the logits (but see `jacobi`).

Methods (--methods picks a subset; all sample with the same --guidance and --temperature, top-k/top-p off):

  generate    `model.llm.generate()` with transformers' CFG processor
              (`UnbatchedClassifierFreeGuidanceLogitsProcessor`: the unconditional branch is a SECOND,
              separate forward per token, over the full vocabulary), a logits processor that allows image
              ids only, min_new_tokens = max_new_tokens = h*w.
  janus       transformers' own Janus image path, `JanusForConditionalGeneration.generate(...,
              generation_mode="image")`, on a randomly initialised Janus whose language model has this
              model's LLM config (hidden size, layers, heads, KV heads, MLP size, vocabulary rows) and whose
              image-token count is our h*w and image vocabulary our K; the same prompt ids, attention and
              dtype. CFG the way Janus does it: rows doubled in one batch (the unconditional rows are the
              prompt with every token but BOS and <|boi|> replaced by pad), guidance_scale through
              `ClassifierFreeGuidanceLogitsProcessor`, StaticCache, per step its generation head (H -> H ->
              K) and generation aligner (8 -> H -> H). Its image `generate` returns the codes and decodes
              no pixels (the VQ decoder is a separate `decode_image_tokens` call, never made here), so the
              timed call is token generation only; its unused vision tower and VQ model are kept tiny.
  sequential  `generate_images(decoding="sequential", cache="dynamic")`: the project's loop, conditional
              and unconditional rows in one batch, one forward per token, image rows of the head only.
  static      `generate_images(decoding="sequential", cache="static")`: the same loop on a StaticCache.
  jacobi      `generate_images(decoding="jacobi")` (its default cache): speculative Jacobi decoding, fewer
              sequential forwards per image, each over several tokens (--window: tokens per forward,
              default generate_images' own). Its acceptance rate, and so its forward count, depends on
              the weights: a random model's figure says nothing of a trained model's.

A method the installed `generate_images` cannot run (no `decoding` / `cache` parameter yet) is skipped with a
printed note; without a `decoding` parameter, `sequential` is today's loop (a DynamicCache loop). A method
that raises is skipped with its error printed, and the others still run.

Figures, per method and batch size (medians of --repeats timed calls after one untimed warm-up call; call r
uses seed r and the prompt list rotated by r, at batch 1 prompt r mod 8, the same for every method):

  forwards / image   sequential LLM forward passes an image goes through, prefill included (one call
                     draws the whole batch, so this is the count per call). Ours: `stats["forwards"]` from
                     `generate_images(..., stats=...)`; where that parameter is missing, and for generate
                     and janus, a forward hook on the language model counts its calls. generate runs 2 per
                     token with CFG (conditional, then unconditional: 2*h*w; h*w at --guidance 1), janus
                     and sequential/static h*w, jacobi fewer.
  ms / image         1000 * seconds per call / batch (the latency figure at batch 1).
  images/s           batch / seconds per call (the throughput figure at batch 8 and 32).
  ms / forward       seconds per call / forwards.
  of bw bound        (bound per forward) / (ms / forward). The bound is the weight bytes one forward must
                     read over the device's copy bandwidth, measured in the same run (bytes read + written
                     of a large tensor copy). Weight bytes per forward: every weight of the LLM but its
                     input embedding table, of which a step reads a few rows (the full LM head is counted,
                     though our loop reads only its K image rows); for janus its language model without
                     the embedding table + generation head + generation aligner. A jacobi forward runs
                     several tokens a row but reads the weights once: the same bound. KV-cache reads are
                     not counted, so the bound is a floor, and small models sit far from it (per-layer
                     launch overhead dominates).
  vs sequential,     seconds of `sequential` (resp. `generate`) / seconds of the method, same batch size,
  vs generate        same run; "-" where the reference did not run.
  stats              (JSON only) generate_images' other stats, medians over the repeats: for jacobi
                     "accepted_drafts", the draft tokens accepted over all rows of a call.

Prints the settings, a markdown table, notes (skips, failures, forward-count sources) and, last, one JSON
line with every figure (`main()` returns the same dict). `--quick` (repeats 1, batch 1 only, a bandwidth
probe of at most 128 MiB) is for tests and smoke runs; --threads 1 keeps CPU timings steady on a busy
machine. The final figures come from a quiet machine with the default settings.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from perf import median

PROMPTS = [
    "a red circle at the top left",
    "a large blue square in the center",
    "a small green triangle at the bottom",
    "a yellow circle on the right and a purple square on the left",
    "an orange triangle at the top right",
    "a small red square at the bottom left",
    "a large green circle at the top",
    "a blue triangle on the left and a yellow square at the bottom right",
]
METHODS = ("generate", "janus", "sequential", "static", "jacobi")
# --llama-100m: 12 x (4 * 768^2 + 3 * 768 * 3072) = 113M parameters without the embedding tables.
LLAMA_100M = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
              "intermediate_size": 3072, "max_position_embeddings": 1024}


# ---------------------------------------------------------------------------- forward counting
class ForwardCounter:
    """Counts the calls of a module's forward (a forward hook), from `reset()` on."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.count += 1

    def reset(self) -> None:
        self.count = 0

    def remove(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------- methods
class ImageIdsOnly:
    """LogitsProcessor for the `generate()` baseline: every id outside [start, end) gets -inf."""

    def __init__(self, start: int, end: int, vocab_rows: int, device) -> None:
        self.blocked = torch.ones(vocab_rows, dtype=torch.bool, device=device)
        self.blocked[start:end] = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(self.blocked, float("-inf"))


def _sampling(temperature: float) -> dict:
    """GenerationConfig sampling settings equal to generate_images' (top-k and top-p switched off)."""
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


def _prompt_batch(model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw prefixes generate_images uses (draw conversation + generation prompt + <|boi|>), left-padded."""
    from mllm.generation import _draw_prefixes, _left_pad

    prefixes = _draw_prefixes(model, [model.processor.draw_conversation(p) for p in prompts])
    return _left_pad(prefixes, model.config.pad_token_id, model.device)


def generate_baseline(model, prompts: list[str], guidance_scale: float, temperature: float, seed: int):
    """transformers generate() + its CFG processor -> (codes (B, h*w), None: forwards come from a hook)."""
    from transformers import GenerationConfig, LogitsProcessorList

    from mllm.generation import _draw_prefixes

    config = model.config
    steps = config.image_tokens_per_image
    input_ids, attention_mask = _prompt_batch(model, prompts)
    vocab_rows = model.llm.get_output_embeddings().weight.shape[0]
    cfg = {}
    if guidance_scale != 1.0:
        unconditional = _draw_prefixes(model, [model.processor.unconditional_draw_conversation()])[0]
        negative = unconditional[None].expand(len(prompts), -1)
        cfg = {"negative_prompt_ids": negative, "negative_prompt_attention_mask": torch.ones_like(negative)}
    generation_config = GenerationConfig(
        **_sampling(temperature),
        max_new_tokens=steps,
        min_new_tokens=steps,
        guidance_scale=guidance_scale if guidance_scale != 1.0 else None,
        eos_token_id=None,
        pad_token_id=config.pad_token_id,
        use_cache=True,
    )
    torch.manual_seed(seed)
    output = model.llm.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=generation_config,
        logits_processor=LogitsProcessorList(
            [ImageIdsOnly(*model.vocab.image_id_range, vocab_rows, model.device)]
        ),
        **cfg,
    )
    return output[:, input_ids.shape[1] :] - config.image_offset, None


def build_janus(model, seed: int = 0):
    """A randomly initialised `JanusForConditionalGeneration` at our model's LLM size, h*w and K."""
    from transformers import JanusConfig, JanusForConditionalGeneration
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    text_config = copy.deepcopy(model.llm.config)  # hidden, layers, heads, KV heads, MLP, rope: all ours
    text_config.vocab_size = model.llm.get_input_embeddings().weight.shape[0]
    text_config.tie_word_embeddings = True  # Janus ties its text head; image generation never uses it
    hidden = text_config.hidden_size
    height, width = model.config.grid_size
    # Unused while drawing: a minimal vision tower (prompt images only) and VQ model (pixel decoding only).
    vision_config = JanusVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=1, image_size=8 * height, patch_size=8,
        projection_dim=hidden, depth=1, num_image_tokens=height * width,
    )
    vq_config = JanusVQVAEConfig(
        embed_dim=8, num_embeddings=model.config.codebook_size, latent_channels=32, base_channels=32,
        channel_multiplier=[1], num_res_blocks=1, projection_dim=hidden, image_token_embed_dim=hidden,
    )
    config = JanusConfig(text_config=text_config, vision_config=vision_config, vq_config=vq_config,
                         image_token_id=model.config.image_token_id)
    torch.manual_seed(seed)
    janus = JanusForConditionalGeneration._from_config(
        config, dtype=model.dtype, attn_implementation=model.llm.config._attn_implementation
    )
    return janus.to(model.device).eval()


def janus_weight_bytes_per_step(janus) -> int:
    """Bytes one Janus image step reads: its language model but the embedding table, generation head and aligner."""
    language_model = janus.model.language_model
    modules = (language_model, janus.model.generation_head, janus.model.generation_aligner)
    total = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    embedding = language_model.get_input_embeddings().weight
    return total - embedding.numel() * embedding.element_size()


def janus_method(janus):
    def run(model, prompts: list[str], guidance_scale: float, temperature: float, seed: int):
        from transformers import GenerationConfig

        input_ids, attention_mask = _prompt_batch(model, prompts)
        tokenizer = model.processor.text_tokenizer
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.boi_token_id
        generation_config = GenerationConfig(
            **_sampling(temperature),
            max_new_tokens=model.config.image_tokens_per_image,
            guidance_scale=guidance_scale,
            bos_token_id=bos,
            pad_token_id=model.config.pad_token_id,
            generation_kwargs={"boi_token_id": model.config.boi_token_id},
        )
        torch.manual_seed(seed)
        codes = janus.generate(input_ids, attention_mask=attention_mask, generation_config=generation_config,
                               generation_mode="image")
        return codes, None

    return run


def generate_images_method(decoding: str | None, cache: str | None, window: int | None = None):
    """generate_images with `decoding` / `cache` (/ `window`) passed where the installed API accepts them."""

    def run(model, prompts: list[str], guidance_scale: float, temperature: float, seed: int):
        from mllm.generation import generate_images

        parameters = inspect.signature(generate_images).parameters
        kwargs = {}
        if decoding is not None and "decoding" in parameters:
            kwargs["decoding"] = decoding
        if cache is not None and "cache" in parameters:
            kwargs["cache"] = cache
        if window is not None and "window" in parameters:
            kwargs["window"] = window
        stats = {} if "stats" in parameters else None
        if stats is not None:
            kwargs["stats"] = stats
        codes = generate_images(model, prompts, n=1, guidance_scale=guidance_scale, temperature=temperature,
                                seed=seed, **kwargs)
        return torch.stack([c[0].reshape(-1) for c in codes]), stats or None

    return run


# transformers' Janus image generate calls `_prepare_static_cache` without its `prefill_chunk_size` argument
# before 5.18 (a TypeError at the first image; seen with 5.17.0 on a GPU machine, 2026-12-04).
JANUS_MIN_TRANSFORMERS = (5, 18)


def unsupported(method: str) -> str | None:
    """Why the installed generate_images (or, for janus, transformers) cannot run `method` (None: it can)."""
    from mllm.generation import generate_images

    if method == "janus":
        import transformers

        installed = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
        if installed < JANUS_MIN_TRANSFORMERS:
            minimum = ".".join(map(str, JANUS_MIN_TRANSFORMERS))
            return (f"transformers {transformers.__version__}'s Janus image generate fails before {minimum} "
                    f"(pip install 'transformers>={minimum}')")
        return None
    parameters = inspect.signature(generate_images).parameters
    if method == "static" and "cache" not in parameters:
        return "generate_images has no `cache` parameter yet"
    if method == "jacobi" and "decoding" not in parameters:
        return "generate_images has no `decoding` parameter yet"
    return None


# ---------------------------------------------------------------------------- measurement
def copy_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large device-to-device tensor copy (bytes read + bytes written)."""
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        target.copy_(source)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best


def weight_bytes_per_step(llm) -> int:
    """Bytes of the LLM weights one decode step reads: all of them but the input embedding table."""
    embedding = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    total = sum(p.numel() * p.element_size() for p in llm.parameters())  # a tied matrix is counted once
    return total if tied else total - embedding.numel() * embedding.element_size()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_method(method: Callable, model, prompts: list[str], guidance_scale: float, temperature: float,
                repeats: int, counter: ForwardCounter | None) -> tuple[list[float], list[int], list[dict]]:
    """Seconds, forward counts and the method's other stats of `repeats` calls after one untimed warm-up call.

    A method returns (codes (B, h*w), stats dict or None); forwards are stats["forwards"] or else the
    calls `counter` saw."""
    steps = model.config.image_tokens_per_image
    times, forwards, extras = [], [], []
    for repeat in range(repeats + 1):
        if counter is not None:
            counter.reset()
        _sync(model.device)
        start = time.perf_counter()
        # Each repeat rotates the prompt list and changes the seed: at batch 1 the repeats then cover
        # several prompts, since a drawing's Jacobi passes vary with its prompt and seed.
        shifted = prompts[repeat % len(prompts):] + prompts[:repeat % len(prompts)] if len(prompts) > 1 else \
            [PROMPTS[repeat % len(PROMPTS)]]
        codes, stats = method(model, shifted, guidance_scale, temperature, seed=repeat)
        _sync(model.device)
        elapsed = time.perf_counter() - start
        if tuple(codes.shape) != (len(prompts), steps):
            raise AssertionError(f"codes of shape {tuple(codes.shape)}, expected {(len(prompts), steps)}")
        if not (0 <= int(codes.min()) and int(codes.max()) < model.config.codebook_size):
            raise AssertionError("a code outside [0, K)")
        if repeat == 0:
            continue  # warm-up
        stats = dict(stats or {})
        if "forwards" in stats:
            forwards.append(int(stats.pop("forwards")))
        elif counter is not None:
            forwards.append(counter.count)
        else:
            raise RuntimeError("no forward count: the method reported none and no hook counts its forwards")
        times.append(elapsed)
        extras.append(stats)
    return times, forwards, extras


def run_benchmark(model, methods: list[str], batch_sizes: list[int], repeats: int, guidance_scale: float,
                  temperature: float, bandwidth: float, seed: int = 0, window: int | None = None) -> dict:
    """Time every available method at every batch size -> {"rows": [...], "notes": [...], ...}."""
    from mllm.generation import generate_images

    notes: list[str] = []
    parameters = inspect.signature(generate_images).parameters
    steps = model.config.image_tokens_per_image
    our_bytes = weight_bytes_per_step(model.llm)
    step_bytes = {m: our_bytes for m in methods}
    runners: dict[str, tuple[Callable, ForwardCounter | None]] = {}
    decoder = model.llm.get_decoder()
    for name in methods:
        reason = unsupported(name) if name in ("static", "jacobi", "janus") else None
        if reason:
            notes.append(f"{name}: skipped ({reason})")
            continue
        if name == "generate":
            runners[name] = (generate_baseline, ForwardCounter(decoder))
        elif name == "janus":
            if guidance_scale <= 1:
                notes.append("janus: skipped (its image generate always doubles the rows for CFG and needs "
                             "--guidance > 1)")
                continue
            janus = build_janus(model, seed)
            step_bytes[name] = janus_weight_bytes_per_step(janus)
            runners[name] = (janus_method(janus), ForwardCounter(janus.model.language_model))
        else:
            decoding, cache = {"sequential": ("sequential", "dynamic"), "static": ("sequential", "static"),
                               "jacobi": ("jacobi", None)}[name]
            if name == "sequential" and "decoding" not in parameters:
                notes.append("sequential: generate_images has no `decoding` parameter yet: today's loop "
                             "(sequential, DynamicCache)")
            # stats["forwards"] where generate_images reports it; else a hook on the LLM's decoder (no
            # hook otherwise: it could break a compiled or graph-captured forward).
            counter = None if "stats" in parameters else ForwardCounter(decoder)
            if counter is not None:
                notes.append(f"{name}: forwards counted by a hook (generate_images has no `stats` parameter yet)")
            runners[name] = (generate_images_method(decoding, cache, window if name == "jacobi" else None), counter)

    rows = []
    for batch_size in batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
        for name, (method, counter) in runners.items():
            try:
                times, forwards, extras = time_method(method, model, prompts, guidance_scale, temperature, repeats,
                                                      counter)
            except Exception as error:  # noqa: BLE001 - one failing method must not cost the others' figures
                notes.append(f"{name} at batch {batch_size}: FAILED ({type(error).__name__}: {error})")
                print(f"{name} at batch {batch_size} failed: {type(error).__name__}: {error}", file=sys.stderr)
                continue
            seconds = median(times)
            forward_count = median(forwards)
            bound_s = step_bytes[name] / bandwidth
            rows.append({
                "method": name,
                "batch_size": batch_size,
                "forwards_per_image": forward_count,
                "forwards_min": min(forwards),
                "forwards_max": max(forwards),
                "seconds": seconds,
                "ms_per_image": 1000 * seconds / batch_size,
                "images_per_s": batch_size / seconds,
                "image_tokens_per_s": batch_size * steps / seconds,
                "ms_per_forward": 1000 * seconds / forward_count,
                "weight_bytes_per_forward": step_bytes[name],
                "bound_ms_per_forward": 1000 * bound_s,
                "fraction_of_bandwidth_bound": bound_s * forward_count / seconds,
                # generate_images' other stats (jacobi: accepted_drafts), medians over the repeats
                "stats": {k: median([e[k] for e in extras]) for k in extras[0]
                          if all(isinstance(e.get(k), (int, float)) for e in extras)},
            })
    for _, counter in runners.values():
        if counter is not None:
            counter.remove()
    for row in rows:
        for reference in ("sequential", "generate"):
            base = next((r for r in rows if r["method"] == reference and r["batch_size"] == row["batch_size"]), None)
            row[f"speedup_vs_{reference}"] = base["seconds"] / row["seconds"] if base else None
    return {"rows": rows, "notes": notes, "step_bytes": step_bytes}


# ---------------------------------------------------------------------------- models
def build_llama_100m(root: Path, seed: int = 0) -> Path:
    """A seeded random Llama (LLAMA_100M) + a shapes text tokenizer as a base folder -> a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mllm.init import init_model
    from mllm.text_tokenizer import shapes_text_corpus, train_text_tokenizer

    tokenizer = train_text_tokenizer(shapes_text_corpus(seed=seed), vocab_size=512, seed=seed)
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **LLAMA_100M,
    ))
    base = root / "llama-100m"
    llm.to(torch.bfloat16).save_pretrained(base)  # bf16 on disk: half the bytes; init keeps the base's dtype
    tokenizer.save_pretrained(base)
    del llm
    return init_model(base, "shapes", root / "model", seed=seed)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", type=Path, help="model folder (default: a fresh demo-sized model)")
    which.add_argument("--llama-100m", action="store_true",
                       help="a seeded random 116M-parameter Llama wrapped as a model (bf16 unless --dtype)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                        help="default: the dtype the model was saved in (fp32 for the fresh model; bf16 for "
                             "--llama-100m)")
    parser.add_argument("--attn", default=None, choices=("sdpa", "eager", "flash_attention_2"),
                        help="attention of the LLM and of the Janus peer (default: sdpa)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature of every method (default: generate_images' draw default)")
    parser.add_argument("--window", type=int, default=None,
                        help="jacobi: tokens per forward (default: generate_images' default)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bandwidth-mib", type=int, default=512, help="size of the copy-bandwidth probe")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh models' initialisation")
    parser.add_argument("--quick", action="store_true",
                        help="repeats 1, batch 1 only, a 128 MiB bandwidth probe (tests, smoke runs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.batch_sizes, args.bandwidth_mib = 1, [1], min(args.bandwidth_mib, 128)
    if args.repeats < 1 or any(b < 1 for b in args.batch_sizes):
        parser.error("--repeats and --batch-sizes must be at least 1")
    return args


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mllm.config import DRAW_TEMPERATURE
    from mllm.model import UnifiedMLLM

    temperature = DRAW_TEMPERATURE if args.temperature is None else args.temperature
    dtype = args.dtype or ("bf16" if args.llama_100m else None)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if args.llama_100m:
            model_dir = build_llama_100m(Path(tmp), args.seed)
        elif model_dir is None:
            from mllm.init import init_model

            model_dir = init_model(llm="shapes", vision_tokenizer="shapes", out=Path(tmp) / "model", seed=args.seed)
        model = UnifiedMLLM.from_pretrained(model_dir, device=args.device, dtype=dtype,
                                            attn_implementation=args.attn)
    device = model.device
    bandwidth = copy_bandwidth(device, args.bandwidth_mib)
    result = run_benchmark(model, args.methods, args.batch_sizes, args.repeats, args.guidance, temperature,
                           bandwidth, args.seed, args.window)
    rows, notes = result["rows"], result["notes"]

    llm_config, config = model.llm.config, model.config
    parameters = sum(p.numel() for p in model.llm.parameters())
    steps = config.image_tokens_per_image
    attention = llm_config._attn_implementation
    print(
        f"model: {type(model.llm).__name__} {parameters / 1e6:.2f}M params, hidden {llm_config.hidden_size}, "
        f"{llm_config.num_hidden_layers} layers, {llm_config.num_attention_heads} heads, MLP "
        f"{llm_config.intermediate_size}, vocab {config.vocab_size}, grid {config.grid_size[0]}x"
        f"{config.grid_size[1]} ({steps} tokens/image), K {config.codebook_size}, {model.dtype}, {attention}, "
        f"{device}, {torch.get_num_threads()} threads; CFG scale {args.guidance}, temperature {temperature}; "
        f"medians of {args.repeats}"
    )
    bound = ", ".join(f"{m} {b / 2**20:.1f} MiB" for m, b in result["step_bytes"].items()
                      if m in ("generate", "janus"))
    print(f"weights read per forward: ours {weight_bytes_per_step(model.llm) / 2**20:.1f} MiB"
          f"{' (' + bound + ')' if bound else ''}; copy bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print("| method | batch | forwards / image | s / batch | ms / image | images/s | ms / forward | of bw bound "
          "| vs sequential | vs generate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        forwards = f"{r['forwards_per_image']:g}"
        if r["forwards_min"] != r["forwards_max"]:
            forwards += f" ({r['forwards_min']}-{r['forwards_max']})"
        print(
            f"| {r['method']} | {r['batch_size']} | {forwards} | {r['seconds']:.3f} | {r['ms_per_image']:.1f} | "
            f"{r['images_per_s']:.2f} | {r['ms_per_forward']:.2f} | {100 * r['fraction_of_bandwidth_bound']:.1f}% | "
            f"{_fmt(r['speedup_vs_sequential'], '.2f')}x | {_fmt(r['speedup_vs_generate'], '.2f')}x |"
        )
    for note in notes:
        print(f"note: {note}")
    summary = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(model.dtype).replace("torch.", ""),
        "attn_implementation": attention,
        "threads": torch.get_num_threads(),
        "model": "llama-100m" if args.llama_100m else str(args.model) if args.model else "fresh-shapes",
        "llm_parameters": parameters,
        "hidden_size": llm_config.hidden_size,
        "num_hidden_layers": llm_config.num_hidden_layers,
        "tokens_per_image": steps,
        "codebook_size": config.codebook_size,
        "guidance_scale": args.guidance,
        "temperature": temperature,
        "repeats": args.repeats,
        "weight_bytes_per_step": weight_bytes_per_step(model.llm),
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "notes": notes,
        "results": rows,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
