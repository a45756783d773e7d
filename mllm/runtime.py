"""Device and precision choices shared by training, evaluation and serving.

One place decides whether bf16 autocast is used, so a run on a CPU without bf16 support
(or an old GPU) silently falls back to fp32 instead of crashing or crawling.
"""

from __future__ import annotations

import contextlib
import os

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" -> cuda when available, else cpu; anything else is passed to torch (a malformed name is a
    ValueError naming the usual ones)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:  # torch's own refusal: a long list of every backend it knows
        raise ValueError(f"unknown device {str(device)!r} (use auto, cpu, cuda or cuda:N)") from None


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


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory instead of handing it back to the kernel at once.

    A training step on the CPU frees and re-allocates the same large activation buffers every step; with
    glibc's defaults each buffer above the (adaptive) mmap threshold is a fresh mmap whose pages fault in
    zeroed, and the heap top is trimmed back, so the kernel's page-fault work showed up as about half of
    the CPU time of a shapes-LLM step. Raising the mmap and trim thresholds makes the buffers reuse heap
    memory. Returns False (and changes nothing) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
    # Buffers up to 32 MiB (glibc's largest mmap threshold on 64-bit) come from the heap; the heap is
    # trimmed only when 1 GiB at its top is free.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
