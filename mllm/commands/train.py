"""`mllm train --recipe NAME|YAML --model DIR --data SHARDS --out DIR`: train the unified model with an LLM or
ETT recipe (training.recipes; the recipes themselves are training.train_llm and training.train_ett).

Several processes: `torchrun --nproc_per_node N -m mllm.cli train ...` or
`accelerate launch [--config_file training/configs/accelerate/fsdp.yaml] -m mllm.cli train ...`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm.commands.types import positive_int

KINDS = ("llm", "ett")  # a YAML path without a `recipe:` key is an llm recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.recipes import recipe_names

    parser.add_argument("--recipe", required=True,
                        help=f"recipe name ({', '.join(recipe_names(KINDS))}) or YAML path (`recipe: ett` in it for "
                             "an ETT recipe); ett recipes tune the visual tokenizer end to end (codebook-mode models, "
                             "image shards)")
    parser.add_argument("--model", required=True, help="model folder to start from")
    parser.add_argument("--data", required=True, help="training shards (raw or pre-tokenized; raw for ett)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, metrics.jsonl, adapter/ or model/)")
    parser.add_argument("--max-steps", type=positive_int, help="override the recipe's number of optimizer steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest complete OUT/checkpoint-N (needed to reuse an OUT with "
                             "checkpoints)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override any recipe key, e.g. --set learning_rate=1e-4 lora=null tasks.chat=0.5")


def run(args: argparse.Namespace) -> int:
    from training.recipes import run_recipe

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file, not a folder (choose another --out)")

    overrides = [f"model={args.model}", f"data={args.data}", f"out={args.out}", *args.set]
    try:
        run_recipe(args.recipe, overrides, resume=args.resume, max_steps=args.max_steps, kinds=KINDS)
    finally:
        _end_process_group()
    return 0


def _end_process_group() -> None:
    """Under torchrun the trainer opens a process group and never closes it; left to interpreter exit, a
    gloo group's worker threads can be torn down while still joinable, and that process aborts
    ("terminate called without an active exception") after a run that finished. Waiting for every rank and
    closing the group here ends each process cleanly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
