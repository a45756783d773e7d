"""The programmatic judge of the shapes world: read an image back into objects, score drawing prompts.

`parse_image` works on any RGB image, clean render or not (tokenizer reconstructions, model drawings):

1. Each pixel is explained as a mix of the white background and one palette colour: its "strength" is how
   far it lies along the white-to-colour line (0 white, 1 the pure colour) and its colour is the palette
   colour whose line passes closest. A blurred blue edge is thus half-strength blue, not the purple that
   plain nearest-colour matching would call it. Pixels of strength >= 0.5 are ink.
2. Ink is split into 8-connected components; components smaller than 3% of a cell are specks and dropped.
3. Each component goes to the cell holding its centroid, and the components of one cell form one object,
   so an object drawn a little off-centre, or broken in two, is still one object in the right cell.
4. Per object: colour by strength-weighted vote. The other measures are sub-pixel, so that anti-aliased
   edges (half-covered edge pixels) read the same as sharp ones: over the object's ink plus the ring of
   pixels around it, a row or column counts by its strongest pixel, which gives the box sides, and strength
   sums give the area. Size from the longer box side relative to the cell side (a triangle, whose thin apex
   and base corners come out up to a pixel short, by its area when that says more), with the threshold in
   the middle of the gap between small and large objects of every look (LARGE_MIN_EXTENT); shape from
   measurements of the box: an upright triangle puts only a quarter of its ink in the top half (circles and
   squares half), and a square fills its box (circles fill pi/4 of it) including the box corners (a circle
   never reaches them).

Reads every look of `mllm.data.shapes.render`: "exact" (fixed sizes, centred, pixel-exact), "varied" (the
training world: sizes within SIZE_RANGES, jittered centres, anti-aliasing on about half the images, slight
background and colour noise) and "other" (PIL's anti-aliased drawing, other sizes and offsets). Exact on clean
"exact" and "other" renders from 40 px up (every kind of object in every cell checked at each size from 40 to
139 px and at 150-512 px, and 100 random scenes at each), bar the touching objects of the limitation below;
under 40 px small objects are at most 5 px wide, where a disk rasterises to a square. "varied" renders: 2999
of 3000 random scenes read exactly at 48 px, all 3000 at 64 and 96 px, 2989 at 40 px (and "other": 3000 at
48-96 px, 2997 at 40 px); the misreads left are small disks drawn without anti-aliasing at an unlucky
sub-pixel offset, which at 6-7 px wide rasterise to a square with a cut corner or a lopsided blob (about 1 in
4500 small objects at 48 px, 1 in 400 at 40 px, none from 56 px). "varied" keeps objects 4% of a cell from
their cell's edge, so its neighbours never touch (none in 3000 three-object scenes at 40 and 48 px). At 64 px
the judge still reads 499-500 of 500 scenes after a Gaussian blur of radius 1 plus noise of sigma 8/255, in
every look; at blur radius 1.5 about 97%; at 2 small shapes blur into blobs and small squares and triangles
are read as circles.
Limitation: two objects drawn touching each other merge into one component and are read as one object
("other" renders at 40 px do so about once in 500 three-object scenes, at 48 px once in 3000).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import asdict

import numpy as np
from PIL import Image

from mllm.data.shapes import (
    BACKGROUND,
    CELLS,
    COLORS,
    EXTENTS,
    OTHER_EXTENTS,
    SHAPES,
    SIZE_RANGES,
    SIZES,
    ShapeObject,
)

# The judge reports what it sees in the scene's own vocabulary.
DetectedObject = ShapeObject

# Half-way between background and colour: a blurred straight edge crosses it where the sharp edge was.
MIN_INK_STRENGTH = 0.5
# Smallest object, as a share of the cell area; a small triangle (the smallest shape) covers about 10%.
MIN_OBJECT_AREA = 0.03
# Box side (fraction of the cell side) from which an object is large: the middle of the gap between the
# largest small and the smallest large object of every look (0.58 and 0.72, the "varied" ranges).
LARGE_MIN_EXTENT = (
    max(EXTENTS["small"], OTHER_EXTENTS["small"], SIZE_RANGES["small"][1])
    + min(EXTENTS["large"], OTHER_EXTENTS["large"], SIZE_RANGES["large"][0])
) / 2
# Share of an object's area in the top half of its box: 1/4 for an upright triangle, 1/2 for the others.
# The cut sits nearer 1/2 because blur rounds off a triangle's apex, raising its share, while circles and
# squares stay symmetric; tuned on blurred, noisy renders.
TRIANGLE_MAX_TOP_SHARE = 0.42
# Share of its (sub-pixel) box an object fills: 1 for a square, pi/4 for a circle.
SQUARE_MIN_FILL = 0.89
# Mean strength of the four corner pixels of the box: 1 for a square (0.4-0.5 once blurred), near 0 for a
# circle, whose box corners lie outside the disk. Needed because a disk only 7-11 px wide rasterises to a
# square with cut corners that fills up to 94% of its box.
SQUARE_MIN_CORNER_STRENGTH = 0.2

# Each palette colour as its offset from the white background ("ink"), and that offset's squared norm.
_PALETTE_INK = np.subtract(BACKGROUND, list(COLORS.values()), dtype=np.float32)  # (K, 3)
_PALETTE_NORM2 = (_PALETTE_INK**2).sum(axis=1)  # (K,)
_COLOR_NAMES = tuple(COLORS)


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in [0, 255] from a PIL image, a uint8 array or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    return np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0


def _classify_pixels(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, (strength along its best white-to-colour line, index of that colour); both (H, W)."""
    height, width = pixels.shape[:2]
    ink = np.asarray(BACKGROUND, dtype=np.float32) - pixels.reshape(-1, 3)  # (N, 3)
    along = ink @ _PALETTE_INK.T  # (N, K)
    strength = np.clip(along / _PALETTE_NORM2, 0.0, 1.0)  # (N, K)
    # Squared distance from the pixel to the point `strength` along each line, up to the pixel's own
    # squared norm, which is the same for every line and so cannot change the argmin.
    residual2 = strength * (strength * _PALETTE_NORM2 - 2 * along)  # (N, K)
    best = residual2.argmin(axis=1)  # (N,)
    return strength[np.arange(len(best)), best].reshape(height, width), best.reshape(height, width)


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels, count), label 0 being background.

    Run-based two-pass labelling: numpy finds each row's runs and Python loops over runs only (a handful
    per row for shapes), which is fast without scipy, a dependency the core package does not have.
    """
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # exclusive; row-major order pairs each end with its start
    row_first = np.searchsorted(rows, np.arange(height + 1)).tolist()
    starts_list, ends_list = starts.tolist(), ends.tolist()

    parent = list(range(len(starts_list)))

    def find(run: int) -> int:
        while parent[run] != run:
            parent[run] = parent[parent[run]]
            run = parent[run]
        return run

    for row in range(1, height):
        above, above_end = row_first[row - 1], row_first[row]
        here, here_end = row_first[row], row_first[row + 1]
        while above < above_end and here < here_end:
            # 8-connected: runs touch when their column ranges overlap once widened by one pixel.
            if starts_list[above] <= ends_list[here] and starts_list[here] <= ends_list[above]:
                parent[find(above)] = find(here)
            if ends_list[above] < ends_list[here]:
                above += 1
            else:
                here += 1

    roots = [find(run) for run in range(len(parent))]
    label_of_root = {root: label for label, root in enumerate(dict.fromkeys(roots), start=1)}
    labels = np.zeros((height, width), dtype=np.int32)
    for row, start, end, root in zip(rows.tolist(), starts_list, ends_list, roots):
        labels[row, start:end] = label_of_root[root]
    return labels, len(label_of_root)


def _read_object(
    owner: np.ndarray, index: int, colors: np.ndarray, strength: np.ndarray, cell_w: float, cell_h: float
) -> ShapeObject:
    """The object of cell `index`: the pixels that `owner` (each pixel's cell index, -1 for none) gives it."""
    mask = owner == index
    ys, xs = np.nonzero(mask)
    votes = np.bincount(colors[ys, xs], weights=strength[ys, xs], minlength=len(_COLOR_NAMES))
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    corner_strength = strength[[top, top, bottom, bottom], [left, right, left, right]].mean()

    # The object's strength over its ink and the ring of pixels around it, where anti-aliased or blurred
    # edges put partial strength (below the ink threshold) that the sub-pixel measures below need.
    y0, y1 = max(top - 1, 0), min(bottom + 2, mask.shape[0])
    x0, x1 = max(left - 1, 0), min(right + 2, mask.shape[1])
    window = np.pad(mask[y0:y1, x0:x1], 1)
    grown = np.zeros_like(window[1:-1, 1:-1])
    for dy, dx in itertools.product(range(3), range(3)):
        grown |= window[dy : dy + y1 - y0, dx : dx + x1 - x0]
    free = np.isin(owner[y0:y1, x0:x1], (index, -1))  # not another object's ink
    ink = np.where(grown & free, strength[y0:y1, x0:x1], 0.0)  # (h, w)
    area = float(ink.sum())
    row_peak, column_peak = ink.max(axis=1), ink.max(axis=0)
    # Sub-pixel box sides: a row (column) counts by its strongest pixel, so half-covered edge rows count half.
    height, width = float(row_peak.sum()), float(column_peak.sum())
    fill = area / (width * height)
    # The box's centre line, between its sub-pixel top and bottom edges: the edge row and the ring row beyond
    # it count by their peaks, so an edge row the shape only half covers moves the line by half a pixel.
    top_edge = top + 1 - float(row_peak[: top - y0 + 1].sum())
    bottom_edge = bottom + float(row_peak[bottom - y0 :].sum())
    middle = (top_edge + bottom_edge) / 2
    top_share = float(np.clip(middle - ys, 0.0, 1.0).sum()) / len(ys)  # share of the ink pixels above it
    extent = max(width / cell_w, height / cell_h)

    if top_share < TRIANGLE_MAX_TOP_SHARE:
        shape = "triangle"
        # A triangle's apex and base corners are too thin to fill their edge pixels, so its box comes out up
        # to a pixel short; its area (half its box) is not.
        extent = max(extent, float(np.sqrt(2 * area / (cell_w * cell_h))))
    elif fill >= SQUARE_MIN_FILL and corner_strength >= SQUARE_MIN_CORNER_STRENGTH:
        shape = "square"
    else:
        shape = "circle"
    return ShapeObject(
        color=_COLOR_NAMES[int(votes.argmax())],
        shape=shape,
        size="large" if extent >= LARGE_MIN_EXTENT else "small",
        cell=CELLS[index],
    )


def parse_image(image: Image.Image | np.ndarray) -> list[ShapeObject]:
    """The objects in an image, at most one per cell, sorted by cell (see the module docstring for how).

    `image` is a PIL image (any mode, converted to RGB), a uint8 (H, W, 3) array, or a float (H, W, 3)
    array in [0, 1]. Any size works; the grid is the image split in thirds along each side.
    """
    pixels = _as_rgb_array(image)
    height, width = pixels.shape[:2]
    cell_h, cell_w = height / 3, width / 3
    strength, colors = _classify_pixels(pixels)
    labels, count = _label_components(strength >= MIN_INK_STRENGTH)

    ys, xs = np.nonzero(labels)
    ink_labels = labels[ys, xs]
    area = np.bincount(ink_labels, minlength=count + 1)
    safe_area = np.maximum(area, 1)  # label 0 (background) is never an object
    centroid_y = np.bincount(ink_labels, weights=ys + 0.5, minlength=count + 1) / safe_area
    centroid_x = np.bincount(ink_labels, weights=xs + 0.5, minlength=count + 1) / safe_area
    cell_row = np.minimum((centroid_y / cell_h).astype(int), 2)
    cell_col = np.minimum((centroid_x / cell_w).astype(int), 2)
    cell_of_label = np.where(area >= MIN_OBJECT_AREA * cell_h * cell_w, cell_row * 3 + cell_col, -1)
    cell_of_label[0] = -1
    cell_of_pixel = cell_of_label[labels]  # (H, W): -1 for background and specks

    present = np.unique(cell_of_pixel)
    return [
        _read_object(cell_of_pixel, int(index), colors, strength, cell_w, cell_h)
        for index in present[present >= 0]
    ]


_CELL_WORDS = {"top", "bottom", "left", "right", "center", "centre", "middle"}
_CENTER_WORDS = {"center": "center", "centre": "center", "middle": "center"}
_SPEC_FIELDS = ("size", "color", "shape", "cell")


def _expected(words: list[str], position: int, wanted: str, prompt: str) -> ValueError:
    found = repr(words[position]) if position < len(words) else "the end of the prompt"
    return ValueError(f"cannot parse drawing prompt {prompt!r}: expected {wanted}, found {found}")


def _parse_object(words: list[str], position: int, prompt: str) -> tuple[dict, int]:
    """One '<a|an> [size] <colour> <shape> [<at|on|in> [the] <cell>]' phrase starting at `position`."""
    spec: dict = {}

    def take(vocabulary: Collection[str], wanted: str | None) -> str | None:
        """The next word if it is in `vocabulary`; otherwise None when optional (`wanted` None), else raise."""
        nonlocal position
        if position < len(words) and words[position] in vocabulary:
            position += 1
            return words[position - 1]
        if wanted is None:
            return None
        raise _expected(words, position, wanted, prompt)

    take({"a", "an"}, "'a' or 'an'")
    size = take(SIZES, None)
    if size:
        spec["size"] = size
    spec["color"] = take(COLORS, f"a colour {tuple(COLORS)}")
    spec["shape"] = take(SHAPES, f"a shape {SHAPES}")
    if take({"at", "on", "in"}, None):
        take({"the"}, None)
        first = take(_CELL_WORDS, f"a cell {CELLS}")
        second = take({"left", "right"}, None) if first in ("top", "bottom") else None
        spec["cell"] = _CENTER_WORDS.get(first, f"{first} {second}" if second else first)
    return spec, position


def parse_prompt(prompt: str) -> list[dict]:
    """The object specs of a drawing prompt, e.g. 'a red circle' -> [{"color": "red", "shape": "circle"}].

    Grammar: objects separated by ',' and/or 'and'; each object is '<a|an> [size] <colour> <shape>' with an
    optional '<at|on|in> [the] <cell>' (cells as in CELLS; 'top-left', 'centre' and 'middle' also read).
    Specs hold "color" and "shape", plus "size" and "cell" when given. Case and a final '.' are ignored.
    Anything else raises ValueError naming the unexpected word.
    """
    words = prompt.lower().strip().rstrip(".").replace("-", " ").replace(",", " , ").split()
    specs = []
    position = 0
    while True:
        spec, position = _parse_object(words, position, prompt)
        specs.append(spec)
        if position == len(words):
            return specs
        separated = False
        for separator in (",", "and"):
            if position < len(words) and words[position] == separator:
                position += 1
                separated = True
        if not separated:
            raise _expected(words, position, "',' or 'and' before the next object", prompt)


def _matches(spec: dict, obj: ShapeObject) -> bool:
    return all(getattr(obj, field) == value for field, value in spec.items())


def score_prompt(image: Image.Image | np.ndarray, prompt: str) -> dict:
    """Whether `image` satisfies the drawing `prompt`: {"correct", "detected", "expected"}.

    Rule: the prompt is correct when its specs can be matched to distinct detected objects, each object
    agreeing with its spec on every attribute the spec gives (colour and shape always, size and cell when
    named). A prompt giving all four attributes for every object is a complete scene description (the
    full-scene prompt of `draw_prompts`, i.e. a caption), so then the image must also hold no other object;
    a prompt leaving any size or cell out tolerates extra objects.
    """
    expected = parse_prompt(prompt)
    detected = parse_image(image)
    matched = any(
        all(_matches(spec, obj) for spec, obj in zip(expected, chosen))
        for chosen in itertools.permutations(detected, len(expected))
    )
    complete = all(set(_SPEC_FIELDS) <= spec.keys() for spec in expected)
    correct = matched and (not complete or len(detected) == len(expected))
    return {"correct": correct, "detected": [asdict(obj) for obj in detected], "expected": expected}


def same_objects(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> bool:
    """Whether two images hold the same objects (all attributes), e.g. an original and its reconstruction."""
    return parse_image(a) == parse_image(b)
