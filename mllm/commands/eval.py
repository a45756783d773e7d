"""`mllm eval`: run a model over an evaluation suite (VQA, captioning, generation); resumable.

    mllm eval --model DIR --suite NAME [--data PATH] --out DIR [--batch-size B] [--limit N] [--adapter DIR]
        [--option KEY=VALUE ...]

Several processes: `torchrun --nproc_per_node N -m mllm.cli eval ...` (each takes every N-th item).
"""

from __future__ import annotations

import argparse

from mllm.commands._common import add_draw_sampling_arguments
from mllm.commands.types import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from eval.suites import suite_names, suites_epilog

    # The epilog lists every suite's files one per line; the default formatter would refill them into a block.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = suites_epilog()
    parser.add_argument("--model", help="model folder (`mllm init` / `mllm train` / `mllm merge` output)")
    parser.add_argument("--suite", required=True, help=f"one of: {', '.join(suite_names())} (what each reads: below)")
    parser.add_argument("--data", help="the benchmark's files in their official format (shapes suites: optional "
                                       "test shards; default: held-out scenes rendered on the fly)")
    parser.add_argument("--out", required=True, help="output folder: predictions.jsonl, results.json, results.md")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="items per generation batch (default 16)")
    parser.add_argument("--limit", type=positive_int, help="only the first N items")
    parser.add_argument("--adapter", help="a peft adapter folder to load onto the model")
    parser.add_argument("--max-new-tokens", type=positive_int, help="override the suite's answer length")
    add_draw_sampling_arguments(parser)  # draw suites (--guidance-scale, --temperature, --decoding)
    parser.add_argument("--top-k", type=positive_int, help="draw suites: sample image codes from the k likeliest only")
    parser.add_argument("--seed", type=int, default=0, help="draw suites: seed of the first image per prompt")
    parser.add_argument("--option", nargs="*", default=[], metavar="KEY=VALUE",
                        help="suite options, e.g. normalize=lmms-eval (vqav2, textvqa, vizwiz, gqa; default "
                             "official), circular=true (mmbench), clip=DIR (fid)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from eval.runner import EvalSettings, evaluate, parse_options
    from eval.suites import get_suite

    get_suite(args.suite)  # an unknown suite fails here, before anything loads
    evaluate(EvalSettings(
        suite=args.suite, out=args.out, model=args.model, data=args.data, batch_size=args.batch_size,
        limit=args.limit, adapter=args.adapter, max_new_tokens=args.max_new_tokens,
        guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        decoding=args.decoding,
        options=parse_options(args.option), progress=not args.no_progress,
    ))  # fmt: skip
    return 0
