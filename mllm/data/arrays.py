"""Image shards held in memory as uint8 arrays, for the small vision jobs (teacher and tokenizer training,
tokenizer evaluation).

The shapes world and similar sets fit in memory, which makes epochs cheap and sampling exact (index into
one array); larger sets stream through `mllm.data.shards` instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from mllm.data.shards import DataStats, read_records


@dataclass
class ImageTextArrays:
    images: np.ndarray  # (N, S, S, 3) uint8
    texts: list[str]
    keys: list[str]
    stats: DataStats


def check_data_path(data: str | os.PathLike) -> None:
    """A `FileNotFoundError` for a local shard folder or file that does not exist (a brace pattern,
    a `::`-joined list or a URL is left to the shard reader)."""
    text = os.fspath(data)
    if any(mark in text for mark in ("{", "::", "://", "pipe:")):
        return
    if not os.path.exists(text):
        raise FileNotFoundError(f"data {text} does not exist")


def load_image_arrays(
    data: str,
    image_size: int,
    text_field: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> ImageTextArrays:
    """Read every record of the shards at `data` into memory, resized to `image_size`.

    Records whose image cannot be decoded (or that lack `text_field`) are skipped and counted
    by the shard reader; the counts come back in `stats`.
    """
    from tokenizer_vision.image_processing import ImageProcessor

    check_data_path(data)
    stats = DataStats()
    processor = ImageProcessor(image_size=image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    images, texts, keys = [], [], []
    # Every process loads the whole set; a sampler gives each rank its slice of every batch.
    for record in tqdm(read_records(data, stats=stats, split=False), desc=f"loading {data}", disable=not progress, unit="img"):
        if record["image"] is None:
            continue
        text = ""
        if text_field is not None:
            text = record["json"].get(text_field)
            if not isinstance(text, str) or not text:
                stats.skip(f"missing_{text_field}", record["key"])
                continue
        pixels = processor.preprocess(record["image"])[0]  # (3, S, S) in [0, 1]
        images.append((pixels.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8))
        texts.append(text)
        keys.append(record["key"])
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"no usable images found in {data}: {stats.report()}")
    return ImageTextArrays(np.stack(images), texts, keys, stats)


def to_pixel_values(batch_uint8: np.ndarray, mean, std) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float, normalised with `mean`/`std`."""
    pixels = torch.from_numpy(batch_uint8).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


__all__ = ["ImageTextArrays", "check_data_path", "load_image_arrays", "to_pixel_values"]
