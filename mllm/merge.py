"""`mllm merge`: a base model folder + a LoRA adapter -> a full model folder.

    mllm merge --base DIR --adapter DIR --out DIR [--dtype auto|bf16|fp16|fp32]

peft's `merge_and_unload` folds the LoRA deltas into the projection weights and the trainable-token
rows (the added special tokens and image ids, `mllm.lora`) into the embedding matrix and the LM head, so
the written llm/ is a plain HF causal LM again (DESIGN.md, principle 1) that needs neither peft nor the
adapter. A codebook-mode base is written baked, as `UnifiedMLLM.save_pretrained` does by default.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CONFIG_NAME = "mllm_config.json"  # mllm.config.CONFIG_NAME, repeated to keep `--help` free of imports
ADAPTER_CONFIG_NAME = "adapter_config.json"


def _check_folders(base: Path, adapter: Path, out: Path) -> None:
    if not base.is_dir():
        raise ValueError(f"--base {base} does not exist or is not a folder")
    if not (base / CONFIG_NAME).is_file():
        raise ValueError(
            f"--base {base} is not a model folder ({CONFIG_NAME} missing; make one with `mllm init`)"
        )
    if not adapter.is_dir():
        raise ValueError(f"--adapter {adapter} does not exist or is not a folder")
    if not (adapter / ADAPTER_CONFIG_NAME).is_file():
        hint = (
            " (it is a model folder: merge an adapter INTO it with --base)"
            if (adapter / CONFIG_NAME).is_file()
            else ""
        )
        raise ValueError(
            f"--adapter {adapter} is not a peft adapter folder ({ADAPTER_CONFIG_NAME} missing){hint}"
        )
    if out.resolve() in (base.resolve(), adapter.resolve()):
        raise ValueError(f"--out {out} must differ from --base and --adapter")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / CONFIG_NAME).is_file():
        raise ValueError(f"--out {out} exists and is not a model folder; choose another --out")


def merge_adapter(
    base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None
) -> Path:
    """Load `base` with `adapter`, merge, write the full model folder `out` and return its path."""
    from mllm.model import UnifiedMLLM

    base, adapter, out = Path(base), Path(adapter), Path(out)
    _check_folders(base, adapter, out)
    # On the CPU: merging is a few matrix additions, and a folder is what comes out.
    model = UnifiedMLLM.from_pretrained(base, adapter=adapter, device="cpu", dtype=dtype)
    model.merge_adapter()
    return model.save_pretrained(out)


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
    try:
        out = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype)
    except ValueError as error:
        print(f"mllm merge: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} (base {args.base} + adapter {args.adapter}, merged)")
    return 0


__all__ = ["add_arguments", "merge_adapter", "run"]
