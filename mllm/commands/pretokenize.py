"""`mllm pretokenize`: replace the images of shards (or a folder of images) by their vision-tokenizer code
grids (mllm.data.pretokenize), once, so LLM training never runs the tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm.commands._common import add_output_arguments
from mllm.commands.types import device, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, help="source shards (a directory of *.tar, or a pattern) or a folder of images "
        "(.jpg/.jpeg/.png/.webp, recursively: image-only records)"
    )
    parser.add_argument(
        "--vision-tokenizer", required=True, type=Path, help="a tokenizer folder (save_pretrained output)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (created if missing)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per tokenizer call (default: 64)"
    )
    parser.add_argument(
        "--maxcount", type=positive_int, default=1000, help="records per shard (default: 1000)"
    )
    parser.add_argument("--device", type=device, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto",
        help="encoder precision: auto = bf16 autocast where supported (default: auto)",
    )  # fmt: skip
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from mllm.data.pretokenize import pretokenize

    pretokenize(args.data, args.vision_tokenizer, args.out, batch_size=args.batch_size, maxcount=args.maxcount,
                device=args.device, precision=args.precision, overwrite=args.overwrite,
                progress=not args.no_progress)
    return 0
