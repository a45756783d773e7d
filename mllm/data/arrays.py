"""Image sets held in memory as uint8 arrays, for the small vision jobs (teacher and tokenizer training,
tokenizer evaluation), read from webdataset shards or a plain folder of images (`mllm.data.image_folder`).

The shapes world and similar sets fit in memory, which makes epochs cheap and sampling exact (index into
one array); larger sets stream through `mllm.data.shards` instead. `load_image_arrays` gives one square
image per record (the shorter side resized, the centre cropped); `load_photos` keeps a folder's photos
whole (downscaled to a cap) for training on random crops of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from mllm.data.image_folder import is_image_folder, read_image_folder
from mllm.data.shards import DataStats, read_records


@dataclass
class ImageTextArrays:
    images: np.ndarray  # (N, S, S, 3) uint8
    texts: list[str]
    keys: list[str]
    stats: DataStats


class NoUsableImages(ValueError):
    """Every record of a data set was skipped; `stats` says why (e.g. `missing_caption` for a recipe that
    needs captions)."""

    def __init__(self, data: str | os.PathLike, stats: DataStats) -> None:
        super().__init__(f"no usable images found in {os.fspath(data)}: {stats.report()}")
        self.stats = stats


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
    """Read every record of the shards (or every image of the folder) at `data` into memory, each resized
    so its shorter side is `image_size` and centre-cropped to a square.

    Records whose image cannot be decoded (or that lack `text_field`) are skipped and counted
    by the reader; the counts come back in `stats`.
    """
    from tokenizer_vision.image_processing import ImageProcessor

    check_data_path(data)
    stats = DataStats()
    processor = ImageProcessor(image_size=image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    images, texts, keys = [], [], []
    # Every process loads the whole set; a sampler gives each rank its slice of every batch.
    for record in tqdm(read_any(data, stats), desc=f"loading {data}", disable=not progress, unit="img"):
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
        raise NoUsableImages(data, stats)
    return ImageTextArrays(np.stack(images), texts, keys, stats)


def read_any(data: str | os.PathLike, stats: DataStats):
    """Records `{"key", "image", "json"}` of a folder of images (`mllm.data.image_folder`) or of shards, read
    by one process (no per-rank split)."""
    if is_image_folder(data):
        return read_image_folder(data, stats)
    return read_records(data, stats=stats, split=False)


@dataclass
class Photos:
    """A folder's photos in memory, whole: each an (H, W, 3) uint8 array whose shorter side lies between the
    training image size and `max_side` (larger photos downscaled, smaller ones enlarged)."""

    images: list[np.ndarray]
    keys: list[str]
    stats: DataStats
    max_side: int


def load_photos(folder: str | os.PathLike, image_size: int, max_side: int, limit: int | None = None,
                progress: bool = True) -> Photos:
    """Every image of `folder`, resized (bicubic, aspect kept) so its shorter side is within
    [image_size, max_side]: what random training crops are cut from (`training.data.random_crops`)."""
    from PIL import Image

    max_side = max(int(max_side), int(image_size))
    stats = DataStats()
    images, keys = [], []
    for record in tqdm(read_image_folder(folder, stats), desc=f"loading {folder}", disable=not progress, unit="img"):
        image = record["image"]
        short = min(image.size)
        target = min(max(short, image_size), max_side)
        if target != short:
            scale = target / short
            size = (max(target, round(image.width * scale)), max(target, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
        images.append(np.asarray(image, dtype=np.uint8))
        keys.append(record["key"])
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise NoUsableImages(folder, stats)
    return Photos(images, keys, stats, max_side)


def to_pixel_values(batch_uint8: np.ndarray, mean, std) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float, normalised with `mean`/`std`."""
    pixels = torch.from_numpy(batch_uint8).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


__all__ = ["ImageTextArrays", "NoUsableImages", "Photos", "check_data_path", "load_image_arrays", "load_photos", "read_any",
           "to_pixel_values"]
