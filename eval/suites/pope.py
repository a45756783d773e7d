"""POPE: object-hallucination yes/no questions ("Is there a dog in the image?") on COCO val2014.

    mllm eval --suite pope --data /data/pope      (coco_pope_adversarial.json, _popular, _random + images/)

Data: POPE's annotation files, one JSON object per line {"question_id", "image", "text", "label"}
(label "yes"/"no"), e.g. coco_pope_adversarial.json, coco_pope_popular.json, coco_pope_random.json.
--data is one such file or a folder of them (files with "pope" in the name, in the folder or one level
down, e.g. coco/); files without labels there (LLaVA's llava_pope_test.jsonl) are skipped. The category
comes from the file name (coco_pope_<category>.json) or from a record's "category" field. Images are
looked up in images/, val2014/ or the folder itself (also one level up), as named in the "image" field
(COCO_val2014_<id:012d>.jpg) or with .jpeg / .png instead; missing ones are listed before the model loads.
Items interleave the categories (adversarial 1, popular 1, random 1, adversarial 2, ...), so --limit
keeps them balanced; ids are "<category>-<question_id>" (question ids restart in every file).
Prompt (LLaVA-1.5's): the question + "\\nAnswer the question using a single word or phrase.".
Score (eval.scoring.pope, LLaVA's parsing): accuracy, precision, recall, F1 (positive = "yes") and
yes-ratio in %, overall and per category; f1_category_mean is the mean F1 over the categories.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from eval.suites.base import (
    ImageDir,
    Item,
    ScoreContext,
    Suite,
    coco_image_dir,
    prediction_notes,
    read_jsonl_or_json,
)

PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
_CATEGORY = re.compile(r"pope_([A-Za-z0-9]+)$")


def category_from_name(path: str | Path) -> str:
    """coco_pope_adversarial.json -> "adversarial"; a name without "pope_<x>" -> its stem."""
    stem = Path(path).name.split(".")[0]
    match = _CATEGORY.search(stem)
    return match.group(1) if match else stem


def _read_file(path: Path, require_labels: bool) -> list[dict] | None:
    try:
        records = read_jsonl_or_json(path)
    except ValueError as error:
        raise ValueError(f"pope: cannot read {path} ({error}); expected POPE's JSONL annotation format, one "
                         "{'question_id', 'image', 'text', 'label'} object per line") from error
    unlabelled = [r for r in records if "label" not in r]
    if unlabelled:
        if not require_labels:
            return None
        raise ValueError(f"pope: {path} has records without 'label' (e.g. question_id "
                         f"{unlabelled[0].get('question_id')!r}); pass POPE's annotation files "
                         "(coco_pope_<category>.json), not a question-only file")
    for record in records:
        missing = {"question_id", "image", "text"} - record.keys()
        if missing:
            raise ValueError(f"pope: a record of {path} lacks {sorted(missing)}; expected "
                             "{'question_id', 'image', 'text', 'label'}")
    return records


class POPESuite(Suite):
    """POPE (adversarial / popular / random); primary metric: F1 (%) over all items."""

    primary_metric = "f1"
    data_help = ("DIR: coco_pope_{adversarial,popular,random}.json; images COCO_val2014_<id:012d>.jpg in "
                 "DIR/images/ or DIR/val2014/")
    image_names = "the records' \"image\" field (COCO_val2014_<id:012d>.jpg) in images/ or val2014/ beside the files"

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        if not data:
            raise ValueError("pope needs --data: a coco_pope_<category>.json file or a folder of them "
                             "(with the COCO val2014 images in images/)")
        path = Path(data).expanduser()
        if path.is_file():
            files = {path: _read_file(path, require_labels=True)}
            base = path.parent
        elif path.is_dir():
            found = sorted(p for p in path.glob("*pope*.json*") if p.suffix in (".json", ".jsonl"))
            if not found:
                found = sorted(p for p in path.glob("*/*pope*.json*") if p.suffix in (".json", ".jsonl"))
            files = {p: _read_file(p, require_labels=False) for p in found}
            files = {p: records for p, records in files.items() if records is not None}
            if not files:
                raise FileNotFoundError(f"pope: no labelled POPE files (*pope*.json with 'label') in {path} "
                                        "or its subfolders; download coco_pope_adversarial/popular/random.json")
            base = path
        else:
            raise FileNotFoundError(f"pope: {path} does not exist; pass a coco_pope_<category>.json file or "
                                    "its folder as --data")

        by_category: dict[str, list[dict]] = {}
        for file, records in files.items():
            default = category_from_name(file)
            for record in records:
                by_category.setdefault(str(record.get("category") or default), []).append(record)
        # round-robin over the categories (sorted), so that a --limit keeps them balanced
        queues = [by_category[name] for name in sorted(by_category)]
        ordered: list[dict] = []
        names = sorted(by_category)
        for position in range(max(len(queue) for queue in queues)):
            for name, queue in zip(names, queues):
                if position < len(queue):
                    ordered.append({**queue[position], "category": name})
        if limit is not None:
            ordered = ordered[: max(0, limit)]

        items: list[Item] = []
        seen: set[str] = set()
        image_dir: ImageDir | None = None
        for record in ordered:
            item_id = f"{record['category']}-{record['question_id']}"
            if item_id in seen:
                raise ValueError(f"pope: question id {record['question_id']!r} appears twice in category "
                                 f"{record['category']!r}; each file's question ids must be unique")
            seen.add(item_id)
            if image_dir is None:
                image_dir = ImageDir(coco_image_dir(base, str(record["image"])))
            items.append(Item(
                id=item_id,
                prompt=str(record["text"]) + PROMPT_SUFFIX,
                image=image_dir.find(str(record["image"])),
                meta={"label": str(record["label"]).strip().lower(), "category": record["category"],
                      "question_id": record["question_id"], "question": str(record["text"])},
            ))
        return items

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        from eval.scoring.pope import pope_scores

        labels = {item.id: item.meta["label"] for item in items}
        categories = {item.id: item.meta["category"] for item in items}
        texts = {key: record.get("answer") for key, record in predictions.items()}
        result = pope_scores(texts, labels, categories)
        notes = [(
            "answers parsed as in LLaVA's eval_pope.py: first sentence, 'no'/'not' as a word -> no, "
            "else yes (words compared lowercased)"
        )]
        notes += prediction_notes(predictions, labels, result["missing"])
        metrics = {name: value for name, value in result["metrics"].items() if name != "count"}
        return {"metrics": metrics, "breakdown": result["breakdown"], "count": len(items),
                "notes": notes}


SUITES = {"pope": POPESuite}
