"""The shapes world: the built-in data set of the demo and the tests.

A scene is 1-3 coloured shapes on a white background, each centred in its own cell of a 3x3 grid.
Everything a task needs is generated from the scene, so every label is exact: the image
(`render`), a caption naming every object (`caption`), VQA pairs (`vqa_pairs`) and drawing prompts
(`draw_prompts`). `mllm.data.judge` reads images back into objects to score drawings.

Looks (`render(..., look=...)`, `LOOKS`): "exact" (the default) draws every object at a fixed size (EXTENTS),
centred in its cell, in its palette colour on pure white, pixel-exact and without anti-aliasing. "varied" is
the training world, so that models learn shapes rather than one renderer's pixels: sizes drawn from a range
per size word (SIZE_RANGES), centres jittered inside their cells, anti-aliasing on about half the images,
a slightly tinted, noisy background and slightly offset colours; an object's look is a function of
(seed, cell, size) only, so an edited scene (same seed) draws its untouched objects exactly as before.
"other" is a second rasteriser (PIL's ImageDraw, anti-aliased by downsampling, other sizes and offsets),
held out from training to evaluate on. The judge reads all three.

Cell phrasing (one phrase per cell, used by `ShapeObject.describe`, captions, prompts and questions):
"at the top left", "at the top", "at the top right", "on the left", "at the center", "on the right",
"at the bottom left", "at the bottom", "at the bottom right" (see `CELL_PHRASES`).

Everything is a pure function of an integer seed. Randomness comes only from `random.Random.random()`
seeded with a string: that is the one part of the random module Python promises to keep the same across
versions (`choice`, `sample` and `randrange` are not), so a seed names the same sample everywhere.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mllm.data.llava import write_llava
from mllm.data.samples import caption_qa_chat
from mllm.data.shards import write_shards

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
CELL_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "at the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
# Side of an object's bounding box as a fraction of the cell side. The gap between the two lets the
# judge tell sizes apart at any resolution, and a large object still leaves a 10% margin to the cell edge,
# so objects in neighbouring cells never touch.
EXTENTS: dict[str, float] = {"small": 0.45, "large": 0.8}
# The looks of `render`: "exact" (the default, fixed extents, no noise), "varied" (the training world) and
# "other" (a second rasteriser held out from training, for evaluation). See `render`.
LOOKS: tuple[str, ...] = ("exact", "varied", "other")
# "varied": an object's box side is drawn uniformly from its size word's range (fraction of the cell side);
# the judge reads the size by the gap between the ranges (0.58 to 0.72), whatever the look.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.42, 0.58), "large": (0.72, 0.88)}
# "varied": the object's centre moves uniformly by up to this much of the cell side along each axis, less
# where needed to keep VARIED_MIN_MARGIN of the cell side between its box and the cell edge.
VARIED_MAX_JITTER = 0.12
# 4% keeps two neighbours over a pixel apart at 48 px (a cell 16 px): at 2% two large objects jittered
# towards each other fill the two pixel columns at their cell boundary and the judge reads them as one.
VARIED_MIN_MARGIN = 0.04
VARIED_ANTIALIAS_SHARE = 0.5  # share of images drawn with 4x4 supersampled coverage, the rest binary
VARIED_SUPERSAMPLING = 4
VARIED_MAX_TINT = 6.0  # per image, the background is up to this many levels darker per channel
VARIED_NOISE_SIGMA = (2.0, 3.0)  # per image, the sigma of per-pixel Gaussian noise is drawn from this range
VARIED_MAX_COLOR_OFFSET = 10.0  # per object, levels per channel away from the palette colour
# "other": PIL's ImageDraw at 2x, LANCZOS-downsampled, with its own extents and a fixed per-object offset.
OTHER_EXTENTS: dict[str, float] = {"small": 0.56, "large": 0.84}
OTHER_MAX_OFFSET = 0.06
OTHER_SCALE = 2
DEFAULT_IMAGE_SIZE = 64
# Below this a small shape can rasterise to no pixel at all. (The judge needs 40 px to tell every shape apart.)
MIN_IMAGE_SIZE = 16
SPLITS: dict[str, int] = {"train": 0, "test": 1, "heldout": 1, "val": 1}  # split -> seed parity
# Indices per base seed; seeds of different base seeds never collide below this many samples.
_MAX_INDEX = 10**9
# Share of samples whose drawing prompt is the full-scene prompt (the rest get a partial prompt).
FULL_SCENE_PROMPT_SHARE = 0.75
# Render sizes of resized scenes (`make_sample(..., resized_share=p)`), drawn uniformly: half of them the
# default 64 px, the rest spread from upsampling (40 px) to strong downsampling (256 px).
RESIZE_SOURCE_SIZES: tuple[int, ...] = (64,) * 7 + (40, 56, 80, 96, 128, 192, 256)


def _rng(seed: int, purpose: str) -> random.Random:
    # A string seed is hashed with SHA-512 (seeding version 2, kept stable by Python); the purpose salt keeps
    # the scene, question and prompt streams of one seed independent of each other.
    return random.Random(f"{purpose}:{seed}")


def _pick(rng: random.Random, n: int) -> int:
    """A uniform index in range(n), drawn through `random()`, the only version-stable method."""
    return int(rng.random() * n)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(phrases: Sequence[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene (or one object the judge sees in an image)."""

    color: str
    shape: str
    size: str
    cell: str

    def __post_init__(self) -> None:
        for field, value, vocabulary in (
            ("color", self.color, tuple(COLORS)),
            ("shape", self.shape, SHAPES),
            ("size", self.size, SIZES),
            ("cell", self.cell, CELLS),
        ):
            if value not in vocabulary:
                raise ValueError(f"unknown {field} {value!r}; expected one of {vocabulary}")

    def describe(self, with_size: bool = True, with_cell: bool = True) -> str:
        """'a large red circle at the top left'; size and cell phrase are optional."""
        words = ([self.size] if with_size else []) + [self.color, self.shape]
        text = f"{_article(words[0])} {' '.join(words)}"
        return f"{text} {CELL_PHRASES[self.cell]}" if with_cell else text


@dataclass(frozen=True)
class Scene:
    """The objects of one image, sorted by cell (row-major) so that equal scenes compare equal."""

    objects: tuple[ShapeObject, ...]
    seed: int

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.objects, key=lambda obj: CELLS.index(obj.cell)))
        if not ordered:
            raise ValueError("a scene needs at least one object")
        cells = [obj.cell for obj in ordered]
        if len(set(cells)) != len(cells):
            raise ValueError(f"each object needs its own cell, got cells {cells}")
        object.__setattr__(self, "objects", ordered)  # frozen: sorting is part of construction

    def to_dict(self) -> dict:
        return {"seed": self.seed, "objects": [asdict(obj) for obj in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(objects=tuple(ShapeObject(**obj) for obj in data["objects"]), seed=int(data["seed"]))


def scene_seed(split: str, index: int, base_seed: int = 0) -> int:
    """The seed of sample `index` of `split`.

    Train seeds are even and test seeds odd, so the splits can never share a scene seed, whatever the
    index and base seed. "heldout" and "val" are aliases of "test".
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    if not 0 <= index < _MAX_INDEX:
        raise ValueError(f"index must be in [0, {_MAX_INDEX}), got {index}")
    if base_seed < 0:
        raise ValueError(f"base_seed must be non-negative, got {base_seed}")
    return 2 * (base_seed * _MAX_INDEX + index) + SPLITS[split]


def make_scene(seed: int, max_objects: int = 3, min_objects: int = 1) -> Scene:
    """A random scene: a uniform number of objects in distinct cells, each attribute uniform."""
    if not 1 <= min_objects <= max_objects <= len(CELLS):
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 9, got {min_objects}, {max_objects}")
    rng = _rng(seed, "scene")
    count = min_objects + _pick(rng, max_objects - min_objects + 1)
    free_cells = list(CELLS)
    objects = []
    for _ in range(count):
        cell = free_cells.pop(_pick(rng, len(free_cells)))
        color = tuple(COLORS)[_pick(rng, len(COLORS))]
        shape = SHAPES[_pick(rng, len(SHAPES))]
        size = SIZES[_pick(rng, len(SIZES))]
        objects.append(ShapeObject(color=color, shape=shape, size=size, cell=cell))
    return Scene(objects=tuple(objects), seed=seed)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Pixels inside `shape`, given pixel-centre offsets from the object centre and its half extent."""
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upright triangle filling its box: apex at the top centre, base along the bottom edge.
    return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)


def render(scene: Scene, size: int = DEFAULT_IMAGE_SIZE, look: str = "exact",
           max_jitter: float | None = None) -> Image.Image:
    """The scene as a `size` x `size` RGB image, drawn in one of LOOKS.

    "exact": pixels are set by testing pixel centres against the exact shape (box side EXTENTS of the cell,
    centred in it), with no anti-aliasing, so a render holds only palette colours and white and is identical
    on every machine.

    "varied", the training world: each object's box side is drawn from SIZE_RANGES, its centre jittered
    inside its cell, its colour offset by up to VARIED_MAX_COLOR_OFFSET per channel; per image, anti-aliasing
    (4x4 supersampled coverage) is on for about half the images, the background is slightly tinted and every
    pixel gets a little Gaussian noise. An object's look depends only on (scene.seed, cell, size), the image's
    only on scene.seed, so an edited scene (same seed) renders every untouched object exactly as before.

    "other", for evaluation only: a second rasteriser (PIL's ImageDraw at 2x, LANCZOS-downsampled) with its
    own extents (OTHER_EXTENTS) and a small fixed offset per object, no noise.

    `max_jitter` ("varied" only; None: VARIED_MAX_JITTER) bounds the centre offsets, in cell sides: 0.5 lets
    an object sit anywhere in its cell that keeps VARIED_MIN_MARGIN to the edge. Sizes, colours and noise
    are those of the same seed at any bound.
    """
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be at least {MIN_IMAGE_SIZE} px, got {size}")
    if max_jitter is not None and (look != "varied" or not 0.0 <= max_jitter <= 0.5):
        raise ValueError(f"max_jitter works with the varied look and lies in [0, 0.5], got {max_jitter} ({look})")
    if look == "varied":
        return _render_varied(scene, size, VARIED_MAX_JITTER if max_jitter is None else max_jitter)
    if look == "other":
        return _render_other(scene, size)
    if look != "exact":
        raise ValueError(f"unknown look {look!r}; expected one of {LOOKS}")
    pixels = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    centres = np.arange(size) + 0.5
    cell_side = size / 3
    for obj in scene.objects:
        row, col = divmod(CELLS.index(obj.cell), 3)
        dx = centres[None, :] - (col + 0.5) * cell_side  # (1, W)
        dy = centres[:, None] - (row + 0.5) * cell_side  # (H, 1)
        mask = _shape_mask(obj.shape, dx, dy, EXTENTS[obj.size] * cell_side / 2)  # (H, W)
        pixels[mask] = COLORS[obj.color]
    return Image.fromarray(pixels)


def _symmetric(rng: random.Random, reach: float) -> float:
    """Uniform in [-reach, reach]."""
    return (2.0 * rng.random() - 1.0) * reach


def varied_object_look(seed: int, cell: str, size: str,
                       max_jitter: float = VARIED_MAX_JITTER) -> tuple[float, float, float, tuple[float, ...]]:
    """(box side, centre offset x, centre offset y, colour offset) of a "varied" object, in cell sides and
    levels; a function of (seed, cell, size) only, so it survives any edit of the object's colour or shape
    and of the other objects."""
    rng = _rng(seed, f"look:{cell}:{size}")
    low, high = SIZE_RANGES[size]
    extent = low + (high - low) * rng.random()
    reach = min(max_jitter, (1.0 - extent) / 2 - VARIED_MIN_MARGIN)
    jitter_x, jitter_y = _symmetric(rng, reach), _symmetric(rng, reach)
    offset = tuple(_symmetric(rng, VARIED_MAX_COLOR_OFFSET) for _ in range(3))
    return extent, jitter_x, jitter_y, offset


def _cell_pixels(row: int, col: int, cell_side: float, size: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel index bounds (end exclusive) of every pixel touching a cell."""
    top, left = int(row * cell_side), int(col * cell_side)
    bottom, right = min(size, math.ceil((row + 1) * cell_side)), min(size, math.ceil((col + 1) * cell_side))
    return top, bottom, left, right


def _gaussian_noise(seed: int, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian noise from PCG64's raw output through Box-Muller: numpy keeps bit generators' streams stable
    across versions, not `Generator.normal`'s, and a seed must name the same image everywhere."""
    count = int(np.prod(shape))
    bits = np.random.PCG64(seed).random_raw(2 * count)
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1)
    radius = np.sqrt(-2.0 * np.log(uniform[:count]))
    return (sigma * radius * np.cos(2.0 * np.pi * uniform[count:])).reshape(shape)


def _render_varied(scene: Scene, size: int, max_jitter: float) -> Image.Image:
    image_rng = _rng(scene.seed, "look:image")
    antialias = image_rng.random() < VARIED_ANTIALIAS_SHARE
    tint = [VARIED_MAX_TINT * image_rng.random() for _ in range(3)]
    low_sigma, high_sigma = VARIED_NOISE_SIGMA
    sigma = low_sigma + (high_sigma - low_sigma) * image_rng.random()
    noise_seed = int(image_rng.random() * 2**32)
    samples = VARIED_SUPERSAMPLING if antialias else 1
    offsets = (np.arange(samples) + 0.5) / samples  # sample points inside a pixel

    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = np.subtract(BACKGROUND, tint)
    cell_side = size / 3
    for obj in scene.objects:
        extent, jitter_x, jitter_y, color_offset = varied_object_look(scene.seed, obj.cell, obj.size, max_jitter)
        row, col = divmod(CELLS.index(obj.cell), 3)
        top, bottom, left, right = _cell_pixels(row, col, cell_side, size)
        xs = (np.arange(left, right)[:, None] + offsets[None, :]).reshape(-1)
        ys = (np.arange(top, bottom)[:, None] + offsets[None, :]).reshape(-1)
        dx = xs[None, :] - (col + 0.5 + jitter_x) * cell_side
        dy = ys[:, None] - (row + 0.5 + jitter_y) * cell_side
        mask = _shape_mask(obj.shape, dx, dy, extent * cell_side / 2)
        coverage = mask.reshape(bottom - top, samples, right - left, samples).mean(axis=(1, 3))
        color = np.add(COLORS[obj.color], color_offset)
        region = canvas[top:bottom, left:right]
        region += coverage[..., None] * (color - region)  # zero coverage leaves a pixel exactly as it was
    canvas += _gaussian_noise(noise_seed, canvas.shape, sigma)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))


def _render_other(scene: Scene, size: int) -> Image.Image:
    big = Image.new("RGB", (size * OTHER_SCALE, size * OTHER_SCALE), BACKGROUND)
    draw = ImageDraw.Draw(big)
    cell_side = size * OTHER_SCALE / 3
    for obj in scene.objects:
        rng = _rng(scene.seed, f"other look:{obj.cell}:{obj.size}")
        offset_x, offset_y = _symmetric(rng, OTHER_MAX_OFFSET), _symmetric(rng, OTHER_MAX_OFFSET)
        row, col = divmod(CELLS.index(obj.cell), 3)
        centre_x, centre_y = (col + 0.5 + offset_x) * cell_side, (row + 0.5 + offset_y) * cell_side
        half = OTHER_EXTENTS[obj.size] * cell_side / 2
        # ImageDraw boxes are inclusive pixel indices: pixels left..right cover [left, right + 1).
        left, top = round(centre_x - half), round(centre_y - half)
        right, bottom = round(centre_x + half) - 1, round(centre_y + half) - 1
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:  # the same upright triangle: apex at the top centre, base along the box bottom
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return big.resize((size, size), Image.Resampling.LANCZOS)


def caption(scene: Scene) -> str:
    """Every object with size, colour, shape and cell, e.g. 'a large red circle at the top left and ...'."""
    return _join([obj.describe() for obj in scene.objects])


def _count(objects: Sequence[ShapeObject], **attributes: str) -> int:
    return sum(all(getattr(obj, key) == value for key, value in attributes.items()) for obj in objects)


def vqa_pairs(scene: Scene, seed: int | None = None) -> list[dict]:
    """Question-answer pairs about the scene, each {"question", "answer", "type"}.

    Types, in this order: "count" (all objects; one shape and one colour drawn at random, so "0" occurs),
    "color" and "shape" (one per object; the object is named by its shape or colour, plus its cell when that
    alone is ambiguous), "position" (per object whose colour and shape, or failing that size, colour and
    shape, single it out), "exists" (one present colour-shape pair -> "yes", one absent -> "no").
    Answers are lower-case words or digits. Deterministic given the scene and `seed` (default: scene.seed).
    """
    rng = _rng(scene.seed if seed is None else seed, "vqa")
    objects = scene.objects
    pairs: list[dict] = []

    def add(question: str, answer: str | int, kind: str) -> None:
        pairs.append({"question": question, "answer": str(answer), "type": kind})

    shape = SHAPES[_pick(rng, len(SHAPES))]
    color = tuple(COLORS)[_pick(rng, len(COLORS))]
    add("How many objects are there?", len(objects), "count")
    add(f"How many {shape}s are there?", _count(objects, shape=shape), "count")
    add(f"How many {color} objects are there?", _count(objects, color=color), "count")

    for obj in objects:
        where = f" {CELL_PHRASES[obj.cell]}" if _count(objects, shape=obj.shape) > 1 else ""
        add(f"What colour is the {obj.shape}{where}?", obj.color, "color")
    for obj in objects:
        where = f" {CELL_PHRASES[obj.cell]}" if _count(objects, color=obj.color) > 1 else ""
        add(f"What shape is the {obj.color} object{where}?", obj.shape, "shape")
    for obj in objects:
        if _count(objects, color=obj.color, shape=obj.shape) == 1:
            add(f"Where is the {obj.color} {obj.shape}?", obj.cell, "position")
        elif _count(objects, size=obj.size, color=obj.color, shape=obj.shape) == 1:
            add(f"Where is the {obj.size} {obj.color} {obj.shape}?", obj.cell, "position")

    present = objects[_pick(rng, len(objects))]
    add(f"Is there {_article(present.color)} {present.color} {present.shape}?", "yes", "exists")
    absent = [(c, s) for c in COLORS for s in SHAPES if not _count(objects, color=c, shape=s)]
    absent_color, absent_shape = absent[_pick(rng, len(absent))]  # never empty: 18 pairs, <= 9 objects
    add(f"Is there {_article(absent_color)} {absent_color} {absent_shape}?", "no", "exists")
    return pairs


def draw_prompts(scene: Scene) -> list[str]:
    """Drawing prompts that `render(scene)` fully satisfies; the first is the full-scene prompt.

    The full-scene prompt is the caption: every object with all four attributes, which the judge reads as
    a complete description (no other objects allowed). Every other prompt leaves out size or cell, which
    the judge reads as partial (other objects allowed): per object "a red circle", "a large red circle",
    "a red circle at the top left", and for several objects all of them with their cells but no sizes.
    """
    prompts = [caption(scene)]
    for obj in scene.objects:
        prompts += [
            obj.describe(with_size=False, with_cell=False),
            obj.describe(with_cell=False),
            obj.describe(with_size=False),
        ]
    if len(scene.objects) > 1:
        prompts.append(_join([obj.describe(with_size=False) for obj in scene.objects]))
    return list(dict.fromkeys(prompts))  # objects sharing colour and shape repeat a prompt


def resized(image: Image.Image, size: int) -> Image.Image:
    """`image` brought to `size` x `size` exactly as a model's image processor does it on the way in
    (bicubic resize of the short side, centre crop), so training sees what inference will see."""
    from tokenizer_vision.image_processing import ImageProcessor

    return ImageProcessor(size).resize_and_crop(image)


def make_sample(
    seed: int, size: int = DEFAULT_IMAGE_SIZE, resized_share: float = 0.0, look: str = "exact"
) -> dict:
    """One sample: key, image, scene dict, caption, VQA pairs and (usually) one drawing prompt.

    The prompt is the full-scene prompt with probability FULL_SCENE_PROMPT_SHARE, else a uniformly drawn
    partial one, chosen by the seed.

    With probability `resized_share` (chosen by the seed) the scene is rendered at another size, drawn from
    RESIZE_SOURCE_SIZES, and `resized` to `size`: a model trained at one size then also reads scenes rendered
    at others, whose edges come out blended by the resize (a model that only saw exact renders loses several
    points of VQA accuracy on them). Such a sample records `rendered_size` and has no drawing prompt, so the
    model still learns to draw exact renders.

    `look` is the `render` look of the image (the resized one too); a sample of a look other than "exact"
    records it as "look".
    """
    if not 0.0 <= resized_share <= 1.0:
        raise ValueError(f"resized_share must be in [0, 1], got {resized_share}")
    if look not in LOOKS:
        raise ValueError(f"unknown look {look!r}; expected one of {LOOKS}")
    scene = make_scene(seed)
    prompts = draw_prompts(scene)
    rng = _rng(seed, "prompt")
    if rng.random() < FULL_SCENE_PROMPT_SHARE:
        prompt = prompts[0]
    else:
        prompt = prompts[1 + _pick(rng, len(prompts) - 1)]  # always >= 3 partial prompts
    sample = {
        "key": f"{seed:012d}",
        "scene": scene.to_dict(),
        "caption": caption(scene),
        "qa": vqa_pairs(scene),
        **({"look": look} if look != "exact" else {}),
    }
    rng = _rng(seed, "render size")
    if resized_share > 0.0 and rng.random() < resized_share:
        sources = [s for s in RESIZE_SOURCE_SIZES if s != size]
        source = sources[_pick(rng, len(sources))]
        return {**sample, "image": resized(render(scene, source, look), size), "rendered_size": source}
    return {**sample, "image": render(scene, size, look), "prompt": prompt}


def iter_samples(
    n: int,
    split: str = "train",
    base_seed: int = 0,
    size: int = DEFAULT_IMAGE_SIZE,
    resized_share: float = 0.0,
    look: str = "exact",
) -> Iterator[dict]:
    """The first `n` samples of a split: make_sample(scene_seed(split, i, base_seed), size, resized_share,
    look)."""
    for index in range(n):
        yield make_sample(scene_seed(split, index, base_seed), size, resized_share, look)


def _with_task_records(samples: Iterator[dict], size: int, look: str) -> Iterator[dict]:
    from mllm.data.shapes_tasks import task_records  # it imports this module

    for sample in samples:
        yield sample
        yield from task_records(sample["scene"]["seed"], size, look)


def write_shapes_data(out: str | Path, n: int, seed: int = 0, size: int = DEFAULT_IMAGE_SIZE, split: str = "train",
                      resized_share: float = 0.0, format: str = "wds", maxcount: int = 1000,
                      overwrite: bool = False, progress: bool = True, look: str = "exact", tasks: bool = False) -> Path:
    """`mllm data shapes`: the first `n` scenes of a split written as webdataset shards (format "wds":
    {key}.png + {key}.json with caption, qa, prompt and scene; OUT/index.json lists them) or as LLaVA JSON
    (format "llava": OUT/llava.json + OUT/images/, one multi-turn chat per scene). Returns what it wrote
    (the index or the JSON file). `look` is the `render` look of every image. `tasks` (wds only): each scene's
    record is followed by its two-image records (`mllm.data.shapes_tasks.task_records`: an edit, and a pair
    with an unrelated scene, each with its questions over the two). Same arguments, same bytes."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"--size must be at least {MIN_IMAGE_SIZE} pixels, got {size}")
    if not 0.0 <= resized_share <= 1.0:
        raise ValueError(f"--resized-share must be between 0 and 1, got {resized_share}")
    if format not in ("wds", "llava"):
        raise ValueError(f"--format must be wds or llava, got {format!r}")
    if look not in LOOKS:
        raise ValueError(f"--look must be one of {', '.join(LOOKS)}, got {look!r}")
    if tasks and format != "wds":
        raise ValueError("--tasks writes records of two images, which only the wds format holds")
    scenes = iter_samples(n, split=split, base_seed=seed, size=size, resized_share=resized_share, look=look)
    if tasks:
        scenes = _with_task_records(scenes, size, look)
    if format == "llava":
        chats = (caption_qa_chat(s["key"], s["image"], s["caption"], s["qa"]) for s in scenes)
        return write_llava(chats, out, progress=progress)
    try:
        write_shards(scenes, out, maxcount=maxcount, progress=progress, overwrite=overwrite)
    except FileExistsError as error:
        raise FileExistsError(f"{error}; pass --overwrite to replace them") from None
    return out / "index.json"
