"""Device and precision choices shared by training, evaluation and serving.

One place decides whether bf16 autocast is used, so a run on a CPU without bf16 support
(or an old GPU) silently falls back to fp32 instead of crashing or crawling.
"""

from __future__ import annotations

import contextlib
import os

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" -> cuda when available, else cpu; anything else is passed to torch."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """True when bf16 matmuls run natively (AVX-512 BF16 / AMX on CPU, Ampere+ on CUDA)."""
    device = torch.device(device)
    if os.environ.get("MLLM_DISABLE_BF16"):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """Map "auto" | "bf16" | "fp32" to the precision actually used on `device`."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        raise ValueError(f"bf16 was requested but {torch.device(device)} does not support it; use 'fp32' or 'auto'")
    return precision


def autocast(precision: str, device: str | torch.device = "cpu"):
    """Context manager: bf16 autocast when `precision` resolves to bf16, a no-op otherwise."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
