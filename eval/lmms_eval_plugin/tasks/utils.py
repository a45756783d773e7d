"""The hooks of the lmms-eval tasks `shapes_vqa` and `shapes_caption` (the YAML files beside this one).

Docs are the rows `python -m eval.lmms_eval_plugin export` writes (eval/lmms_eval_plugin/export.py): an `image`
(decoded by `datasets` to a PIL image), the prompt our suite sends (`question` / `prompt`), and what our scorer
needs. Scoring goes through the suites of `mllm eval` (eval/suites/shapes.py) so that an answer is right here
exactly when it is right there: shapes_vqa per doc through `ShapesVQA.score` (exact match after lower-casing
and dropping a final period), shapes_caption through `caption_matches` (objects_right, exact) and, over all
docs at once, `eval.scoring.captions.caption_scores` (CIDEr, with the suite's arguments, so the same tokenizer:
PTB when Java is on PATH, else the pure-Python one). Every metric is a percentage, as in `mllm eval`'s results.json.
"""

from __future__ import annotations

import json
from typing import Any


def _prompt(text: str, lmms_eval_specific_kwargs: dict | None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{text}{kwargs.get('post_prompt', '')}"


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


# ---------------------------------------------------------------------------------------- shapes_vqa
def vqa_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The bare question, as the model was trained and as `mllm eval --suite shapes-vqa` asks it."""
    return _prompt(doc["question"], lmms_eval_specific_kwargs)


def vqa_doc_to_target(doc: dict) -> str:
    return doc["answer"]


def vqa_score(doc: dict, prediction: str) -> float:
    """100 when `prediction` is right for `doc` by the shapes-vqa suite's own scorer, else 0."""
    from eval.suites.base import Item, ScoreContext
    from eval.suites.shapes import ShapesVQA

    item = Item(id=str(doc["id"]), prompt=doc["question"], meta={"answer": doc["answer"], "type": doc["type"]})
    results = ShapesVQA().score({item.id: {"id": item.id, "answer": prediction}}, [item], ScoreContext())
    return float(results["metrics"]["accuracy"])


def vqa_process_results(doc: dict, results: list) -> dict[str, float]:
    return {"accuracy": vqa_score(doc, _text(results))}


# ---------------------------------------------------------------------------------------- shapes_caption
def caption_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The suite's caption prompt ("Describe the image.")."""
    return _prompt(doc["prompt"], lmms_eval_specific_kwargs)


def caption_doc_to_target(doc: dict) -> str:
    return doc["caption"]


def caption_process_results(doc: dict, results: list) -> dict[str, Any]:
    from eval.suites.shapes import caption_matches

    prediction = _text(results)
    right, exact = caption_matches(prediction, json.loads(doc["scene"]))
    return {"objects_right": 100.0 * right, "exact": 100.0 * exact,
            "cider": {"id": str(doc["id"]), "prediction": prediction, "reference": doc["caption"]}}


def cider_aggregate(items: list[dict]) -> float:
    """CIDEr over every scored doc at once (its document frequencies are the whole set's), as the suite."""
    from eval.scoring.captions import caption_scores

    if not items:
        return 0.0
    scores = caption_scores({item["id"]: item["prediction"] for item in items},
                            {item["id"]: [item["reference"]] for item in items}, java_metrics=False)
    return float(scores["cider"])


def _text(results: list) -> str:
    """The model's reply from lmms-eval's `results` (one reply, possibly wrapped by a filter)."""
    reply = results[0] if isinstance(results, (list, tuple)) and results else results
    if isinstance(reply, (list, tuple)):
        reply = reply[0] if reply else ""
    return "" if reply is None else str(reply)
