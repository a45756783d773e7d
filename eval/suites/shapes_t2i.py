"""`shapes-t2i`: GenEval-style text-to-image accuracy on the shapes world, scored by the shapes judge.

    mllm eval --suite shapes-t2i --model runs/demo/model --out runs/demo/eval/t2i [--option seeds=4]

Every prompt is in the phrasing the shapes data's drawing prompts use (`mllm.data.shapes.draw_prompts`),
which is exactly what the judge's grammar (`mllm.data.judge.parse_prompt`) reads. Categories, in the
spirit of GenEval (https://github.com/djghosh13/geneval):

    single_object  "a red circle"                       all 18 colour x shape pairs
    size           "a large red circle"                 all 36 size x colour x shape triples
    position       "a red circle at the top left"       36: every cell 4 times, every pair twice
    two_objects    "a red circle at the top left and a blue square at the bottom"
                                                        36 held-out scenes with exactly two objects
                                                        (distinct prompts)
    full_scene     the caption of a held-out scene      36 held-out scenes (1-3 objects; distinct captions),
                   e.g.
                   "a large red circle at the top left and a small blue square at the bottom";
                   a complete description, so the judge also rejects any extra object

Held-out scenes are those of the "test" split (odd scene seeds; training uses the even ones), taken in
index order, so the items are the same on every machine. Items come round-robin over the categories, so
`--limit N` still covers all of them.

Left out, because the judge cannot score them: colour-only and shape-only prompts ("a red object",
"a circle") and counting ("two red circles"): the judge's grammar requires a colour and a shape in every
object phrase and has no number words (repeating a phrase, "a red circle and a red circle", would parse,
but no training prompt is phrased so). Colour and shape are instead diagnosed per attribute: besides the
judged accuracy, `color_accuracy` / `shape_accuracy` give how often each asked-for colour / shape appears
on some object in the image (binding ignored; diagnostics only, not part of the overall score).

`--data FILE`: a JSONL of {"prompt", "category"} rows (an "id" is optional) replaces the built-in items;
every prompt must parse with the judge (checked on load; the error names the line). Missing categories
become "custom".

Options (`--option key=value`, strings):
    seeds=N   images per prompt (default 4), drawn with seeds 0..N-1. It matters before drawing, so
              the runner has to apply it: `suite.configure(options)` sets `images_per_prompt`.
              Scoring uses however many images each prediction holds (and notes a mismatch).

Scoring: every image is judged correct or not (`mllm.data.judge.score_prompt`). Per category, accuracy is
the mean over its images; `accuracy` (the primary metric) is the mean of the category accuracies, as
GenEval's overall score; `image_accuracy` is the plain mean over all images; `all_correct` is the share of
prompts whose images are all correct. All are percentages.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from eval.suites.base import DrawSuite, Item, ScoreContext, jsonl_objects

CATEGORIES = ("single_object", "size", "position", "two_objects", "full_scene")
ITEMS_PER_SCENE_CATEGORY = 36
DEFAULT_IMAGES_PER_PROMPT = 4
JUDGE_EXACT_FROM_PX = 40  # see mllm.data.judge: exact on clean renders from 40 px up
# Held-out scenes searched for two-object scenes; make_scene draws 1-3 objects uniformly, so about a
# third of them qualify and this bound is never reached for 36 items.
_MAX_SCENES_SEARCHED = 10_000


def resolve_image_path(out: Path | str | None, path: str, item_id: str) -> Path:
    """A prediction's image path (relative to the run folder OUT, or absolute) as an existing file."""
    candidate = Path(path)
    if not candidate.is_absolute():
        if out is None:
            raise ValueError(
                f"item {item_id!r}: image path {path!r} is relative to the run folder, but no run folder was "
                "given; score from the run folder (pass --out) or record absolute paths"
            )
        candidate = Path(out) / candidate
    if not candidate.is_file():
        raise FileNotFoundError(
            f"item {item_id!r}: image {candidate} does not exist; was the run folder moved or the drawing "
            "interrupted? Re-run the drawing or point --out at the folder holding the images"
        )
    return candidate


def _vocabulary_items() -> dict[str, list[tuple[str, dict]]]:
    from mllm.data.shapes import CELLS, COLORS, SHAPES, SIZES, ShapeObject

    pairs = [(color, shape) for color in COLORS for shape in SHAPES]  # 18
    single = [
        (ShapeObject(color, shape, "small", "center").describe(with_size=False, with_cell=False), {})
        for color, shape in pairs
    ]
    size = [
        (ShapeObject(color, shape, size, "center").describe(with_cell=False), {})
        for size in SIZES
        for color, shape in pairs
    ]
    # Cell m // 4 with pair 5m mod 18: every cell 4 times, every pair twice (gcd(5, 18) = 1), and the 4
    # pairs of one cell differ (5, 10 and 15 are not multiples of 18).
    position = []
    for m in range(len(CELLS) * 4):
        color, shape = pairs[(5 * m) % len(pairs)]
        obj = ShapeObject(color, shape, "small", CELLS[m // 4])
        position.append((obj.describe(with_size=False), {}))
    return {"single_object": single, "size": size, "position": position}


def _scene_items() -> dict[str, list[tuple[str, dict]]]:
    from mllm.data.shapes import caption, draw_prompts, make_scene, scene_seed

    # prompt -> meta, per category; a scene whose prompt an earlier scene already gave is skipped.
    full_scene: dict[str, dict] = {}
    two_objects: dict[str, dict] = {}
    for index in range(_MAX_SCENES_SEARCHED):
        seed = scene_seed("test", index)
        scene = make_scene(seed)
        if len(full_scene) < ITEMS_PER_SCENE_CATEGORY:
            full_scene.setdefault(caption(scene), {"scene_seed": seed, "objects": len(scene.objects)})
        if len(two_objects) < ITEMS_PER_SCENE_CATEGORY and len(scene.objects) == 2:
            # The last drawing prompt of a multi-object scene names every object with its cell, no size.
            two_objects.setdefault(draw_prompts(scene)[-1], {"scene_seed": seed, "objects": 2})
        if len(full_scene) == len(two_objects) == ITEMS_PER_SCENE_CATEGORY:
            break
    return {"two_objects": list(two_objects.items()), "full_scene": list(full_scene.items())}


def builtin_items() -> list[Item]:
    """The built-in items, round-robin over CATEGORIES (ids '<category>-<k:03d>')."""
    by_category = {**_vocabulary_items(), **_scene_items()}
    lists = [
        [
            Item(id=f"{category}-{k:03d}", prompt=prompt, meta={"category": category, **meta})
            for k, (prompt, meta) in enumerate(by_category[category])
        ]
        for category in CATEGORIES
    ]
    longest = max(len(items) for items in lists)
    return [items[k] for k in range(longest) for items in lists if k < len(items)]


def read_prompt_file(path: str | Path) -> list[Item]:
    """--data: JSONL rows {"prompt", "category"} (optional "id") -> items; every prompt must parse."""
    from mllm.data.judge import parse_prompt

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f'--data {path}: not a file; shapes-t2i takes a JSONL of {{"prompt", "category"}} rows, '
            "or no --data for the built-in prompts"
        )
    items: list[Item] = []
    seen: set[str] = set()
    rows = jsonl_objects(path, ("prompt",), 'an object with a string "prompt" (and a "category")',
                         f"--data {path}: no prompts found")
    for where, row in rows:
        try:
            parse_prompt(row["prompt"])
        except ValueError as error:
            raise ValueError(
                f"{where}: the shapes judge cannot score this prompt ({error}); use the drawing-prompt "
                "phrasing, e.g. 'a red circle', 'a large red circle at the top left and a blue square "
                "on the right'"
            ) from None
        item_id = str(row.get("id", f"{len(items):05d}"))
        if item_id in seen:
            raise ValueError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        category = str(row.get("category") or "custom")
        items.append(Item(id=item_id, prompt=row["prompt"], meta={"category": category}))
    return items


class ShapesT2ISuite(DrawSuite):
    """Text-to-image accuracy on the shapes world (see the module docstring)."""

    name = "shapes-t2i"
    images_per_prompt = DEFAULT_IMAGES_PER_PROMPT
    needs_data = False
    primary_metric = "accuracy"
    data_help = 'optional: a JSONL of {"prompt", "category"}; default: the built-in prompts (five categories)'

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        items = read_prompt_file(data) if data else builtin_items()
        return items[:limit] if limit is not None else items

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        from PIL import Image

        from mllm.data.judge import score_prompt

        images_per_category: dict[str, list[bool]] = defaultdict(list)
        prompts_per_category: dict[str, list[bool]] = defaultdict(list)
        attribute_hits: dict[str, list[bool]] = {"color": [], "shape": []}
        missing: list[str] = []
        counts: dict[int, int] = defaultdict(int)
        smallest = JUDGE_EXACT_FROM_PX
        for item in items:
            paths = (predictions.get(item.id) or {}).get("images") or []
            if not paths:
                missing.append(item.id)
                continue
            counts[len(paths)] += 1
            category = item.meta.get("category", "custom")
            verdicts = []
            for path in paths:
                with Image.open(resolve_image_path(context.out, path, item.id)) as image:
                    smallest = min(smallest, *image.size)
                    result = score_prompt(image.convert("RGB"), item.prompt)
                verdicts.append(bool(result["correct"]))
                for spec in result["expected"]:
                    for attribute, hits in attribute_hits.items():
                        hits.append(any(obj[attribute] == spec[attribute] for obj in result["detected"]))
            images_per_category[category].extend(verdicts)
            prompts_per_category[category].append(all(verdicts))

        if not images_per_category:
            raise ValueError(
                f"none of the {len(items)} items has a prediction with images; check that the predictions "
                "file belongs to this suite and run"
            )
        breakdown = {
            "category": {
                category: {
                    "accuracy": _percent(images_per_category[category]),
                    "all_correct": _percent(prompts_per_category[category]),
                    "prompts": len(prompts_per_category[category]),
                    "images": len(images_per_category[category]),
                }
                for category in _ordered(images_per_category)
            }
        }
        every_image = [v for verdicts in images_per_category.values() for v in verdicts]
        every_prompt = [v for verdicts in prompts_per_category.values() for v in verdicts]
        metrics: dict[str, Any] = {
            "accuracy": sum(row["accuracy"] for row in breakdown["category"].values())
            / len(breakdown["category"]),
            "image_accuracy": _percent(every_image),
            "all_correct": _percent(every_prompt),
            "color_accuracy": _percent(attribute_hits["color"]),
            "shape_accuracy": _percent(attribute_hits["shape"]),
            "images": len(every_image),
        }
        for category, row in breakdown["category"].items():
            metrics[f"accuracy_{category}"] = row["accuracy"]
        notes = [
            (
                "accuracy = mean of the per-category accuracies (GenEval's overall score); each image is "
                "judged by the shapes judge; all_correct = share of prompts whose images are all correct"
            ),
            (
                "color_accuracy / shape_accuracy: how often each asked-for colour / shape appears on some "
                "object (binding ignored), a diagnostic only"
            ),
        ]
        if len(counts) > 1 or (counts and next(iter(counts)) != self.images_per_prompt):
            shown = ", ".join(f"{n} images: {k} prompts" for n, k in sorted(counts.items()))
            notes.append(f"images per prompt vary or differ from seeds={self.images_per_prompt} ({shown})")
        if smallest < JUDGE_EXACT_FROM_PX:
            notes.append(
                f"some images are only {smallest} px: the judge is exact on clean renders from "
                f"{JUDGE_EXACT_FROM_PX} px up, below that small shapes can be misread"
            )
        if missing:
            notes.append(
                f"{len(missing)} of {len(items)} items had no images and were left out "
                f"(first: {', '.join(missing[:5])})"
            )
        return {"metrics": metrics, "breakdown": breakdown, "count": len(every_prompt), "notes": notes}


def _percent(flags: list[bool]) -> float:
    return 100.0 * sum(flags) / len(flags) if flags else 0.0


def _ordered(categories) -> list[str]:
    known = [c for c in CATEGORIES if c in categories]
    return known + sorted(c for c in categories if c not in CATEGORIES)


SUITES = {"shapes-t2i": ShapesT2ISuite}
