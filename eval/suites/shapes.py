"""`shapes-vqa` and `shapes-caption`: the built-in shapes world, scored against the scenes themselves.

Items come from held-out scenes (split "test": seeds never used for training data): with `--data`, image
shards written by `mllm data shapes --split test` (their JSON carries the scene); without, the first
`--limit` (default 200) test scenes are rendered on the fly.

shapes-vqa: every question `vqa_pairs` asks about a scene, sent as the model was trained (the bare
question); exact match after lower-casing and dropping a final period, overall and per question type
(count, color, shape, position, exists).

shapes-caption: the caption prompt of the model ("Describe the image."). A caption is read back with the
shapes judge's grammar (`parse_prompt`: "a large red circle at the top left and ..."). `objects_right`:
the caption names exactly the scene's objects with the right colour, shape and position (the demo's bar);
`exact`: sizes right too. CIDEr against the scene's reference caption (eval.scoring.captions).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from eval.suites.base import Item, ScoreContext, Suite

DEFAULT_SCENES = 200
CAPTION_PROMPT = "Describe the image."


def _records(data: str | None, limit: int | None) -> list[dict[str, Any]]:
    """Shapes records with "key", "image" (PIL or None), "scene", "caption", "qa"."""
    if data is None:
        from mllm.data.shapes import iter_samples

        return list(iter_samples(limit or DEFAULT_SCENES, split="test"))
    from mllm.data.shards import DataStats, read_records

    records = []
    for record in read_records(data, stats=DataStats(), split=False):
        meta = record.get("json") or {}
        if "scene" not in meta:
            raise ValueError(f"{data} does not hold shapes-world scenes (no 'scene' in the records' JSON); "
                             "make them with `mllm data shapes --split test`")
        records.append({"key": record["key"], "image": record.get("image"), **meta})
        if limit is not None and len(records) >= limit:
            break
    return records


def _normalise(text: str) -> str:
    return " ".join(str(text).lower().strip().rstrip(".").split())


class ShapesVQA(Suite):
    max_new_tokens = 8
    needs_data = False
    data_help = "optional: shards from `mllm data shapes --split test`; default: held-out scenes rendered on the fly"
    primary_metric = "accuracy"

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        from mllm.data.shapes import Scene, vqa_pairs

        items = []
        for record in _records(data, None if limit is None else max(1, limit)):
            pairs = record.get("qa") or vqa_pairs(Scene.from_dict(record["scene"]))
            for index, pair in enumerate(pairs):
                items.append(Item(id=f"{record['key']}-{index}", prompt=pair["question"], image=record["image"],
                                  meta={"answer": pair["answer"], "type": pair.get("type", "all")}))
        return items[:limit] if limit is not None else items

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        scored = [(item, _normalise(predictions[item.id]["answer"]) == _normalise(item.meta["answer"]))
                  for item in items if item.id in predictions]
        by_type: dict[str, list[bool]] = {}
        for item, correct in scored:
            by_type.setdefault(item.meta["type"], []).append(correct)
        notes = _missing_note(items, predictions)
        accuracy = 100.0 * sum(correct for _, correct in scored) / max(len(scored), 1)
        return {"metrics": {"accuracy": accuracy}, "count": len(scored), "notes": notes,
                "breakdown": {"question type": {kind: {"accuracy": 100.0 * sum(v) / len(v), "count": len(v)}
                                                for kind, v in sorted(by_type.items())}}}


class ShapesCaption(Suite):
    max_new_tokens = 64
    needs_data = False
    data_help = ShapesVQA.data_help
    primary_metric = "objects_right"

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        return [Item(id=record["key"], prompt=CAPTION_PROMPT, image=record["image"],
                     meta={"caption": record["caption"], "scene": record["scene"]})
                for record in _records(data, limit)]

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        from eval.scoring.captions import caption_scores

        scored = [item for item in items if item.id in predictions]
        objects_right = exact = 0
        for item in scored:
            right, all_right = caption_matches(predictions[item.id]["answer"], item.meta["scene"])
            objects_right += right
            exact += all_right
        count = max(len(scored), 1)
        metrics = {"objects_right": 100.0 * objects_right / count, "exact": 100.0 * exact / count}
        notes = _missing_note(items, predictions)
        if scored:
            # Only CIDEr is reported here: METEOR and SPICE would start Java for most of the scoring time.
            captions = caption_scores({item.id: predictions[item.id]["answer"] for item in scored},
                                      {item.id: [item.meta["caption"]] for item in scored}, java_metrics=False)
            metrics["cider"] = captions["cider"]
            notes += [note for note in captions.get("notes", []) if "java_metrics" not in note]
        return {"metrics": metrics, "count": len(scored), "notes": notes, "breakdown": {}}


def caption_matches(caption: str, scene: dict) -> tuple[bool, bool]:
    """(every object named with the right colour, shape and cell and none extra; the same with sizes)."""
    from mllm.data.judge import parse_prompt

    try:
        specs = parse_prompt(caption)
    except ValueError:
        return False, False
    objects = scene["objects"]

    def as_set(entries, fields):  # a multiset: a caption may leave a field out (None), which does not sort
        return Counter(tuple(entry.get(field) for field in fields) for entry in entries)

    right = as_set(specs, ("color", "shape", "cell")) == as_set(objects, ("color", "shape", "cell"))
    exact = as_set(specs, ("size", "color", "shape", "cell")) == as_set(objects, ("size", "color", "shape", "cell"))
    return right, exact


def _missing_note(items: list[Item], predictions: dict[str, dict]) -> list[str]:
    missing = sum(item.id not in predictions for item in items)
    return [f"{missing} of {len(items)} items have no prediction and were not scored"] if missing else []


SUITES = {"shapes-vqa": ShapesVQA, "shapes-caption": ShapesCaption}
