"""What the small vision recipes (teacher, tokenizer) share: their common settings, the image set held
in memory (`mllm.data.arrays`), epoch sampling, random crops of photos and augmentation.

Held in memory, a set is sampled exactly (a seeded permutation per epoch) and a run resumes trivially
(epoch + position). Larger sets stream through `mllm.data.shards` in the LLM recipes instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mllm.data.arrays import ImageTextArrays, Photos, load_image_arrays, load_photos, to_pixel_values


@dataclass
class ImageRecipeConfig:
    """The settings of a recipe that trains on an in-memory image set (`load_images`) with its own loop."""

    data: str = ""  # image shards
    out: str = ""
    batch_size: int = 32  # per process
    max_steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32
    device: str = "auto"
    log_every: int = 25
    max_images: int | None = None

    def validate(self) -> None:
        if not self.data or not self.out:
            raise ValueError(f"the {getattr(self, 'recipe_kind', 'image')} recipe needs `data` and `out`")


def trained_already(out: Path, what: str) -> bool:
    """True (and says so) when OUT holds model.safetensors, which a run writes only when it completes."""
    if (out / "model.safetensors").is_file():
        print(f"{what} already trained at {out} (delete the folder to retrain)")
        return True
    return False


def load_images(data: str, image_size: int, limit: int | None, text_field: str | None = None,
                progress: bool = True) -> ImageTextArrays:
    """The image set of `data` in memory (`mllm.data.arrays.load_image_arrays`), reporting skipped records
    when `progress` (the main process)."""
    arrays = load_image_arrays(data, image_size, text_field=text_field, limit=limit, progress=progress)
    if arrays.stats.total_skipped and progress:
        print(f"skipped records: {arrays.stats.report()}")
    return arrays


def random_crops(photos: Sequence[np.ndarray], count: int, size: int, rng: np.random.Generator,
                 flip: bool = True) -> np.ndarray:
    """(count, size, size, 3) uint8 views of photos (H, W, 3): each a random photo, a random square crop
    of it whose side is log-uniform between `size` and the photo's shorter side (scale jitter: from
    pixel-level detail to the whole picture), resized to `size` (bicubic) and, with `flip`, mirrored
    left-right half of the time. A few large photos give many different training views."""
    from PIL import Image

    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for index in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        height, width = photo.shape[:2]
        short = min(height, width)
        side = short if short <= size else round(float(np.exp(rng.uniform(np.log(size), np.log(short)))))
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        view = photo[top : top + side, left : left + side]
        if side != size:
            view = np.asarray(Image.fromarray(view).resize((size, size), Image.Resampling.BICUBIC))
        out[index] = view[:, ::-1] if flip and rng.random() < 0.5 else view
    return out


class CropSampler:
    """Batches of random crops of in-memory photos (`random_crops`), seeded by (seed, batch number, rank):
    resumable from the batch number alone, and different on every rank."""

    def __init__(self, photos: Photos, batch_size: int, image_size: int, seed: int, rank: int = 0) -> None:
        self.photos, self.batch_size, self.image_size = photos, batch_size, image_size
        self.seed, self.rank = seed, rank
        self.batches = 0

    def next_batch(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.batches, self.rank])
        self.batches += 1
        return random_crops(self.photos.images, self.batch_size, self.image_size, rng)

    def state(self) -> dict:
        return {"batches": self.batches}

    def load_state(self, state: dict) -> None:
        self.batches = int(state["batches"])


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


__all__ = ["CropSampler", "EpochSampler", "ImageRecipeConfig", "ImageTextArrays", "Photos", "load_image_arrays",
           "load_images", "load_photos", "random_crops", "rescale_round_trip", "to_pixel_values", "trained_already"]
