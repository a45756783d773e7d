"""Training throughput of the `mllm train` LLM recipe: tokens/s and model FLOP utilisation (MFU).

    python scripts/bench_train.py [--model DIR | --size shapes] [--samples 512] [--steps 8]
        [--batch-size 16] [--seq-len N] [--threads N] [--repeats 3] [--precision auto]

Setup (in a temporary folder, untimed): shapes data (`--samples` records, rendered at the vision
tokenizer's image size) written with `write_shards`, a fresh `--size` model (`init_model`, or `--model
DIR`), and pre-tokenized shards (`pretokenize_records` with the model's own vision tokenizer). Then four
configurations are timed, each a loop of `--steps` optimizer steps after 2 untimed warm-up steps, over
`--repeats` loops (medians reported):

    packing     packed (one row per batch, `DataCollatorWithFlattening`) | unpacked (right-padded rows)
    tokenizing  pre-tokenized (examples tokenized once, from code shards, before timing: the recipe)
                | on-the-fly (raw image shards: each step runs the processor, so the frozen vision
                tokenizer encodes that batch's images, inside the timed step)

One step = recipe collator (`make_collator` in `TaskCollator`) -> the recipe's loss (`TaskLossTrainer.
compute_loss`: per-token cross-entropy on assistant tokens) under bf16 autocast where supported
(`mllm.runtime`) -> backward -> grad-norm clipping -> the Trainer's AdamW step (`create_optimizer`).
Data come from `load_task_pools` + `draw_conversations` + `tokenize_examples`, exactly as in the recipe.

--seq-len (packing target): a packed batch takes examples until the next one would exceed --seq-len
tokens (at least one example), so packed rows hold ~--seq-len tokens; default (0): --batch-size
examples per batch, as the recipe does. Unpacked batches always hold --batch-size examples.

Tokens are real tokens (attention-mask ones; no padding). Model FLOPs per real token (the PaLM / Chinchilla
convention, forward + backward, no recomputation):

    6 * N + 12 * layers * hidden * T

N = LLM parameters minus the input embedding table (a lookup, no FLOPs); the output projection (lm_head,
a real matmul) is counted. T = the example's own length: packed examples attend only within themselves
(block-diagonal mask), and padded positions are not useful work; so the attention term is averaged over
tokens, 12*layers*hidden * sum(T_i^2)/sum(T_i). MFU = achieved model FLOP/s / the dense matmul peak of the
training precision (`mllm.perf.measure_matmul_peak`, bf16 where autocast runs bf16) measured in the same run.
The vision tokenizer's encode FLOPs (on-the-fly) are not model FLOPs: they only cost time.

Prints a markdown table and, as the LAST line, `MFU <percent>` for packed + pre-tokenized.
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
TASKS = {"caption": 1.0, "t2i": 1.0}  # the shapes-pretrain mixture


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


def model_flops_per_token(llm, lengths: list[int]) -> float:
    """6 * N (non-embedding) + 12 * layers * hidden * <T>, <T> = sum(T_i^2)/sum(T_i) (see module docstring)."""
    config = llm.config
    params = sum(p.numel() for p in llm.parameters()) - llm.get_input_embeddings().weight.numel()
    mean_t = sum(t * t for t in lengths) / max(sum(lengths), 1)
    return 6.0 * params + 12.0 * config.num_hidden_layers * config.hidden_size * mean_t


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
               max_length, args) -> dict:
    """Time `args.repeats` loops of `args.steps` steps; return median tokens/s and the mean attention length."""
    from mllm.runtime import autocast
    from training.train_llm import TaskCollator, make_collator, tokenize_examples

    collator = TaskCollator(make_collator(packing, model.config.pad_token_id), packing)
    llm, optimizer = trainer.model, trainer.optimizer
    batch_size = args.batch_size
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
    from mllm.perf import median

    return {"tokens_per_s": median(rates), "lengths": lengths,
            "tokens_per_step": sum(lengths) / (args.repeats * args.steps),
            "examples_per_step": rows / (args.repeats * args.steps),
            "pad_fraction": 1 - sum(lengths) / max(padded, 1)}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (default: a fresh --size model)")
    parser.add_argument("--size", default="shapes", help="named LLM + vision tokenizer size (mllm.config.LLM_SIZES)")
    parser.add_argument("--samples", type=int, default=512, help="shapes records to generate")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per loop")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batch (shapes-pretrain: 16)")
    parser.add_argument("--seq-len", type=int, default=0, help="packing target in tokens (0: --batch-size examples)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed loops per configuration (median)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--configs", default="packed-pre,unpacked-pre,packed-fly,unpacked-fly",
                        help="comma-separated subset of packed-pre, unpacked-pre, packed-fly, unpacked-fly")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from transformers import TrainingArguments, set_seed

    from mllm.model import UnifiedMLLM
    from mllm.perf import measure_matmul_peak
    from mllm.runtime import resolve_precision
    from training.train_llm import _make_trainer_class, draw_conversations, load_task_pools, tokenize_examples

    precision = resolve_precision(args.precision, "cpu")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        model_dir, raw, codes = build_inputs(root, args.size, args.model, args.samples, precision)
        setup_s = time.perf_counter() - t0
        set_seed(0)
        model = UnifiedMLLM.from_pretrained(model_dir, device="cpu", dtype="fp32")
        model.vision_tokenizer.requires_grad_(False).eval()
        model.llm.config.use_cache = False
        processor = model.processor
        max_length = model.llm.config.max_position_embeddings  # the recipe's default (max_length: null)
        # The same examples for both data paths: draw from the code shards, and the raw shards' samples
        # in the same order (same keys, same seeded draw) for on-the-fly tokenization.
        code_pools = load_task_pools(str(codes), TASKS)
        drawn = draw_conversations(code_pools, TASKS, processor, 0.1, None, 0)
        examples = tokenize_examples(processor, [m for _, m in drawn], max_length)
        names = sorted(code_pools)
        for example, (task, _) in zip(examples, drawn):
            example["task"] = names.index(task)
        drawn_raw = draw_conversations(load_task_pools(str(raw), TASKS), TASKS, processor, 0.1, None, 0)

        training_args = TrainingArguments(output_dir=str(root / "out"), per_device_train_batch_size=args.batch_size,
                                          learning_rate=5e-4, weight_decay=0.0, max_grad_norm=1.0,
                                          bf16=precision == "bf16", use_cpu=True, report_to="none",
                                          remove_unused_columns=False)
        trainer = _make_trainer_class()(model=model.llm, args=training_args, train_dataset=examples,
                                        task_names=names)
        trainer.create_optimizer()

        results = {}
        for name in configs:
            packing, on_the_fly = name.startswith("packed"), name.endswith("fly")
            results[name] = run_config(model, trainer, processor, precision, packing, on_the_fly, examples,
                                       drawn_raw, max_length, args)
        peak = measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
        llm = trainer.model
        n_params = sum(p.numel() for p in llm.parameters()) - llm.get_input_embeddings().weight.numel()

    print(f"\nmodel {args.model or args.size}: {n_params / 1e6:.2f}M non-embedding params, "
          f"{llm.config.num_hidden_layers} layers, hidden {llm.config.hidden_size}, vocab {llm.config.vocab_size}; "
          f"{len(examples)} examples; {precision} on cpu, {torch.get_num_threads()} threads; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s ({precision}); setup {setup_s:.0f}s\n")
    print("| config | examples/step | tokens/step | pad % | tokens/s | model GFLOP/token | TFLOP/s | MFU % |")
    print("|---|---|---|---|---|---|---|---|")
    mfu = {}
    for name, r in results.items():
        per_token = model_flops_per_token(llm, r["lengths"])
        achieved = r["tokens_per_s"] * per_token
        mfu[name] = 100 * achieved / peak
        print(f"| {name} | {r['examples_per_step']:.1f} | {r['tokens_per_step']:.0f} | {100 * r['pad_fraction']:.0f} "
              f"| {r['tokens_per_s']:.0f} | {per_token / 1e9:.4f} | {achieved / 1e12:.3f} | {mfu[name]:.1f} |")
    default = mfu.get("packed-pre", next(iter(mfu.values())))
    print(f"MFU {default:.1f}%")
    return default


if __name__ == "__main__":
    main()
