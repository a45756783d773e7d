"""Decoders: quantized features on the code grid -> pixels, and -> teacher features.

* `PixelDecoder` mirrors `PixelEncoder` (VQGAN-style). Its input is the concatenation of the active
  branches' quantized features: [e_sem; e_pix] in "dual" mode (TokenFlow), e_pix in "pixel" mode,
  e_sem in "semantic" mode.
* `SemanticDecoder` reconstructs the frozen teacher's patch features from the quantized semantic
  features; it is trained with 1 - cosine similarity, which is what distils the teacher into the
  semantic codebook (TokenFlow's semantic reconstruction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer_vision.config import TokenizerConfig
from tokenizer_vision.encoders import ResnetBlock, group_norm


class Upsample(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, 2H, 2W): nearest-neighbour upsampling then a 3x3 conv (no
    checkerboard artefacts, unlike transposed convolutions)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PixelDecoder(nn.Module):
    """Quantized features (B, d_in, h, w) -> image (B, 3, h * f, w * f) in the tokenizer's normalised space.

    d_in = d_sem + d_pix ("dual"), d_pix ("pixel") or d_sem ("semantic"). Levels mirror the encoder's;
    each upsampling conv already narrows to the next (finer) level's width, so the full-resolution
    level never runs a wide conv (the most expensive layer on a CPU).
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        in_channels = config.d_sem * config.uses_semantic + config.d_pix * config.uses_pixel
        self.conv_in = nn.Conv2d(in_channels, widths[-1], 3, padding=1)
        self.mid = ResnetBlock(widths[-1], widths[-1])
        levels = []
        for level in reversed(range(len(widths))):
            blocks: list[nn.Module] = [
                ResnetBlock(widths[level], widths[level]) for _ in range(config.res_blocks(level))
            ]
            if level != 0:
                blocks.append(Upsample(widths[level], widths[level - 1]))  # double H and W
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.Sequential(*levels)
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.in_channels, 3, padding=1)

    def forward(self, quantized_sem: torch.Tensor | None, quantized_pix: torch.Tensor | None) -> torch.Tensor:
        parts = [part for part in (quantized_sem, quantized_pix) if part is not None]
        h = self.conv_in(torch.cat(parts, dim=1))  # (B, C_last, h, w)
        h = self.levels(self.mid(h))  # (B, C0, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


class SemanticDecoder(nn.Module):
    """Quantized semantic features (B, d_sem, h, w) -> predicted teacher features (B, C_t, h, w)."""

    def __init__(self, config: TokenizerConfig, teacher_width: int) -> None:
        super().__init__()
        width = config.semantic_decoder_channels
        self.conv_in = nn.Conv2d(config.d_sem, width, 1)
        self.block = ResnetBlock(width, width)  # 3x3 convs: a little spatial context per code
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, teacher_width, 1)

    def forward(self, quantized_sem: torch.Tensor) -> torch.Tensor:
        h = self.block(self.conv_in(quantized_sem))  # (B, width, h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_t, h, w)


__all__ = ["PixelDecoder", "SemanticDecoder", "Upsample"]
