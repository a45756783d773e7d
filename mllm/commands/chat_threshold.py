"""`mllm chat-threshold --model DIR [--scenes N] [--look varied] [--margin M] [--out FILE.json] [--dry-run]`.

Measures, on shapes-world scenes the model never trained on, how likely the model is to start its reply with
an image when a chat turn is an image followed by an edit instruction, and when it is an image followed by a
question, and sets the model's `chat_image_threshold` (its mllm_config.json) from the two: chat then answers
an edit sent image first (as chat clients send it) with an image even where the model's likeliest first token
is a word (mllm/chat_threshold.py; docs/editing.md, "Edits in chat").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm.commands.types import device, positive_float, positive_int

EPILOG = """\
The threshold is --margin times the largest chance of an image any measured question got, so none of them
would start one; the command removes the threshold (the plain decision) where that is 0.5 or more or no edit
reaches it. Models trained with image-first edits (`edit_image_first` > 0) start images in chat without one.

examples:
  mllm chat-threshold --model runs/demo/model
  mllm chat-threshold --model runs/demo/model --dry-run --scenes 200
See docs/editing.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mllm.chat_threshold import DEFAULT_MARGIN, DEFAULT_SCENES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Measure how likely a model is to answer an image and an edit instruction, and an image and a question,\n"
        "with an image, on shapes scenes it never trained on, and set its chat_image_threshold from the two\n"
        "(written into the model's mllm_config.json; prints what it changes)."
    )
    parser.epilog = EPILOG
    parser.add_argument("--model", required=True, type=Path, help="model folder (written to unless --dry-run)")
    parser.add_argument("--scenes", type=positive_int, default=DEFAULT_SCENES,
                        help=f"scenes, one edit and one question each (default {DEFAULT_SCENES})")
    parser.add_argument("--look", choices=("exact", "varied", "other"), default="varied",
                        help="how the scenes are rendered (default varied, the demo's training world)")
    parser.add_argument("--margin", type=positive_float, default=DEFAULT_MARGIN,
                        help=f"threshold = margin x the largest chance a question got (default {DEFAULT_MARGIN:g})")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="measure and print; leave the model as it is")
    parser.add_argument("--device", type=device, default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from mllm.chat_threshold import calibrate

    figures = calibrate(args.model, scenes=args.scenes, look=args.look, margin=args.margin, out=args.out,
                        write=not args.dry_run, device=None if args.device == "auto" else args.device)
    threshold = figures["threshold"]
    print(f"edits sent image first that start an image: {figures['edits_starting_an_image_plain']}% without a "
          f"threshold, {figures['edits_starting_an_image']}% with it")
    print(f"questions that start an image: {figures['questions_starting_an_image_plain']}% without, "
          f"{figures['questions_starting_an_image']}% with it (largest chance {figures['question_chance_max']:.2g})")
    shown = "none (the plain decision)" if threshold is None else f"{threshold:.3g}"
    if args.dry_run:
        print(f"chat_image_threshold would be {shown} (--dry-run: {args.model} left as it is)")
    else:
        print(f"chat_image_threshold = {shown}, written to {args.model / 'mllm_config.json'}")
    return 0
