"""`mllm ask --model DIR IMAGE "QUESTION"`: print the model's answer to a question about an image."""

from __future__ import annotations

import argparse

from mllm.commands._common import (
    add_model_arguments,
    add_text_sampling_arguments,
    check_model_folder,
    error,
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
    problem = check_model_folder(args.model)
    if problem:
        return error("ask", problem)
    if not args.question.strip():
        return error("ask", "the question is empty")
    images, problem = read_images([args.image])
    if problem:
        return error("ask", problem)
    try:
        model = load_model(args)
        answer = model.answer(images[0], args.question, **text_sampling(args))
    except ValueError as exn:
        return error("ask", str(exn))
    print(answer)
    return 0
