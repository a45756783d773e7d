"""GQA (balanced test-dev): compositional questions about real images, scored by exact match.

    mllm eval --suite gqa --data /data/gqa    (or --data /data/gqa/questions/testdev_balanced_questions.json)

Data: the official question file, a JSON dict {question_id: {"imageId", "question", "answer", "types":
{"structural", "semantic", "detailed"}, ...}} (testdev_balanced_questions.json), and the images
`<imageId>.jpg` (or .jpeg / .png). --data is that file, or a folder holding it (directly or under
questions/); the images are looked up in images/ next to it (or in the same folder, or in images/ one
level up). Missing images are listed by `mllm eval` before the model loads.
Prompt (LLaVA-1.5's): the question + "\\nAnswer the question using a single word or phrase.".
Score: accuracy (%) after lowercasing and dropping a trailing period (see eval.scoring.gqa), with
breakdowns by the structural and semantic question types. `--option normalize=lmms-eval` compares as
lmms-eval does instead: lower-cased, every punctuation mark deleted (results.json records the mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.suites.base import (
    NORMALIZE_OPTION,
    ImageDir,
    Item,
    ScoreContext,
    Suite,
    first_dir_holding,
    load_json,
    normalize_option,
    prediction_notes,
)

PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
QUESTIONS_FILE = "testdev_balanced_questions.json"


def _find_questions_file(data: str | None) -> Path:
    if not data:
        raise ValueError(f"gqa needs --data: the path of {QUESTIONS_FILE} or of a folder holding it "
                         "(and the images in images/)")
    path = Path(data).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"gqa: {path} does not exist; pass {QUESTIONS_FILE} or its folder as --data")
    for candidate in (path / QUESTIONS_FILE, path / "questions" / QUESTIONS_FILE):
        if candidate.is_file():
            return candidate
    found = sorted(path.glob("*questions*.json")) + sorted(path.glob("questions/*questions*.json"))
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"gqa: several question files in {path} ({', '.join(p.name for p in found)}); "
                         "pass the one to evaluate as --data")
    raise FileNotFoundError(f"gqa: no {QUESTIONS_FILE} in {path} or {path / 'questions'}; download GQA's "
                            "questions1.2.zip and point --data at the file")


def _image_dir(base: Path, first_image: str) -> Path:
    """The folder among the usual places that holds `first_image` (else the first of them)."""
    return first_dir_holding([base / "images", base, base.parent / "images"], first_image)


class GQASuite(Suite):
    """GQA test-dev balanced; primary metric: accuracy (%)."""

    primary_metric = "accuracy"
    option_names = (NORMALIZE_OPTION,)
    data_help = "DIR: testdev_balanced_questions.json (or questions/ of it); images <imageId>.jpg in DIR/images/"
    image_names = "<imageId>.jpg in images/ beside the questions file (or beside questions/)"

    def configure(self, options: dict[str, str]) -> None:
        normalize_option(options)  # a bad value fails before anything loads

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        path = _find_questions_file(data)
        questions = load_json(path, "gqa", expected=QUESTIONS_FILE)
        if not isinstance(questions, dict) or not questions:
            raise ValueError(f"gqa: {path} should be a non-empty JSON object {{question_id: {{'imageId', "
                             "'question', 'answer', 'types'}}}} as in the official GQA release")
        rows = list(questions.items())
        if limit is not None:
            rows = rows[: max(0, limit)]
        base = path.parent.parent if path.parent.name == "questions" else path.parent
        items = []
        image_dir: ImageDir | None = None
        for question_id, record in rows:
            if not isinstance(record, dict) or not {"imageId", "question"} <= record.keys():
                raise ValueError(f"gqa: question {question_id!r} in {path} lacks 'imageId' or 'question'; "
                                 f"expected the official {QUESTIONS_FILE} format")
            file_name = f"{record['imageId']}.jpg"
            if image_dir is None:
                image_dir = ImageDir(_image_dir(base, file_name))
            items.append(Item(
                id=str(question_id),
                prompt=str(record["question"]) + PROMPT_SUFFIX,
                image=image_dir.find(file_name),
                meta={"answer": record.get("answer"), "types": dict(record.get("types") or {}),
                      "image_id": str(record["imageId"]), "question": str(record["question"])},
            ))
        return items

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        from eval.scoring.gqa import gqa_scores, lmms_eval_normalize, normalize_answer

        unanswerable = [item.id for item in items if item.meta.get("answer") is None]
        if unanswerable:
            raise ValueError(f"gqa: {len(unanswerable)} questions have no 'answer' (e.g. {unanswerable[0]!r}); "
                             "score the test-dev balanced split, whose answers are public")
        answers = {item.id: str(item.meta["answer"]) for item in items}
        texts = {key: record.get("answer") for key, record in predictions.items()}
        mode = normalize_option(context.options)
        result = gqa_scores(texts, answers, {item.id: item.meta.get("types") or {} for item in items},
                            normalizer=lmms_eval_normalize if mode == "lmms-eval" else normalize_answer)
        notes = [(
            "normalize=official: exact match after lowercasing, stripping and dropping a trailing period (as "
            "LLaVA's convert_gqa_for_eval.py + the official eval.py accuracy)"
        ) if mode == "official" else (
            "normalize=lmms-eval: exact match after lowercasing and deleting every punctuation mark, as "
            "lmms-eval's gqa task does"
        )]
        notes += prediction_notes(predictions, answers, result["missing"])
        return {"metrics": {"accuracy": result["accuracy"]}, "breakdown": result["breakdown"],
                "count": result["count"], "notes": notes, "normalize": mode}


SUITES = {"gqa": GQASuite}
