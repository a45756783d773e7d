"""`mllm merge`: a base model folder + a LoRA adapter -> a full model folder.

    mllm merge --base DIR --adapter DIR --out DIR [--dtype auto|bf16|fp16|fp32]

peft's `merge_and_unload` folds the LoRA deltas into the projection weights and the trainable-token
rows (the added special tokens and image ids, `mllm.lora`) into the embedding matrix and the LM head, so
the written llm/ is a plain HF causal LM again (any engine that serves its architecture can load it) that needs neither peft nor the
adapter. A codebook-mode base is written baked, as `UnifiedMLLM.save_pretrained` does by default.
"""

from __future__ import annotations

import os
from pathlib import Path

from mllm.config import CONFIG_NAME

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
        raise ValueError(f"--out {out} exists and is not a model folder (choose another --out)")


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


__all__ = ["merge_adapter"]
