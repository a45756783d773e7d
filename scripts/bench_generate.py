"""Image generation with CFG: transformers `generate()` versus the project's batched decode loop.

    python scripts/bench_generate.py [--model DIR] [--device auto] [--dtype fp32] [--repeats 5] [--threads N]

On the same model (default: a fresh `mllm init --llm shapes --vision-tokenizer shapes` model built in
a temp folder; or --model DIR), draws images with classifier-free guidance two ways:

  generate   `model.llm.generate()` with transformers' own CFG processor
             (`UnbatchedClassifierFreeGuidanceLogitsProcessor`, enabled by `guidance_scale` +
             `negative_prompt_ids`: a second forward per step for the unconditional branch), a logits
             processor that allows image ids only, and min_new_tokens = max_new_tokens = h*w;
  batched    `mllm.generation.generate_images`: conditional and unconditional rows in one batch,
             one forward per step, logits of the image rows of the head only.

Both sample the same distribution (log-softmax CFG over the full vocabulary restricted to the image
ids equals logit CFG on the image slice up to a per-row constant). Reports latency at batch 1 and
throughput at batch 8 (medians over --repeats), image tokens/s, and the fraction of the
memory-bandwidth bound: one decode step must read every weight of the LLM once (the input embedding
table excepted: a step reads a few of its rows), so a step cannot take less than
weight bytes / copy bandwidth, the bandwidth measured in the same run with a large tensor copy.
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
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


class ImageIdsOnly:
    """LogitsProcessor for the `generate()` baseline: every id outside [start, end) gets -inf."""

    def __init__(self, start: int, end: int, vocab_rows: int, device) -> None:
        self.blocked = torch.ones(vocab_rows, dtype=torch.bool, device=device)
        self.blocked[start:end] = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(self.blocked, float("-inf"))


def generate_baseline(model, prompts: list[str], guidance_scale: float, seed: int) -> torch.Tensor:
    """transformers generate() + its CFG processor -> codes (B, h*w)."""
    from transformers import GenerationConfig, LogitsProcessorList

    from mllm.generation import _draw_prefixes, _left_pad

    config, processor = model.config, model.processor
    steps = config.image_tokens_per_image
    prefixes = _draw_prefixes(model, [processor.draw_conversation(p) for p in prompts])
    unconditional = _draw_prefixes(model, [processor.unconditional_draw_conversation()])[0]
    input_ids, attention_mask = _left_pad(prefixes, config.pad_token_id, model.device)
    negative = unconditional[None].expand(len(prompts), -1)
    vocab_rows = model.llm.get_output_embeddings().weight.shape[0]
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=steps,
        min_new_tokens=steps,
        guidance_scale=guidance_scale,
        eos_token_id=None,
        pad_token_id=config.pad_token_id,
        use_cache=True,
    )
    torch.manual_seed(seed)
    output = model.llm.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=generation_config,
        negative_prompt_ids=negative,
        negative_prompt_attention_mask=torch.ones_like(negative),
        logits_processor=LogitsProcessorList(
            [ImageIdsOnly(*model.vocab.image_id_range, vocab_rows, model.device)]
        ),
    )
    return output[:, input_ids.shape[1] :] - config.image_offset


def batched(model, prompts: list[str], guidance_scale: float, seed: int) -> torch.Tensor:
    from mllm.generation import generate_images

    codes = generate_images(model, prompts, n=1, guidance_scale=guidance_scale, seed=seed)
    return torch.stack([c[0].reshape(-1) for c in codes])


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


def time_method(method, model, prompts, guidance_scale, repeats) -> list[float]:
    method(model, prompts, guidance_scale, seed=0)  # warm-up
    times = []
    for repeat in range(repeats):
        _sync(model.device)
        start = time.perf_counter()
        codes = method(model, prompts, guidance_scale, seed=repeat + 1)
        _sync(model.device)
        times.append(time.perf_counter() - start)
        assert codes.shape == (len(prompts), model.config.image_tokens_per_image)
        assert 0 <= int(codes.min()) and int(codes.max()) < model.config.codebook_size
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model folder (default: a fresh shapes-sized model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("bf16", "fp16", "fp32"),
        help="default: the dtype the model was saved in (fp32 for the fresh model)",
    )
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mllm.model import UnifiedMLLM

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from mllm.init import init_model

            model_dir = init_model(llm="shapes", vision_tokenizer="shapes", out=Path(tmp) / "model", seed=0)
        model = UnifiedMLLM.from_pretrained(model_dir, device=args.device, dtype=args.dtype)
    device = model.device
    bandwidth = copy_bandwidth(device)
    step_bytes = weight_bytes_per_step(model.llm)
    bound_step_s = step_bytes / bandwidth
    steps = model.config.image_tokens_per_image
    rows = []
    for batch_size in args.batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
        for name, method in (("generate", generate_baseline), ("batched", batched)):
            seconds = median(time_method(method, model, prompts, args.guidance, args.repeats))
            rows.append(
                {
                    "method": name,
                    "batch_size": batch_size,
                    "seconds": seconds,
                    "images_per_s": batch_size / seconds,
                    "image_tokens_per_s": batch_size * steps / seconds,
                    "ms_per_step": 1000 * seconds / steps,
                    "fraction_of_bandwidth_bound": bound_step_s * steps / seconds,
                }
            )
    for row in rows:
        baseline = next(r for r in rows if r["method"] == "generate" and r["batch_size"] == row["batch_size"])
        row["speedup_vs_generate"] = baseline["seconds"] / row["seconds"]

    llm_config, config = model.llm.config, model.config
    parameters = sum(p.numel() for p in model.llm.parameters())
    print(
        f"model: {type(model.llm).__name__} {parameters / 1e6:.2f}M params, hidden {llm_config.hidden_size}, "
        f"{llm_config.num_hidden_layers} layers, vocab {config.vocab_size}, "
        f"grid {config.grid_size[0]}x{config.grid_size[1]} ({steps} tokens/image), K {config.codebook_size}, "
        f"{model.dtype}, {device}, {torch.get_num_threads()} threads; "
        f"CFG scale {args.guidance}; medians of {args.repeats}"
    )
    print(
        f"weights read per step {step_bytes / 2**20:.1f} MiB, copy bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"-> bound {1000 * bound_step_s:.3f} ms/step\n"
    )
    print("| method | batch | s / batch | images/s | image tokens/s | ms / step | of bw bound | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['batch_size']} | {r['seconds']:.3f} | {r['images_per_s']:.2f} | "
            f"{r['image_tokens_per_s']:.0f} | {r['ms_per_step']:.2f} | "
            f"{100 * r['fraction_of_bandwidth_bound']:.1f}% | {r['speedup_vs_generate']:.2f}x |"
        )
    print(
        json.dumps(
            {
                "device": str(device),
                "dtype": str(model.dtype).replace("torch.", ""),
                "threads": torch.get_num_threads(),
                "llm_parameters": parameters,
                "tokens_per_image": steps,
                "guidance_scale": args.guidance,
                "weight_bytes_per_step": step_bytes,
                "copy_bandwidth_gb_per_s": bandwidth / 1e9,
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
