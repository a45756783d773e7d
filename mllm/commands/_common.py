"""Options and checks shared by the `mllm` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm.commands.types import device, non_negative_float, positive_int, unit_float
from mllm.config import (
    DECODING_METHODS,
    DEFAULT_DECODING,
    DRAW_GUIDANCE_SCALE,
    DRAW_TEMPERATURE,
    JACOBI_AUTO_MAX_IMAGES,
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, type=Path, help="model folder (made by `mllm init` / `mllm train`)"
    )
    parser.add_argument(
        "--adapter", type=Path, help="peft (LoRA) adapter folder to load onto the model's LLM"
    )
    parser.add_argument(
        "--device", type=device, default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="weights dtype (default: auto, the dtype the model was saved in)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (default: unseeded)")


def add_text_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=max_new_tokens,
        help=f"longest reply in tokens (default: {max_new_tokens})",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="0 (default) decodes greedily; above 0 samples",
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=None, help="sample among the k likeliest tokens"
    )
    parser.add_argument("--top-p", type=unit_float, default=None, help="nucleus sampling mass")


def add_draw_sampling_arguments(parser: argparse.ArgumentParser, guidance_flag: str = "--guidance-scale",
                                temperature_flag: str = "--temperature") -> None:
    """Classifier-free guidance scale, image-code temperature and decoding method, with the defaults every entry
    point shares."""
    parser.add_argument(
        guidance_flag,
        type=float,
        default=DRAW_GUIDANCE_SCALE,
        help=f"classifier-free guidance scale of drawn images; 1 turns guidance off (default: {DRAW_GUIDANCE_SCALE})",
    )
    parser.add_argument(
        temperature_flag,
        type=non_negative_float,
        default=DRAW_TEMPERATURE,
        help=f"sampling temperature of drawn images' codes; 0 is greedy (default: {DRAW_TEMPERATURE})",
    )
    add_decoding_argument(parser)


def add_decoding_argument(parser, what: str = "how drawn images are decoded") -> None:
    """--decoding: how drawn images' codes are decoded (`mllm.generation.sample_image_codes`)."""
    parser.add_argument(
        "--decoding",
        choices=DECODING_METHODS,
        default=DEFAULT_DECODING,
        help=f"{what}: jacobi (speculative Jacobi decoding: several image codes per forward pass, each accepted "
             "by the speculative-sampling rule, so fewer passes), sequential (one code per pass) or auto (jacobi "
             f"for up to {JACOBI_AUTO_MAX_IMAGES} images at a time, the faster one); all draw from the same "
             f"distribution, and greedy drawings are identical (default: {DEFAULT_DECODING})",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--overwrite and --no-progress of the commands that write shards."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards left in --out by an earlier run instead of failing",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def check_model_folder(model_dir: Path) -> None:
    """Refuse what is not a complete model folder before anything loads."""
    from mllm.model import check_model_folder as check

    if not model_dir.exists():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    check(model_dir)


def read_images(paths: list[str]) -> list:
    """Open and validate every image first, so a bad path fails before the model loads."""
    from tokenizer_vision import load_image

    images = []
    for path in paths:
        if Path(path).is_dir():
            raise IsADirectoryError(f"image {path} is a folder (give an image file: PNG, JPEG, WEBP, ...)")
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        try:
            images.append(load_image(path))
        except ValueError as exn:
            raise ValueError(f"cannot read image: {exn} (give an image file: PNG, JPEG, WEBP, ...)") from None
    return images


def check_text(text: str, what: str) -> None:
    if not text.strip():
        raise ValueError(f"the {what} is empty (give a {what} in quotes)")


def load_model(args: argparse.Namespace):
    from mllm.api import load
    from mllm.commands import worker

    dtype = None if args.dtype == "auto" else args.dtype

    def load_now():
        return load(args.model, adapter=args.adapter, device=args.device, dtype=dtype)

    if worker.MODELS is not None:  # in the warm worker: a model folder is loaded once, until it changes
        return worker.MODELS.get(args.model, args.adapter, args.device, dtype, load_now)
    return load_now()


def text_sampling(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }
