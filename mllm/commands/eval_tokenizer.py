"""`mllm eval-tokenizer`: PSNR, SSIM, codebook use, semantic cosine and judge agreement of a vision
tokenizer on held-out image shards or a folder of images (also `mllm eval --suite tokenizer`)."""

from __future__ import annotations

import argparse
import math

from mllm.commands.types import device, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (from `mllm train-tokenizer`)")
    parser.add_argument("--data", required=True, help="held-out image shards or a folder of images "
                        "(.jpg/.jpeg/.png/.webp, recursively; centre crops at the tokenizer's size)")
    parser.add_argument("--out", help="folder for results.json and examples.png (default: TOKENIZER/eval)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default 64)")
    parser.add_argument("--limit", type=positive_int, help="evaluate at most this many images")
    parser.add_argument("--device", type=device, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))


def run(args: argparse.Namespace) -> int:
    from eval.tokenizer_metrics import report_tokenizer

    results = report_tokenizer(args.tokenizer, args.data, args.out, batch_size=args.batch_size, limit=args.limit,
                               device=args.device, precision=args.precision)
    return 0 if math.isfinite(results["psnr"]) else 1
