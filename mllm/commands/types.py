"""argparse value types shared by every `mllm` subcommand: a bad value is refused by argparse with
one line that names the option (`argument --n: must be a positive integer, got 0`)."""

from __future__ import annotations

import argparse
import re

# What torch.device takes for the accelerators this project runs on, plus "auto" (cuda when available).
_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def unit_float(text: str) -> float:
    """A probability mass in (0, 1] (top-p)."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def share(text: str) -> float:
    """A fraction in [0, 1] (shares of a data set)."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def port(text: str) -> int:
    """A TCP port, 0-65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {value}")
    return value


def device(text: str) -> str:
    """auto, cpu, cuda, cuda:N, mps, xpu[:N]: a typo or an accelerator this machine lacks is refused here,
    before any model loads (torch is imported only to check an accelerator)."""
    if not _DEVICE.fullmatch(text):
        from tokenizer_vision.schema import closest

        suggestion = closest(text.split(":")[0], ("auto", "cpu", "cuda", "mps", "xpu"))
        hint = f"did you mean {suggestion}? " if suggestion else ""
        raise argparse.ArgumentTypeError(f"unknown device {text!r} ({hint}use auto, cpu, cuda or cuda:N)")
    if text in ("auto", "cpu"):
        return text
    import torch

    kind, _, index = text.partition(":")
    backend = getattr(torch, kind, None) if kind != "mps" else torch.backends.mps
    if backend is None or not backend.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no {kind.upper()} device on this machine (use cpu or auto)")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if index and int(index) >= count:
        raise argparse.ArgumentTypeError(f"{text}: this machine has {count} {kind.upper()} device(s), "
                                         f"{kind}:0 to {kind}:{count - 1}")
    return text


__all__ = ["device", "non_negative_float", "port", "positive_float", "positive_int", "share", "unit_float"]
