"""`mllm caption --model DIR IMAGE [IMAGE ...]`: print a caption per image (one batch).

With several images each line is `PATH: caption`.
"""

from __future__ import annotations

import argparse

from mllm.commands._common import (
    add_model_arguments,
    add_text_sampling_arguments,
    check_model_folder,
    load_model,
    read_images,
    text_sampling,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s) to describe")
    add_model_arguments(parser)
    add_text_sampling_arguments(parser, max_new_tokens=64)


def run(args: argparse.Namespace) -> int:
    check_model_folder(args.model)
    images = read_images(args.images)
    model = load_model(args)
    captions = model.caption(images, **text_sampling(args))
    for path, caption in zip(args.images, captions):
        print(f"{path}: {caption}" if len(args.images) > 1 else caption)
    return 0
