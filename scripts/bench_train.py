"""Training throughput of the `mllm train` LLM recipes: tokens/s and model FLOP utilisation (MFU).

    python scripts/bench_train.py [--model DIR | --size shapes] [--samples 512] [--steps 8]
        [--batch-size N] [--seq-len N] [--threads N] [--repeats 3] [--precision auto] [--attn auto]
        [--configs packed-pre,unpacked-pre,packed-fly,unpacked-fly,sft-packed-pre]

Setup (in a temporary folder, untimed): shapes data (`--samples` records, rendered at the vision
tokenizer's image size) written with `write_shards`, a fresh `--size` model (`init_model`, or `--model
DIR`), and pre-tokenized shards (`pretokenize_records` with the model's own vision tokenizer). The model,
trainer and examples are built from the shipped recipe YAML (`shapes-pretrain`; `shapes-sft` for the sft-*
configuration: its task mixture and its LoRA), with the recipe's attention (`attn_implementation: auto`:
`packed_eager` on CPU) and batch size. Each configuration is timed as a loop of `--steps` optimizer steps
after 2 untimed warm-up steps, over `--repeats` loops (medians reported):

    packing     packed (one row per batch, `DataCollatorWithFlattening`) | unpacked (right-padded rows)
    tokenizing  pre-tokenized (examples tokenized once, from code shards, before timing: the recipe)
                | on-the-fly (raw image shards: each step runs the processor, so the frozen vision
                tokenizer encodes that batch's images, inside the timed step)
    sft-packed-pre  the shapes-sft recipe (LoRA r=16 + trainable new rows), packed, pre-tokenized

One step = recipe collator (`make_collator` in `TaskCollator`) -> the recipe's loss (`TaskLossTrainer.
compute_loss`: per-token cross-entropy on assistant tokens) under bf16 autocast where supported
(`mllm.runtime`) -> backward -> grad-norm clipping -> the Trainer's AdamW step (`create_optimizer`).
Data come from `load_task_pools` + `draw_conversations` + `tokenize_examples`, exactly as in the recipe.

--seq-len (packing target): a packed batch takes examples until the next one would exceed --seq-len
tokens (at least one example), so packed rows hold ~--seq-len tokens; default (0): the recipe's batch
of examples, as `mllm train` does. Unpacked batches always hold one batch of examples.

Tokens are real tokens (attention-mask ones; no padding). Model FLOPs per real token (the PaLM / Chinchilla
convention, forward + backward, no recomputation):

    6 * N + 12 * layers * hidden * T        (full fine-tune)
    6 * N_trainable + 4 * N_frozen + 12 * layers * hidden * T        (LoRA: frozen weights get no weight gradient)

N = LLM parameters minus the input embedding table (a lookup, no FLOPs); the output projection (lm_head,
a real matmul) is counted. T = the example's own length: packed examples attend only within themselves,
and padded positions are not useful work; so the attention term is averaged over tokens,
12*layers*hidden * sum(T_i^2)/sum(T_i). MFU = achieved model FLOP/s / the dense matmul peak of the
training precision (`scripts/perf.py` measure_matmul_peak, bf16 where autocast runs bf16) measured in the same run.
The vision tokenizer's encode FLOPs (on-the-fly) are not model FLOPs: they only cost time.

Prints a markdown table and, as the LAST line, `MFU <percent>` for the default configuration: the
shapes-pretrain recipe, packed, pre-tokenized.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 2
PRETRAIN_RECIPE, SFT_RECIPE = "shapes-pretrain", "shapes-sft"
CONFIGS = ("packed-pre", "unpacked-pre", "packed-fly", "unpacked-fly", "sft-packed-pre")


def build_inputs(root: Path, size: str, model_dir: str | None, samples: int, precision: str):
    """(model folder, raw shards, pre-tokenized shards) under `root`."""
    from mllm.data.pretokenize import pretokenize_records
    from mllm.data.shapes import iter_samples
    from mllm.data.shards import DataStats, read_records, write_shards
    from mllm.init import init_model
    from mllm.model import UnifiedMLLM

    model_path = Path(model_dir) if model_dir else init_model(size, size, root / "model", seed=0)
    model = UnifiedMLLM.from_pretrained(model_path, device="cpu", dtype="fp32")
    tokenizer = model.vision_tokenizer.eval()
    raw, codes = root / "raw", root / "codes"
    write_shards(iter_samples(samples, size=tokenizer.image_size), raw, progress=False)
    stats = DataStats()
    records = read_records(str(raw), stats=stats, split=False)
    write_shards(pretokenize_records(records, tokenizer, 64, "cpu", precision, stats), codes, progress=False)
    return model_path, raw, codes


def count_parameters(llm) -> tuple[int, int]:
    """(non-embedding parameters, of which trainable). The input embedding is a lookup, no FLOPs (peft's
    trainable-token deltas on it are lookups too); the output projection is a matmul and counts."""
    total = trainable = 0
    for name, param in llm.named_parameters():
        if "embed_tokens" in name:
            continue
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return total, trainable


def model_flops_per_token(llm, lengths: list[int]) -> float:
    """6 N_trainable + 4 N_frozen (non-embedding) + 12 * layers * hidden * <T>, <T> = sum(T_i^2)/sum(T_i):
    a frozen weight costs a forward and an input-gradient matmul per token, no weight gradient (LoRA)."""
    config = llm.config
    total, trainable = count_parameters(llm)
    mean_t = sum(t * t for t in lengths) / max(sum(lengths), 1)
    return 6.0 * trainable + 4.0 * (total - trainable) + 12.0 * config.num_hidden_layers * config.hidden_size * mean_t


def make_batches(items: list, batch_size: int, seq_len: int, length) -> list[list]:
    """Consecutive groups of `batch_size` items, or (seq_len > 0) groups of at most `seq_len` tokens."""
    if seq_len <= 0:
        return [items[i:i + batch_size] for i in range(0, len(items) - batch_size + 1, batch_size)]
    batches, current, tokens = [], [], 0
    for item in items:
        n = length(item)
        if current and tokens + n > seq_len:
            batches.append(current)
            current, tokens = [], 0
        current.append(item)
        tokens += n
    return batches


def run_config(model, trainer, processor, precision: str, packing: bool, on_the_fly: bool, examples, drawn,
               max_length, batch_size: int, args) -> dict:
    """Time `args.repeats` loops of `args.steps` steps; return median tokens/s and the mean attention length."""
    from mllm.runtime import autocast
    from training.components import TaskCollator, make_collator, tokenize_examples

    collator = TaskCollator(make_collator(packing, model.config.pad_token_id), packing)
    llm, optimizer = trainer.model, trainer.optimizer
    seq_len = args.seq_len if packing else 0
    # Batch composition is decided from the pre-tokenized lengths for both data paths (same examples).
    index_batches = make_batches(list(range(len(examples))), batch_size, seq_len,
                                 lambda i: len(examples[i]["input_ids"]))
    if len(index_batches) < WARMUP_STEPS + args.steps:
        index_batches = index_batches * (1 + (WARMUP_STEPS + args.steps) // max(len(index_batches), 1))
    batches = itertools.cycle(index_batches)

    def step() -> tuple[int, list[int]]:
        indices = next(batches)
        if on_the_fly:
            features = tokenize_examples(processor, [drawn[i][1] for i in indices], max_length)
            for feature, i in zip(features, indices):
                feature["task"] = examples[i]["task"]
        else:
            features = [examples[i] for i in indices]
        batch = collator(features)
        with autocast(precision):
            loss = trainer.compute_loss(llm, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), trainer.args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return len(features), [len(f["input_ids"]) for f in features]

    llm.train()
    for _ in range(WARMUP_STEPS):
        step()
    rates, lengths, rows, padded = [], [], 0, 0
    for _ in range(args.repeats):
        tokens = 0
        start = time.perf_counter()
        for _ in range(args.steps):
            n, step_lengths = step()
            tokens += sum(step_lengths)
            lengths.extend(step_lengths)
            rows += n
            padded += sum(step_lengths) if packing else n * max(step_lengths)
        rates.append(tokens / (time.perf_counter() - start))
    from perf import median

    return {"tokens_per_s": median(rates), "lengths": lengths,
            "tokens_per_step": sum(lengths) / (args.repeats * args.steps),
            "examples_per_step": rows / (args.repeats * args.steps),
            "pad_fraction": 1 - sum(lengths) / max(padded, 1)}


def prepare(recipe: str, model_dir: Path, raw: Path, codes: Path, precision: str, root: Path, args) -> dict:
    """A shipped recipe's model (its LoRA, if any), trainer + optimizer and examples, as `mllm train` builds them."""
    from transformers import TrainingArguments, set_seed

    from mllm.lora import add_lora
    from mllm.model import UnifiedMLLM
    from training.components import (
        LLMTrainConfig,
        TaskLossTrainer,
        draw_conversations,
        load_task_pools,
        set_training_attention,
        tokenize_examples,
    )
    from training.config import load_config

    overrides = [f"model={model_dir}", f"data={codes}", f"out={root / recipe}", f"attn_implementation={args.attn}"]
    if args.batch_size:
        overrides.append(f"per_device_batch_size={args.batch_size}")
    cfg = load_config(LLMTrainConfig, recipe, overrides)
    set_seed(cfg.seed)
    model = UnifiedMLLM.from_pretrained(model_dir, device="cpu", dtype="fp32")
    model.vision_tokenizer.requires_grad_(False).eval()
    attention = set_training_attention(model.llm, cfg.attn_implementation)  # and no KV cache
    processor = model.processor
    max_length = cfg.max_length or model.llm.config.max_position_embeddings
    # The same examples for both data paths: draw from the code shards, and the raw shards' samples
    # in the same order (same keys, same seeded draw) for on-the-fly tokenization.
    code_pools = load_task_pools(str(codes), cfg.tasks, cfg.vqa_turns, cfg.seed)
    drawn = draw_conversations(code_pools, cfg.tasks, processor, cfg.cfg_dropout, None, cfg.seed)
    examples = tokenize_examples(processor, [m for _, m in drawn], max_length)
    names = sorted(code_pools)
    for example, (task, _) in zip(examples, drawn):
        example["task"] = names.index(task)
    raw_pools = load_task_pools(str(raw), cfg.tasks, cfg.vqa_turns, cfg.seed)
    drawn_raw = draw_conversations(raw_pools, cfg.tasks, processor, cfg.cfg_dropout, None, cfg.seed)
    if cfg.lora is not None:
        add_lora(model, cfg.lora)
    training_args = TrainingArguments(output_dir=str(root / recipe / "out"),
                                      per_device_train_batch_size=cfg.per_device_batch_size,
                                      learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      max_grad_norm=cfg.max_grad_norm, bf16=precision == "bf16", use_cpu=True,
                                      report_to="none", remove_unused_columns=False)
    trainer = TaskLossTrainer(model=model.llm, args=training_args, train_dataset=examples, task_names=names)
    trainer.create_optimizer()
    return {"cfg": cfg, "model": model, "trainer": trainer, "processor": processor, "examples": examples,
            "drawn_raw": drawn_raw, "max_length": max_length, "attention": attention}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (default: a fresh --size model)")
    parser.add_argument("--size", default="shapes", help="named LLM + vision tokenizer size (mllm.config.LLM_SIZES)")
    parser.add_argument("--samples", type=int, default=512, help="shapes records to generate")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per loop")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="examples per batch (0: the recipe's per_device_batch_size, 16 in the shapes recipes)")
    parser.add_argument("--seq-len", type=int, default=0, help="packing target in tokens (0: one batch of examples)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed loops per configuration (median)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--attn", default="auto", help="the recipe's attn_implementation (auto: packed_eager on CPU)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")

    from perf import measure_matmul_peak

    from mllm.runtime import keep_freed_memory, resolve_precision

    keep_freed_memory()  # as `mllm train` does

    precision = resolve_precision(args.precision, "cpu")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        model_dir, raw, codes = build_inputs(root, args.size, args.model, args.samples, precision)
        setup_s = time.perf_counter() - t0
        results, setups = {}, {}
        for name in configs:
            recipe = SFT_RECIPE if name.startswith("sft-") else PRETRAIN_RECIPE
            if recipe not in setups:
                setups = {recipe: prepare(recipe, model_dir, raw, codes, precision, root, args)}  # one at a time
            setup = setups[recipe]
            packing, on_the_fly = "packed" in name.split("-"), name.endswith("fly")
            result = run_config(setup["model"], setup["trainer"], setup["processor"], precision, packing, on_the_fly,
                                setup["examples"], setup["drawn_raw"], setup["max_length"],
                                setup["cfg"].per_device_batch_size, args)
            result["flops"] = model_flops_per_token(setup["trainer"].model, result["lengths"])
            results[name] = result
            if name == configs[0]:
                llm, attention = setup["trainer"].model, setup["attention"]
                n_params, n_examples = count_parameters(llm)[0], len(setup["examples"])
        peak = measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)

    config = llm.config
    print(f"\nmodel {args.model or args.size}: {n_params / 1e6:.2f}M non-embedding params, "
          f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}; "
          f"{n_examples} examples; {precision} on cpu, {torch.get_num_threads()} threads, {attention} attention; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s ({precision}); setup {setup_s:.0f}s\n")
    print("| config | examples/step | tokens/step | pad % | tokens/s | model GFLOP/token | TFLOP/s | MFU % |")
    print("|---|---|---|---|---|---|---|---|")
    mfu = {}
    for name, r in results.items():
        achieved = r["tokens_per_s"] * r["flops"]
        mfu[name] = 100 * achieved / peak
        print(f"| {name} | {r['examples_per_step']:.1f} | {r['tokens_per_step']:.0f} | {100 * r['pad_fraction']:.0f} "
              f"| {r['tokens_per_s']:.0f} | {r['flops'] / 1e9:.4f} | {achieved / 1e12:.3f} | {mfu[name]:.1f} |")
    default = mfu.get("packed-pre", next(iter(mfu.values())))
    print(f"MFU {default:.1f}%")
    return default


if __name__ == "__main__":
    main()
