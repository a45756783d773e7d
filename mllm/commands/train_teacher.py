"""`mllm train-teacher --data SHARDS --out DIR`: train a tiny CLIP teacher for the tokenizer's semantic branch
(the recipe is training.train_teacher). It needs captions (the shapes world has them); for photos without
captions, pass a pretrained CLIP/SigLIP/ViT folder to `mllm train-tokenizer --teacher` instead."""

from __future__ import annotations

import argparse

from mllm.commands.types import positive_int

KINDS = ("teacher",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="shards with images and captions (e.g. from `mllm data shapes`); "
                        "for images without captions use a pretrained tower as train-tokenizer --teacher")
    parser.add_argument("--out", required=True, help="output folder: a CLIP checkpoint loadable with transformers")
    parser.add_argument("--recipe", default="teacher-shapes", help="recipe name or YAML path (default: teacher-shapes)")
    parser.add_argument("--max-steps", type=positive_int, help="override the recipe's number of steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override any recipe key")


def run(args: argparse.Namespace) -> int:
    from training.recipes import run_recipe

    run_recipe(args.recipe, [f"data={args.data}", f"out={args.out}", *args.set], max_steps=args.max_steps, kinds=KINDS)
    return 0
