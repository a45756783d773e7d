"""Tasks over two images of the shapes world, with exact targets: instruction editing and multi-image questions.

Editing: `make_edit(scene, seed)` picks one operation and returns the instruction and the target scene, the
source scene with exactly that change (same seed, so every untouched object renders as before):

    recolour  "make the circle blue"                     the object takes another colour
    move      "move the circle to the top left"          to an empty cell (cells as in captions: "center", ...)
    resize    "make the circle large"                    the other size word
    remove    "remove the circle"                        (scenes of two or more objects)
    add       "add a small red square at the top left"   a new object in an empty cell (cell phrase as in captions)
    replace   "turn the circle into a square"            another shape, same colour, size and cell

An object is named by its shape alone ("the circle") when it is the only one of that shape, else by colour and
shape ("the red circle"); an object that colour and shape do not single out is never the one edited.

Multi-image questions (`multi_qa(first, second, change=None)`), answers exact:

    count    "How many objects are in the first image?"           "2"
    more     "Which image has more objects?"                      "the first" | "the second" | "neither"
    change   "What changed between the two images?"               "the circle became blue" (an edit pair only)
    single   a question of the VQA set about one named image      "What colour is the circle in the second image?"

The change answers follow the edit grammar: "the {object} became {colour}", "the {object} moved to the {cell}",
"the {object} became {small|large}", "the {object} was removed", "{a size colour shape} was added {cell phrase}",
"the {object} became a {shape}". Everything is a pure function of the seeds (`shapes._rng`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mllm.data import shapes
from mllm.data.shapes import (
    CELL_PHRASES,
    CELLS,
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    _article,
    _pick,
    _rng,
    vqa_pairs,
)

EDIT_OPERATIONS: tuple[str, ...] = ("recolour", "move", "resize", "remove", "add", "replace")
MULTI_QUESTION_TYPES: tuple[str, ...] = ("count", "more", "change", "single")
IMAGE_ORDINALS: tuple[str, ...] = ("first", "second")


@dataclass(frozen=True)
class Edit:
    """One edit of a scene: its operation, the instruction, the target scene and the change in words."""

    operation: str
    instruction: str
    source: Scene
    target: Scene
    change: str  # the answer to "What changed between the two images?"

    def to_dict(self) -> dict:
        return {"operation": self.operation, "instruction": self.instruction, "change": self.change,
                "target": self.target.to_dict(), "target_caption": shapes.caption(self.target)}


def reference(scene: Scene, obj: ShapeObject) -> str | None:
    """How an instruction names `obj`: "circle" when it is the scene's only circle, "red circle" when its
    colour and shape single it out, None when neither does."""
    same_shape = [o for o in scene.objects if o.shape == obj.shape]
    if len(same_shape) == 1:
        return obj.shape
    if sum(o.color == obj.color for o in same_shape) == 1:
        return f"{obj.color} {obj.shape}"
    return None


def _others(values: tuple[str, ...], current: str) -> list[str]:
    return [value for value in values if value != current]


def possible_operations(scene: Scene) -> list[str]:
    """The operations `scene` allows: every one needs a nameable object except add, which needs an empty
    cell; remove needs two or more objects (a scene is never empty)."""
    nameable = any(reference(scene, obj) for obj in scene.objects)
    empty = len(scene.objects) < len(CELLS)
    allowed = {
        "recolour": nameable, "move": nameable and empty, "resize": nameable,
        "remove": nameable and len(scene.objects) > 1, "add": empty, "replace": nameable,
    }
    return [operation for operation in EDIT_OPERATIONS if allowed[operation]]


def make_edit(scene: Scene, seed: int | None = None, operation: str | None = None) -> Edit:
    """One random edit of `scene` (the operation uniform over `possible_operations`, or `operation`),
    deterministic given the scene and `seed` (default: scene.seed)."""
    rng = _rng(scene.seed if seed is None else seed, "edit")
    allowed = possible_operations(scene)
    if operation is None:
        operation = allowed[_pick(rng, len(allowed))]
    elif operation not in EDIT_OPERATIONS:
        raise ValueError(f"unknown edit operation {operation!r}; expected one of {EDIT_OPERATIONS}")
    elif operation not in allowed:
        raise ValueError(f"the scene {scene.to_dict()['objects']} allows no {operation!r} edit")
    objects = list(scene.objects)
    empty_cells = [cell for cell in CELLS if all(obj.cell != cell for obj in objects)]

    if operation == "add":
        new = ShapeObject(color=tuple(COLORS)[_pick(rng, len(COLORS))], shape=SHAPES[_pick(rng, len(SHAPES))],
                          size=SIZES[_pick(rng, len(SIZES))], cell=empty_cells[_pick(rng, len(empty_cells))])
        target = Scene(objects=(*objects, new), seed=scene.seed)
        described = new.describe()
        return Edit(operation, f"add {described}", scene, target,
                    f"{new.describe(with_cell=False)} was added {CELL_PHRASES[new.cell]}")

    candidates = [obj for obj in objects if reference(scene, obj)]
    obj = candidates[_pick(rng, len(candidates))]
    name = reference(scene, obj)
    rest = [o for o in objects if o is not obj]
    if operation == "recolour":
        color = _others(tuple(COLORS), obj.color)[_pick(rng, len(COLORS) - 1)]
        changed, instruction, change = replace(obj, color=color), f"make the {name} {color}", f"the {name} became {color}"
    elif operation == "move":
        cell = empty_cells[_pick(rng, len(empty_cells))]
        changed, instruction, change = (replace(obj, cell=cell), f"move the {name} to the {cell}",
                                        f"the {name} moved to the {cell}")
    elif operation == "resize":
        size = _others(SIZES, obj.size)[0]
        changed, instruction, change = replace(obj, size=size), f"make the {name} {size}", f"the {name} became {size}"
    elif operation == "replace":
        shape = _others(SHAPES, obj.shape)[_pick(rng, len(SHAPES) - 1)]
        changed = replace(obj, shape=shape)
        instruction, change = f"turn the {name} into {_article(shape)} {shape}", f"the {name} became {_article(shape)} {shape}"
    else:  # remove
        changed, instruction, change = None, f"remove the {name}", f"the {name} was removed"
    target = Scene(objects=tuple(rest + ([changed] if changed else [])), seed=scene.seed)
    return Edit(operation, instruction, scene, target, change)


def on_image(question: str, ordinal: str) -> str:
    """A one-image question asked of a named image: 'What colour is the circle?' -> 'What colour is the circle
    in the first image?'."""
    return f"{question.rstrip('?')} in the {ordinal} image?"


def multi_qa(first: Scene, second: Scene, change: str | None = None, seed: int | None = None) -> list[dict]:
    """Questions over two images, each {"question", "answer", "type"} (types: MULTI_QUESTION_TYPES):
    the count of each image, which has more objects, what changed (when `change`, the second image being an
    edit of the first) and one question of `vqa_pairs` per image asked of that image by name."""
    rng = _rng(first.seed * 1_000_003 + second.seed if seed is None else seed, "multi")
    pairs: list[dict] = []
    counts = (len(first.objects), len(second.objects))
    for ordinal, count in zip(IMAGE_ORDINALS, counts):
        pairs.append({"question": f"How many objects are in the {ordinal} image?", "answer": str(count),
                      "type": "count"})
    more = "neither" if counts[0] == counts[1] else ("the first" if counts[0] > counts[1] else "the second")
    pairs.append({"question": "Which image has more objects?", "answer": more, "type": "more"})
    if change is not None:
        pairs.append({"question": "What changed between the two images?", "answer": change, "type": "change"})
    for ordinal, scene in zip(IMAGE_ORDINALS, (first, second)):
        # The plain count question is already asked above, by name.
        candidates = [p for p in vqa_pairs(scene) if p["question"] != "How many objects are there?"]
        pair = candidates[_pick(rng, len(candidates))]
        pairs.append({"question": on_image(pair["question"], ordinal), "answer": pair["answer"], "type": "single"})
    return pairs


# Seed offset of the second scene of an independent pair: even, so the pair stays in its scene's split (train
# seeds are even, test seeds odd), and beyond any seed `shapes.scene_seed` gives out.
_PAIR_SEED_OFFSET = 2 * 10**15
TASK_RECORD_KINDS = ("edit", "pair")


def paired_scene(scene: Scene) -> Scene:
    """The second scene of `scene`'s independent pair: another scene of the same split."""
    return shapes.make_scene(scene.seed + _PAIR_SEED_OFFSET)


def _render(scene: Scene, size: int, look: str):
    return shapes.render(scene, size) if look == "exact" else shapes.render(scene, size, look=look)


def task_records(seed: int, size: int = shapes.DEFAULT_IMAGE_SIZE, look: str = "exact") -> list[dict]:
    """The two-image records of scene `seed`, for `write_shards`:

    - `{key}-edit`: images [the scene, its edit] with "edit" (operation, instruction, change, target scene)
      and "multi_qa" over the two (with the "change" question);
    - `{key}-pair`: images [the scene, `paired_scene`] with "multi_qa" over two unrelated scenes.
    """
    scene = shapes.make_scene(seed)
    edit = make_edit(scene)
    other = paired_scene(scene)
    source = _render(scene, size, look)
    key = f"{seed:012d}"
    look_field = {} if look == "exact" else {"look": look}
    return [
        {"key": f"{key}-edit", "images": [source, _render(edit.target, size, look)], "scene": scene.to_dict(),
         "edit": edit.to_dict(), "multi_qa": multi_qa(scene, edit.target, change=edit.change), **look_field},
        {"key": f"{key}-pair", "images": [source, _render(other, size, look)], "scene": scene.to_dict(),
         "second_scene": other.to_dict(), "multi_qa": multi_qa(scene, other), **look_field},
    ]


__all__ = [
    "EDIT_OPERATIONS",
    "IMAGE_ORDINALS",
    "MULTI_QUESTION_TYPES",
    "TASK_RECORD_KINDS",
    "Edit",
    "make_edit",
    "multi_qa",
    "on_image",
    "paired_scene",
    "possible_operations",
    "reference",
    "task_records",
]
