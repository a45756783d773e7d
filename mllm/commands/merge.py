"""`mllm merge`: a base model folder + a LoRA adapter -> a full model folder (mllm.merge)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", required=True, type=Path, help="the model folder the adapter was trained on"
    )
    parser.add_argument(
        "--adapter",
        required=True,
        type=Path,
        help="peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors)",
    )
    parser.add_argument("--out", required=True, type=Path, help="the full model folder to write")
    parser.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="dtype of the merged weights (default: auto, the base's own)",
    )


def run(args: argparse.Namespace) -> int:
    from mllm.merge import merge_adapter

    out = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype)
    print(f"wrote {out} (base {args.base} + adapter {args.adapter}, merged)")
    return 0
