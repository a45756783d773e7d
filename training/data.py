"""In-memory image datasets for the small vision recipes (teacher, tokenizer).

The shapes world and similar sets fit in memory as uint8 arrays, which makes epochs cheap,
sampling exact (a seeded permutation per epoch) and resume trivial (epoch + position). Larger
sets stream through `mllm.data.shards` in the LLM recipes instead.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    stats = DataStats()
    processor = ImageProcessor(image_size=image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    images, texts, keys = [], [], []
    # Every process loads the whole set; EpochSampler gives each rank its slice of every batch.
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


def rescale_round_trip(
    batch_uint8: np.ndarray, share: float, factors: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """A copy of (B, S, S, 3) uint8 images where a `share` of them made a round trip through another size.

    Each chosen image goes to round(S * f) px, f drawn from `factors` (nearest-neighbour when enlarging,
    so edges stay hard as in an image drawn at that size; bicubic when shrinking), and comes back with
    the image processor's own bicubic resize: what a picture made at another size looks like once the
    processor has brought it to S. Trained on such inputs against the clean image, a tokenizer's encoder
    learns to give them the clean image's codes.
    """
    from PIL import Image

    from tokenizer_vision.image_processing import ImageProcessor

    out = batch_uint8.copy()
    size = batch_uint8.shape[1]
    processor = ImageProcessor(size)
    for index in np.flatnonzero(rng.random(len(batch_uint8)) < share):
        side = max(1, round(size * float(factors[rng.integers(len(factors))])))
        if side == size:
            continue
        image = Image.fromarray(batch_uint8[index])
        resample = Image.Resampling.NEAREST if side > size else Image.Resampling.BICUBIC
        out[index] = np.asarray(processor.resize_and_crop(image.resize((side, side), resample)))
    return out


def to_pixel_values(batch_uint8: np.ndarray, mean, std) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float, normalised with `mean`/`std`."""
    pixels = torch.from_numpy(batch_uint8).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


class EpochSampler:
    """Seeded per-epoch permutations, resumable from (epoch, position).

    `state()` after `k` batches plus `load_state()` reproduces exactly the batches an
    uninterrupted run would have drawn next.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_items < batch_size * world_size:
            raise ValueError(
                f"{num_items} items are fewer than one global batch ({batch_size} x {world_size} processes)"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def next_indices(self) -> np.ndarray:
        global_batch = self.batch_size * self.world_size
        if self.position + global_batch > self.num_items:  # drop the ragged tail of an epoch
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        chunk = self._order[self.position : self.position + global_batch]
        self.position += global_batch
        return chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
