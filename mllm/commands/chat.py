"""`mllm chat --model DIR`: chat with a model in the terminal (mllm.terminal_chat).

/image PATH [PATH ...] attaches images (one message may hold several), /draw PROMPT asks for a drawing,
/edit INSTRUCTION edits the attached (or the last) image, /reset, /help, /quit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm.commands._common import (
    add_draw_sampling_arguments,
    add_model_arguments,
    add_text_sampling_arguments,
    check_model_folder,
    load_model,
)
from mllm.config import EDIT_GUIDANCE, EDIT_GUIDANCE_MODES, EDIT_GUIDANCE_SCALE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_text_sampling_arguments(parser, max_new_tokens=256)
    add_draw_sampling_arguments(parser, temperature_flag="--image-temperature")
    parser.add_argument(
        "--save-dir",
        type=Path,
        default=Path("mllm-chat-images"),
        help="folder for the images the assistant draws (default: ./mllm-chat-images)",
    )
    parser.add_argument(
        "--system", metavar="TEXT", default=None, help="system message opening the conversation"
    )
    parser.add_argument(
        "--edit-guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale of /edit; 1 turns guidance off (default: the model's own, "
             f"edit_guidance_scale in its mllm_config.json: {EDIT_GUIDANCE_SCALE:g} unless its training measured another)",
    )
    parser.add_argument(
        "--edit-guidance",
        choices=EDIT_GUIDANCE_MODES,
        default=EDIT_GUIDANCE,
        help=f"what /edit's guidance drops: the instruction or both (see `mllm edit --help`; default: {EDIT_GUIDANCE})",
    )


def run(args: argparse.Namespace) -> int:
    from mllm.terminal_chat import ChatOptions, ChatSession, converse, input_lines

    check_model_folder(args.model)
    if args.save_dir.exists() and not args.save_dir.is_dir():
        raise NotADirectoryError(f"--save-dir {args.save_dir} is not a folder")
    options = ChatOptions(
        save_dir=args.save_dir, system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, guidance_scale=args.guidance_scale,
        image_temperature=args.image_temperature, decoding=args.decoding,
        edit_guidance_scale=args.edit_guidance_scale, edit_guidance=args.edit_guidance,
    )  # fmt: skip
    model = load_model(args)
    session = ChatSession(model, options)
    if sys.stdin.isatty():
        session.note(f"mllm chat: {model!r}\n/help lists the commands; /quit or Ctrl-D leaves")
    converse(session, input_lines())
    return 0
