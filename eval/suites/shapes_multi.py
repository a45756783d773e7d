"""`shapes-multi`: questions over two images of the shapes world, with exact answers.

    mllm eval --suite shapes-multi --model runs/demo/model --out runs/eval/multi [--option look=other]

Items: pairs of held-out scenes (split "test": odd seeds, never trained on), 100 pairs in a fixed order.
Pair p takes the scene `scene_seed("test", 2p)` as its first image; an even p is an edit pair (the second
image is that scene after one edit, `make_edit(first).target`, so untouched objects look the same), an odd p
two independent scenes (the second is `scene_seed("test", 2p + 1)`). The questions are those of
`mllm.data.shapes_tasks.multi_qa` (types count, more, change, single; "change" only for edit pairs), each
one item '<pair:03d>-<k>', asked as the model was trained (`multi_image_sample`): one user turn holding the
first image, the second image, then the question. `--limit N` keeps the first N questions (a pair's
questions are consecutive; the first pair alone has every type).

Scoring: exact match after lower-casing and stripping surrounding whitespace and a final '.'. Metrics,
percentages: `accuracy` (primary, the mean over questions) and `accuracy_<type>` per question type
(accuracy_count, accuracy_more, accuracy_change, accuracy_single); the breakdown also splits by pair kind
(edit, independent).

`--data`: shards written by `mllm data shapes --split test` replace the built-in scenes (scene 2p and
2p + 1 of the shards play the roles above; pairs stop where the shards run out); the images are rendered
again at `size` in `look`.

Options (`--option key=value`):
    look=exact|varied|other   how scenes are rendered (default varied, the training world)
    size=N                    image side (default: the model's image size, read from its folder; else 48)
    first=N                   start at held-out scene N (default 0; with --data, the shards' N-th scene):
                              first=11000 asks about scenes the default items never use
    balanced=true             every question type asked equally often: every pair an edit pair (scene
                              first + p and its edit), one question of each type a pair (the count and the
                              named-image question about the first image in even pairs, the second in odd
                              ones), where the default mixture asks "what changed" once in eleven
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from eval.suites.base import Item, ScoreContext, Suite, bool_option
from eval.suites.shapes_edit import RenderOptions, heldout_scenes, percent, render_scene

DEFAULT_PAIRS = 100
PAIR_KINDS = ("edit", "independent")


def normalise(text: Any) -> str:
    """Lower-cased, surrounding whitespace and one final '.' stripped."""
    text = str(text).strip().lower()
    return text[:-1].strip() if text.endswith(".") else text


def balanced_questions(questions: list[dict], pair: int) -> list[dict]:
    """One question of each type: of the two asked about each image (count, single), the first image's in
    an even pair and the second's in an odd one."""
    chosen: dict[str, list[dict]] = defaultdict(list)
    for qa in questions:
        chosen[qa["type"]].append(qa)
    return [of_type[pair % 2 if len(of_type) > 1 else 0] for of_type in chosen.values()]


def multi_items(data: str | None, limit: int | None, size: int, look: str, first_scene: int = 0,
                balanced: bool = False) -> list[Item]:
    """The items of the module docstring from held-out scene `first_scene` on: DEFAULT_PAIRS pairs (every
    pair the shards allow with `data`), the first `limit` questions when given; `balanced`: edit pairs only,
    one question of each type a pair."""
    from mllm.data.shapes_tasks import make_edit, multi_qa

    pairs = DEFAULT_PAIRS if data is None else None
    scenes = heldout_scenes(data, first_scene)
    items: list[Item] = []
    pair = 0
    while (pairs is None or pair < pairs) and (limit is None or len(items) < limit):
        first = next(scenes, None)
        kind = "edit" if balanced else PAIR_KINDS[pair % 2]
        other = None if balanced else next(scenes, None)  # the independent pairs' second scene
        if first is None or (kind == "independent" and other is None):
            break
        if kind == "edit":
            edit = make_edit(first)
            second, change, operation = edit.target, edit.change, edit.operation
        else:
            second, change, operation = other, None, None
        images = [render_scene(first, size, look), render_scene(second, size, look)]
        questions = multi_qa(first, second, change=change)
        for k, qa in enumerate(balanced_questions(questions, pair) if balanced else questions):
            items.append(Item(
                id=f"{pair:03d}-{k}", prompt=qa["question"], image=images,
                meta={"answer": qa["answer"], "type": qa["type"], "pair": kind, "scene_seeds": [first.seed, second.seed],
                      **({"operation": operation} if operation else {})},
            ))
        pair += 1
    return items[:limit] if limit is not None else items


class ShapesMultiSuite(RenderOptions, Suite):
    """Questions over two images (see the module docstring)."""

    name = "shapes-multi"
    kind = "answer"
    max_new_tokens = 32  # the longest answers are changes: "a small red circle was added at the top left"
    needs_data = False
    primary_metric = "accuracy"
    option_names = RenderOptions.render_option_names + ("balanced",)
    balanced: bool = False
    data_help = ("optional: shards from `mllm data shapes --split test`; default: held-out scene pairs (half "
                 "an edit, half independent), two images per question")

    def configure(self, options: dict[str, Any] | None) -> None:
        self.configure_rendering(options)
        self.balanced = bool_option(options, "balanced")

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        return multi_items(data, limit, self.image_size, self.look, self.first, self.balanced)

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        from mllm.data.shapes_tasks import MULTI_QUESTION_TYPES

        by_type: dict[str, list[bool]] = defaultdict(list)
        by_pair: dict[str, list[bool]] = defaultdict(list)
        every: list[bool] = []
        for item in items:
            if item.id not in predictions:
                continue
            correct = normalise(predictions[item.id].get("answer", "")) == normalise(item.meta["answer"])
            every.append(correct)
            by_type[item.meta["type"]].append(correct)
            by_pair[item.meta["pair"]].append(correct)
        types = [t for t in MULTI_QUESTION_TYPES if t in by_type] + sorted(set(by_type) - set(MULTI_QUESTION_TYPES))
        metrics: dict[str, Any] = {"accuracy": percent(every)}
        for question_type in types:
            metrics[f"accuracy_{question_type}"] = percent(by_type[question_type])
        notes = ["exact match after lower-casing and stripping surrounding whitespace and a final '.'"]
        missing = sum(item.id not in predictions for item in items)
        if missing:
            notes.append(f"{missing} of {len(items)} questions have no prediction and were not scored")
        absent = [t for t in MULTI_QUESTION_TYPES if t not in by_type]
        if absent:
            notes.append(f"no scored question of type {', '.join(absent)}")
        breakdown = {
            "question type": {t: {"accuracy": percent(by_type[t]), "count": len(by_type[t])} for t in types},
            "pair": {kind: {"accuracy": percent(by_pair[kind]), "count": len(by_pair[kind])}
                     for kind in PAIR_KINDS if kind in by_pair},
        }
        return {"metrics": metrics, "breakdown": breakdown, "count": len(every), "notes": notes}


SUITES = {"shapes-multi": ShapesMultiSuite}
