"""`mllm train-tokenizer --data SHARDS_OR_IMAGES --out DIR [--teacher DIR] [--recipe NAME]`: train the
dual-codebook visual tokenizer (the recipe is training.train_tokenizer).

Several processes: `torchrun --nproc_per_node N -m mllm.cli train-tokenizer ...` or
`accelerate launch -m mllm.cli train-tokenizer ...`.
"""

from __future__ import annotations

import argparse

from mllm.commands.types import positive_int

KINDS = ("tokenizer",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="image shards (e.g. from `mllm data shapes`) or a folder of images "
                        "(.jpg/.jpeg/.png/.webp, searched recursively; trained on random crops)")
    parser.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    parser.add_argument("--teacher", help="local Hugging Face CLIP, SigLIP or ViT folder (a vision model or a full "
                        "CLIP/SigLIP model) for the semantic codebook")
    parser.add_argument("--quantizer", choices=("dual", "pixel", "semantic"), help="codebook mode (default: dual)")
    parser.add_argument("--recipe", default="tokenizer-shapes", help="recipe name or YAML path, e.g. tokenizer-photo for photos at 128 px "
                        "(default: tokenizer-shapes)")
    parser.add_argument("--max-steps", type=positive_int, help="override the recipe's number of steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under OUT/checkpoints")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override any recipe key, e.g. --set learning_rate=1e-3 tokenizer.codebook_size=512")


def run(args: argparse.Namespace) -> int:
    from training.recipes import run_recipe

    overrides = [f"data={args.data}", f"out={args.out}", *args.set]
    if args.teacher:
        overrides.append(f"teacher={args.teacher}")
    if args.quantizer:
        overrides.append(f"quantizer={args.quantizer}")
    run_recipe(args.recipe, overrides, resume=args.resume, max_steps=args.max_steps, kinds=KINDS)
    return 0
