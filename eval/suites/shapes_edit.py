"""`shapes-edit`: instruction editing on the shapes world, scored by the shapes judge.

    mllm eval --suite shapes-edit --model runs/demo/model --out runs/eval/edit [--option seeds=2 look=other]

Items: held-out scenes (split "test": odd seeds, never trained on; `scene_seed("test", i)` in index order, so
the items are the same on every machine), each with one edit of `mllm.data.shapes_tasks.make_edit`. The
operations come round-robin over EDIT_OPERATIONS (recolour, move, resize, remove, add, replace): scene i gets
the next operation in turn when it allows it (`possible_operations`: remove needs two objects, move an
empty cell, ...), and is skipped otherwise, so the operations are balanced (`--option per_operation=N` items
each, 50 by default: 300 in all) and `--limit N` still covers every operation from N = 6. Item ids are
'<operation>-<k:03d>'. More items per operation only add scenes: the first 300 are the same whatever N.

The model sees the source scene rendered (`render(scene, size, look)`) and the instruction ("make the circle
blue", "remove the square", "add a small red circle at the top left", ...) and draws the edited image
(`MLLM.edit`); the runner saves every edit under OUT/images/<id>/ as for draw suites.

Scoring: the judge (`mllm.data.judge.parse_image`) reads each output image back into objects. An image is
correct when they are exactly the target scene's objects (colour, shape, size and cell of every object, none
missing and none extra). Metrics, percentages:

    accuracy              the mean over all images (primary)
    accuracy_<operation>  the same per operation (accuracy_recolour, accuracy_move, ...)
    kept                  over all images: the share of the source's untouched objects (those the edit neither
                          changes nor removes) that the image shows unchanged (same colour, shape, size, cell)
    copied                the share of images that are the source scene again (the edit ignored; diagnostic)

Scoring from a run folder (`mllm eval`, or `mllm eval-score` on OUT/predictions.jsonl) also writes
OUT/scored.jsonl (per item: instruction, operation, source and target objects, and per image the objects
detected, whether it is correct and how many untouched objects it kept) and OUT/examples.png (a sheet of a
few items per operation: source | instruction and verdict | output | target); results.json names both.

`--data`: shards written by `mllm data shapes --split test` (their JSON carries each scene) replace the
built-in scenes (all of them are used, in order, with the same round-robin); the images are rendered again
at `size` in `look`.

Options (`--option key=value`):
    look=exact|varied|other   how scenes are rendered (default varied, the training world; other: a held-out
                              rasteriser; exact: the clean renderer)
    size=N                    image side (default: the model's image size, read from its folder; else 48)
    first=N                   start at held-out scene N (default 0; with --data, the shards' N-th scene):
                              first=5000 scores edits of scenes the default items never use
    per_operation=N           built-in items per operation (default 50; 100 halves the sampling spread of an
                              operation's accuracy to about 5 points)
    seeds=N                   edits per item (default 1), seeds seed..seed+N-1 (`mllm eval --seed`)
    guidance=instruction|both, guidance_scale=S, image_guidance_scale=S, temperature=T
                              classifier-free guidance of the edits (image_guidance_scale: both guidances at
                              once, each with its own scale) and the codes' temperature (defaults
                              those of `MLLM.edit`); the `--guidance-scale` and `--temperature` flags of
                              `mllm eval` are for draw suites only
"""

from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from eval.suites.base import EditSuite, Item, ScoreContext, int_option, model_image_size
from eval.suites.shapes_t2i import JUDGE_EXACT_FROM_PX, resolve_image_path
from tokenizer_vision.schema import unknown_name

LOOKS = ("exact", "varied", "other")
DEFAULT_LOOK = "varied"
FALLBACK_SIZE = 48  # image side when neither --option size nor a model says it
ITEMS_PER_OPERATION = 50
EXAMPLES_PER_OPERATION = 2
EXAMPLES_NAME = "examples.png"
SCORED_NAME = "scored.jsonl"
# Held-out scenes searched for the built-in items: every operation but remove fits nearly every scene, and
# remove two scenes in three, so 300 items take about 330 scenes and this bound is never reached.
_MAX_SCENES = 100_000
_TILE = 96  # example sheet: side of an image tile
_TEXT_WIDTH = 230
_PAD = 6


# ------------------------------------------------------------------------------------ shared with shapes-multi
def render_scene(scene, size: int, look: str):
    """`mllm.data.shapes.render` in a look; `look` is passed only when it is not "exact", so this works with
    a renderer that has no looks too."""
    from mllm.data.shapes import render

    return render(scene, size) if look == "exact" else render(scene, size, look=look)


def heldout_scenes(data: str | None, first: int = 0) -> Iterator:
    """Scenes in a fixed order: the held-out test scenes `scene_seed("test", i)`, i = first, first + 1, ...,
    or, with `data`, the scenes of shards written by `mllm data shapes --split test`, in order from the
    `first`-th."""
    from mllm.data.shapes import Scene, make_scene, scene_seed

    if data is None:
        for index in range(first, first + _MAX_SCENES):
            yield make_scene(scene_seed("test", index))
        return
    from mllm.data.shards import DataStats, read_records

    for position, record in enumerate(read_records(data, stats=DataStats(), split=False)):
        meta = record.get("json") or {}
        if "scene" not in meta:
            raise ValueError(f"{data} does not hold shapes-world scenes (no 'scene' in the records' JSON); "
                             "make them with `mllm data shapes --split test`")
        if position >= first:
            yield Scene.from_dict(meta["scene"])


class RenderOptions:
    """The `look`, `size` and `first` options of the suites that render held-out scenes themselves."""

    render_option_names = ("look", "size", "first")
    look: str = DEFAULT_LOOK
    first: int = 0  # index of the first held-out scene the items take (`heldout_scenes`)
    size: int | None = None  # --option size
    model_size: int | None = None  # the model's, from `use_model`

    def configure_rendering(self, options: dict[str, Any] | None) -> None:
        from mllm.data.shapes import MIN_IMAGE_SIZE

        options = options or {}
        look = str(options.get("look") or DEFAULT_LOOK).strip()
        if look not in LOOKS:
            raise unknown_name("--option look value", look, LOOKS)
        self.look = look
        self.size = int_option(options, "size", 0, minimum=MIN_IMAGE_SIZE) or None
        self.first = int_option(options, "first", 0, minimum=0)

    def use_model(self, model_dir) -> None:
        self.model_size = model_image_size(model_dir)

    @property
    def image_size(self) -> int:
        """--option size, else the model's image size, else FALLBACK_SIZE."""
        return self.size or self.model_size or FALLBACK_SIZE


def percent(flags: list[bool]) -> float:
    return 100.0 * sum(flags) / len(flags) if flags else 0.0


def _objects(scene) -> list[dict]:
    return [asdict(obj) for obj in scene.objects]


# ------------------------------------------------------------------------------------ items
def edit_items(data: str | None, limit: int | None, size: int, look: str,
               per_operation: int = ITEMS_PER_OPERATION, first: int = 0) -> list[Item]:
    """Items round-robin over EDIT_OPERATIONS (see the module docstring) from held-out scene `first` on: the
    first `limit`, or `per_operation` per operation (every fitting scene of `data`)."""
    from mllm.data.shapes_tasks import EDIT_OPERATIONS, make_edit, possible_operations

    wanted = len(EDIT_OPERATIONS) * per_operation if data is None else None
    if limit is not None:
        wanted = limit if wanted is None else min(wanted, limit)
    items: list[Item] = []
    if wanted == 0:
        return items
    for scene in heldout_scenes(data, first):
        operation = EDIT_OPERATIONS[len(items) % len(EDIT_OPERATIONS)]
        if operation not in possible_operations(scene):
            continue  # the next scene gets this operation
        edit = make_edit(scene, operation=operation)
        k = len(items) // len(EDIT_OPERATIONS)
        items.append(Item(
            id=f"{operation}-{k:03d}", prompt=edit.instruction, image=render_scene(scene, size, look),
            meta={"operation": operation, "instruction": edit.instruction, "change": edit.change,
                  "scene_seed": scene.seed, "source": _objects(scene), "target": _objects(edit.target),
                  "look": look, "size": size},
        ))
        if wanted is not None and len(items) >= wanted:
            break
    return items


# ------------------------------------------------------------------------------------ the suite
class ShapesEditSuite(RenderOptions, EditSuite):
    """Instruction editing on the shapes world (see the module docstring)."""

    name = "shapes-edit"
    needs_data = False
    primary_metric = "accuracy"
    option_names = EditSuite.option_names + RenderOptions.render_option_names + ("per_operation",)
    per_operation: int = ITEMS_PER_OPERATION
    data_help = ("optional: shards from `mllm data shapes --split test`; default: held-out scenes, one edit "
                 "each, round-robin over the six operations")

    def configure(self, options: dict[str, Any] | None) -> None:
        super().configure(options)
        self.configure_rendering(options)
        self.per_operation = int_option(options, "per_operation", ITEMS_PER_OPERATION)

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        return edit_items(data, limit, self.image_size, self.look, self.per_operation, self.first)

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        from PIL import Image

        from mllm.data.judge import parse_image
        from mllm.data.shapes import Scene
        from mllm.data.shapes_tasks import EDIT_OPERATIONS

        per_operation: dict[str, list[bool]] = defaultdict(list)
        kept_per_operation: dict[str, list[bool]] = defaultdict(list)
        items_per_operation: dict[str, int] = defaultdict(int)
        copied: list[bool] = []
        records: list[dict] = []
        examples: list[tuple[Item, dict, Any]] = []
        shown: dict[str, int] = defaultdict(int)
        missing: list[str] = []
        counts: dict[int, int] = defaultdict(int)
        smallest = JUDGE_EXACT_FROM_PX
        for item in items:
            paths = (predictions.get(item.id) or {}).get("images") or []
            if not paths:
                missing.append(item.id)
                continue
            counts[len(paths)] += 1
            operation = item.meta["operation"]
            items_per_operation[operation] += 1
            source = Scene.from_dict({"seed": item.meta["scene_seed"], "objects": item.meta["source"]})
            target = Scene.from_dict({"seed": item.meta["scene_seed"], "objects": item.meta["target"]})
            untouched = [obj for obj in source.objects if obj in target.objects]
            outputs = []
            first_image = None
            for path in paths:
                with Image.open(resolve_image_path(context.out, path, item.id)) as image:
                    image = image.convert("RGB")
                smallest = min(smallest, *image.size)
                if first_image is None:
                    first_image = image
                detected = parse_image(image)
                correct = detected == list(target.objects)
                kept = [obj in detected for obj in untouched]
                per_operation[operation].append(correct)
                kept_per_operation[operation].extend(kept)
                copied.append(detected == list(source.objects))
                outputs.append({"image": path, "detected": [asdict(obj) for obj in detected], "correct": correct,
                                "kept": sum(kept), "untouched": len(untouched)})
            record = {"id": item.id, "operation": operation, "instruction": item.meta["instruction"],
                      "source": item.meta["source"], "target": item.meta["target"], "outputs": outputs}
            records.append(record)
            if shown[operation] < EXAMPLES_PER_OPERATION:
                shown[operation] += 1
                examples.append((item, record, first_image))

        if not per_operation:
            raise ValueError(
                f"none of the {len(items)} items has a prediction with images; check that the predictions "
                "file belongs to this suite and run"
            )
        operations = [op for op in EDIT_OPERATIONS if op in per_operation]
        every_image = [v for op in operations for v in per_operation[op]]
        every_kept = [v for op in operations for v in kept_per_operation[op]]
        metrics: dict[str, Any] = {"accuracy": percent(every_image)}
        for operation in operations:
            metrics[f"accuracy_{operation}"] = percent(per_operation[operation])
        notes = [(
            "accuracy = share of images the judge reads as exactly the target scene (every attribute of every "
            "object, nothing extra); kept = share of the untouched source objects shown unchanged, over all "
            "images; copied = share of images showing the source scene again (diagnostic)"
        )]
        if every_kept:
            metrics["kept"] = percent(every_kept)
        else:
            notes.append("kept is not reported: no scored item had an untouched object")
        metrics["copied"] = percent(copied)
        metrics["images"] = len(every_image)
        breakdown = {"operation": {
            operation: {"accuracy": percent(per_operation[operation]),
                        **({"kept": percent(kept_per_operation[operation])} if kept_per_operation[operation]
                           else {}),
                        "items": items_per_operation[operation], "images": len(per_operation[operation])}
            for operation in operations
        }}
        absent = [op for op in EDIT_OPERATIONS if op not in per_operation]
        if absent:
            notes.append(f"no scored item for {', '.join(absent)} (use --limit 6 or more to cover every operation)")
        if len(counts) > 1 or (counts and next(iter(counts)) != self.images_per_prompt):
            shown_counts = ", ".join(f"{n} images: {k} items" for n, k in sorted(counts.items()))
            notes.append(f"images per item vary or differ from seeds={self.images_per_prompt} ({shown_counts})")
        if smallest < JUDGE_EXACT_FROM_PX:
            notes.append(f"some images are only {smallest} px: the judge is exact on clean renders from "
                         f"{JUDGE_EXACT_FROM_PX} px up, below that small shapes can be misread")
        if missing:
            notes.append(f"{len(missing)} of {len(items)} items had no images and were left out "
                         f"(first: {', '.join(missing[:5])})")
        results: dict[str, Any] = {"metrics": metrics, "breakdown": breakdown, "count": len(records), "notes": notes}
        if context.out is not None:
            _write_outputs(Path(context.out), records, examples, results)
        return results


def _write_outputs(out: Path, records: list[dict], examples: list, results: dict[str, Any]) -> None:
    """OUT/scored.jsonl and OUT/examples.png, named in the results (a note when they cannot be written)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        scored = out / SCORED_NAME
        scored.write_text("".join(json.dumps(record) + "\n" for record in records))
        sheet = out / EXAMPLES_NAME
        example_sheet(examples).save(sheet)
    except OSError as error:
        results["notes"].append(f"the per-item records and the example sheet could not be written to {out}: "
                                f"{error}")
        return
    results["files"] = {"scored": str(scored), "examples": str(sheet)}
    results["notes"].append(f"per-item records: {scored}; example sheet (source | instruction | output | "
                            f"target): {sheet}")


def example_sheet(examples: list[tuple[Item, dict, Any]]):
    """A PNG sheet, one row per example: source | operation, instruction and verdict | output | target (the
    target rendered like the source)."""
    from PIL import Image, ImageDraw

    from mllm.data.shapes import Scene

    columns = ("source", "instruction", "output", "target")
    header = 16
    width = 3 * _TILE + _TEXT_WIDTH + 5 * _PAD
    height = header + len(examples) * (_TILE + _PAD) + _PAD
    sheet = Image.new("RGB", (width, height), (225, 225, 225))
    draw = ImageDraw.Draw(sheet)
    xs = [_PAD, 2 * _PAD + _TILE, 3 * _PAD + _TILE + _TEXT_WIDTH, 4 * _PAD + 2 * _TILE + _TEXT_WIDTH]
    for x, title in zip(xs, columns):
        draw.text((x, 2), title, fill=(0, 0, 0))
    for row, (item, record, output) in enumerate(examples):
        y = header + row * (_TILE + _PAD)
        source = item.image if hasattr(item.image, "resize") else render_scene(
            Scene.from_dict({"seed": item.meta["scene_seed"], "objects": item.meta["source"]}),
            item.meta["size"], item.meta["look"])
        target = render_scene(Scene.from_dict({"seed": item.meta["scene_seed"], "objects": item.meta["target"]}),
                              source.size[0], item.meta["look"])
        for x, image in ((xs[0], source), (xs[2], output), (xs[3], target)):
            sheet.paste(image.convert("RGB").resize((_TILE, _TILE), Image.NEAREST), (x, y))
        first = record["outputs"][0]
        verdict = "correct" if first["correct"] else "wrong"
        if first["untouched"]:
            verdict += f", kept {first['kept']}/{first['untouched']}"
        lines = textwrap.wrap(f"{item.id}: {record['instruction']}", 36) + [verdict]
        for k, line in enumerate(lines):
            draw.text((xs[1], y + 2 + 12 * k), line, fill=(0, 0, 0) if k < len(lines) - 1 else
                      ((0, 120, 0) if first["correct"] else (170, 0, 0)))
    return sheet


SUITES = {"shapes-edit": ShapesEditSuite}
