"""Measurement helpers shared by the benchmark scripts in this folder: matmul peak, FLOP counts, timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def measure_matmul_peak(dtype: torch.dtype = torch.bfloat16, size: int = 2048, repeats: int = 5,
                        device: str | torch.device = "cpu") -> float:
    """Best observed dense matmul rate in FLOP/s (2*n^3 per product) — the denominator of MFU."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.matmul(a, b)  # warm-up (thread pool, kernels)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, counted by torch's own FlopCounterMode (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
              device: str | torch.device = "cpu") -> list[float]:
    """Wall seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
