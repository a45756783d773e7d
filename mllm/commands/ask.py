"""`mllm ask --model DIR IMAGE "QUESTION"`: print the model's answer to a question about an image."""

from __future__ import annotations

import argparse

from mllm.commands._common import (
    add_model_arguments,
    add_text_sampling_arguments,
    check_model_folder,
    check_text,
    load_model,
    read_images,
    text_sampling,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="image file the question is about")
    parser.add_argument("question", metavar="QUESTION", help='e.g. "What colour is the circle?"')
    add_model_arguments(parser)
    add_text_sampling_arguments(parser, max_new_tokens=32)


def run(args: argparse.Namespace) -> int:
    check_model_folder(args.model)
    check_text(args.question, "question")
    images = read_images([args.image])
    model = load_model(args)
    print(model.answer(images[0], args.question, **text_sampling(args)))
    return 0
