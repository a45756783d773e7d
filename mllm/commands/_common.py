"""Options and checks shared by `mllm caption | ask | draw`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIG_NAME = "mllm_config.json"  # mllm.config.CONFIG_NAME, repeated to keep `--help` free of imports


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, type=Path, help="model folder (made by `mllm init` / `mllm train`)"
    )
    parser.add_argument(
        "--adapter", type=Path, help="peft (LoRA) adapter folder to load onto the model's LLM"
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)"
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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def unit_float(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def error(command: str, message: str) -> int:
    print(f"mllm {command}: error: {message}", file=sys.stderr)
    return 2


def check_model_folder(model_dir: Path) -> str | None:
    """A message when `model_dir` is not a model folder, else None (checked before loading anything)."""
    if not model_dir.exists():
        return f"model folder {model_dir} does not exist"
    if not model_dir.is_dir():
        return f"--model {model_dir} is not a folder"
    if not (model_dir / CONFIG_NAME).is_file():
        return f"{model_dir} is not a model folder: {CONFIG_NAME} is missing (make one with `mllm init`)"
    return None


def read_images(paths: list[str]):
    """Open and validate every image first, so a bad path fails before the model loads.
    Returns (images, None) or (None, error message)."""
    from tokenizer_vision import load_image

    images = []
    for path in paths:
        if not Path(path).is_file():
            return None, f"image {path} does not exist"
        try:
            images.append(load_image(path))
        except ValueError as exn:
            return None, f"cannot read image: {exn}"
    return images, None


def load_model(args: argparse.Namespace):
    from mllm.api import load

    dtype = None if args.dtype == "auto" else args.dtype
    return load(args.model, adapter=args.adapter, device=args.device, dtype=dtype)


def text_sampling(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }
