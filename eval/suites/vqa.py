"""`vqav2`, `textvqa`, `vizwiz`: open-ended VQA benchmarks in their official formats, scored with the
official VQA accuracy (eval.scoring.vqa).

`--data` is the benchmark's folder (textvqa / vizwiz: or the annotation JSON itself):

    vqav2    the official questions JSON (`{"questions": [{"image_id", "question", "question_id"}]}`) and
             annotations JSON (`{"annotations": [{"question_id", "question_type", "answer_type", "answers":
             [{"answer", ...}], ...}]}`), found anywhere under the folder by a file name containing
             "questions" / "annotations". The annotations alone are enough for `mllm eval-score`; the
             questions are needed for prompts (test-dev has questions only: score it on EvalAI). Images:
             COCO_<split>_<image_id:012d>.jpg, <image_id:012d>.jpg or <image_id>.jpg under the folder.
    textvqa  TextVQA_0.5.1_val.json (`{"data": [{"question_id", "image_id", "question", "answers": [10
             strings]}]}`); images <image_id>.jpg under the folder (e.g. train_images/). Answer type "all".
    vizwiz   VizWiz val.json (a list of `{"image": "VizWiz_val_00000000.jpg", "question", "answers":
             [{"answer", "answer_confidence"}], "answer_type", "answerable"}`); the item id is the image
             file name without extension; images under the folder (e.g. val/).

Images are looked up once (a walk of the folder) and stored as paths; none is opened by `load_items`. A
name matches with any of the suffixes .jpg, .jpeg and .png (`image_name_variants`: COCO_val2014_...42.jpg
is found as COCO_val2014_...42.png). An image that is not there becomes a `MissingImage`: `mllm eval`
lists the missing ones before the model loads, and scoring needs no images at all.

Prompts follow LLaVA-1.5's evaluation: the question, then "\\nAnswer the question using a single word or
phrase." (vizwiz: first "\\nWhen the provided information is insufficient, respond with 'Unanswerable'.",
as LLaVA does).

`--option normalize=official` (default) scores with the official rule, which normalises answers only where
the annotators disagree (a prediction "Cat" against ten "cat" scores 0); `normalize=lmms-eval` normalises
every answer and prediction first, as lmms-eval does (the same "Cat" scores 100). The rules are in
eval.scoring.vqa; results.json records the mode under "normalize".

Predictions: our JSONL `{"id", "answer"}`, or the official results file, a JSON list (or JSONL) of
`{"question_id", "answer"}` (vizwiz: `{"image", "answer"}`); LLaVA answer files (`"text"` instead of
`"answer"`) are read too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from eval.scoring.vqa import lmms_eval_answer_processor, lmms_eval_vqav2
from eval.suites.base import (
    IMAGE_SUFFIXES,
    NORMALIZE_OPTION,
    Item,
    MissingImage,
    ScoreContext,
    Suite,
    image_name_variants,
    load_json,
    normalize_option,
    read_jsonl_or_json,
)

INSTRUCTION = "\nAnswer the question using a single word or phrase."
VIZWIZ_INSTRUCTION = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + INSTRUCTION


NORMALIZE_NOTES = {
    "official": ("normalize=official: answers are normalised (punctuation, digits, articles, contractions) only "
                 "where the annotators disagree, as the official VQA script does"),
    "lmms-eval": ("normalize=lmms-eval: every answer and prediction is normalised first, as lmms-eval does "
                  "(not comparable with official figures)"),
}


class _Folder:
    """One walk of a --data folder: image file name -> path (the first in sorted order wins) and the JSON
    files. A file given as --data stands for its folder, with that file as the only JSON."""

    def __init__(self, data: str | None, suite: str):
        if data is None:
            raise ValueError(f"suite {suite} needs --data: the benchmark's folder (annotations and images)")
        path = Path(data).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"suite {suite}: --data {path} does not exist")
        self.file = path if path.is_file() else None
        self.root = path.parent if path.is_file() else path
        self.images: dict[str, str] = {}
        self.jsons: list[Path] = []
        for folder, subfolders, files in os.walk(self.root):
            subfolders.sort()
            for name in sorted(files):
                lowered = name.lower()
                if lowered.endswith(IMAGE_SUFFIXES):
                    self.images.setdefault(name, os.path.join(folder, name))
                elif lowered.endswith(".json"):
                    self.jsons.append(Path(folder) / name)
        if self.file is not None:
            self.jsons = [self.file]

    def image(self, names: list[str]) -> str | MissingImage:
        """The path of the first of `names` found (each also as .jpg, .jpeg or .png), else a MissingImage."""
        for name in names:
            for variant in image_name_variants(name):
                if variant in self.images:
                    return self.images[variant]
        return MissingImage(names, self.root)

    def named(self, word: str, exclude: tuple[str, ...] = ()) -> list[Path]:
        return [path for path in self.jsons
                if word in path.name.lower() and not any(part in path.name.lower() for part in exclude)]

    def pick(self, candidates: list[Path], what: str, suite: str) -> Path:
        """The one candidate (or the one with "val" in its name when there are several)."""
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise FileNotFoundError(f"suite {suite}: no {what} under {self.root}; pass the folder that holds "
                                    "it (or the file itself) as --data")
        val = [path for path in candidates if "val" in path.name.lower()]
        if len(val) == 1:
            return val[0]
        listing = ", ".join(str(path.relative_to(self.root)) for path in candidates)
        raise ValueError(f"suite {suite}: several candidates for the {what} under {self.root} ({listing}); "
                         "pass the file itself as --data, or a folder holding only one")


def _answer_strings(answers: Any, where: str) -> list[str] | None:
    """Annotators' answers as strings: a list of strings (TextVQA) or of {"answer": ...} (VQAv2, VizWiz)."""
    if answers is None:
        return None
    if not isinstance(answers, list):
        raise TypeError(f"{where}: 'answers' is {type(answers).__name__}, expected a list")
    return [str(answer["answer"]) if isinstance(answer, dict) else str(answer) for answer in answers] or None


class VQASuite(Suite):
    """The shared part of the three suites: items, prompts, predictions files and scoring.

    Subclasses implement `_records(folder)` -> [{"id", "question" (or None), "answers" (list of str or
    None), "answer_type", "question_type", "images": [candidate file names], "meta": {...}}].
    """

    max_new_tokens = 16
    primary_metric = "accuracy"
    option_names = (NORMALIZE_OPTION,)
    instruction = INSTRUCTION
    id_keys = ("id", "question_id")  # where a predictions record keeps its question's id
    lmms_eval_rule = staticmethod(lmms_eval_answer_processor)  # `--option normalize=lmms-eval`

    def configure(self, options: dict[str, str]) -> None:
        normalize_option(options)  # a bad value fails before anything loads

    def _records(self, folder: _Folder) -> list[dict[str, Any]]:
        raise NotImplementedError

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        """Items in file order (the first `limit` when given). Without a question (vqav2 from its
        annotations alone) the prompt is empty: enough to score, not to run a model."""
        folder = _Folder(data, self.name or type(self).__name__)
        records = self._records(folder)
        ids = [record["id"] for record in records]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"suite {self.name}: question id {duplicate} appears more than once in {data}")
        if limit is not None:
            records = records[:limit]
        items = []
        for record in records:
            question = record["question"]
            meta = {"question": question, "answers": record["answers"], "answer_type": record["answer_type"],
                    "question_type": record["question_type"], **record.get("meta", {})}
            items.append(Item(id=record["id"], prompt="" if question is None else question + self.instruction,
                              image=folder.image(record["images"]), meta=meta))
        return items

    def read_predictions(self, path: str | Path) -> list[dict]:
        """Our JSONL ({"id", "answer"}) or the official results (a JSON list or JSONL of {"question_id",
        "answer"}; vizwiz {"image", "answer"}) -> [{"id": str, "answer": str}]."""
        records = []
        for number, record in enumerate(read_jsonl_or_json(path), 1):
            key = next((key for key in self.id_keys if record.get(key) is not None), None)
            if key is None:
                raise ValueError(f"{path}: record {number} has none of the keys {', '.join(self.id_keys)}; "
                                 "expected our {'id', 'answer'} lines or the official results format")
            answer = record.get("answer", record.get("text"))
            if answer is None:
                raise ValueError(f"{path}: record {number} ({key} {record[key]}) has no 'answer'")
            records.append({**record, "id": self._id_of(key, record[key]), "answer": answer})
        return records

    def _id_of(self, key: str, value: Any) -> str:
        return str(value)

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        from eval.scoring.vqa import score_vqa

        labelled = [item for item in items if item.meta.get("answers")]
        if not labelled:
            raise ValueError(f"suite {self.name}: the data has no ground-truth answers (a test split?); "
                             "score it on the benchmark's official server (EvalAI) instead")
        answers = {}
        for item in labelled:
            if item.id in predictions:
                answer = predictions[item.id].get("answer")
                if not isinstance(answer, str):
                    raise ValueError(f"suite {self.name}: the prediction for {item.id} has answer {answer!r}; "
                                     "expected a string")
                answers[item.id] = answer
        annotations = [{"question_id": item.id, "answers": item.meta["answers"],
                        "answer_type": item.meta.get("answer_type"), "question_type": item.meta.get("question_type")}
                       for item in labelled]
        mode = normalize_option(context.options)
        results = score_vqa(answers, annotations, self.lmms_eval_rule if mode == "lmms-eval" else None)
        results["normalize"] = mode
        results["notes"].insert(0, NORMALIZE_NOTES[mode])
        unlabelled = len(items) - len(labelled)
        if unlabelled:
            results["notes"].append(f"{unlabelled} items have no ground-truth answers and were not scored")
        return results


class VQAv2(VQASuite):
    """VQAv2 (and VQA v1 real images): the official questions + annotations JSON files."""

    name = "vqav2"
    lmms_eval_rule = staticmethod(lmms_eval_vqav2)
    data_help = ("DIR: v2_OpenEnded_mscoco_<split>_questions.json, v2_mscoco_<split>_annotations.json; "
                 "images COCO_<split>_<image_id:012d>.jpg anywhere under DIR")
    image_names = "COCO_<split>_<image_id:012d>.jpg, <image_id:012d>.jpg or <image_id>.jpg anywhere under --data"

    def _records(self, folder: _Folder) -> list[dict[str, Any]]:
        if folder.file is not None:
            raise ValueError(f"suite vqav2: --data {folder.file} is a file; pass the folder that holds the "
                             "questions and annotations JSON files (and the images)")
        questions_files = folder.named("questions", exclude=("multiplechoice",))  # VQA v1 ships both kinds
        annotations_files = folder.named("annotations")
        if not questions_files and not annotations_files:
            raise FileNotFoundError(f"suite vqav2: no file with 'questions' or 'annotations' in its name under "
                                    f"{folder.root}; put the official VQAv2 JSON files there")
        annotations: dict[str, dict] | None = None
        order: list[str] = []
        subtype = None
        if annotations_files:
            path, content = _official_file(folder, annotations_files, "annotations",
                                           "v2_mscoco_val2014_annotations.json")
            annotations = {}
            for entry in content["annotations"]:
                question_id = str(entry["question_id"])
                annotations[question_id] = entry
                order.append(question_id)
            subtype = content.get("data_subtype")
        questions: dict[str, dict] | None = None
        if questions_files:
            path, content = _official_file(folder, questions_files, "questions",
                                           "v2_OpenEnded_mscoco_val2014_questions.json")
            questions = {str(entry["question_id"]): entry for entry in content["questions"]}
            order = [str(entry["question_id"]) for entry in content["questions"]]
            subtype = content.get("data_subtype") or subtype
            if annotations is not None and not any(question_id in annotations for question_id in order):
                raise ValueError(f"suite vqav2: no question id of {path.name} is in the annotations file: are "
                                 "they the same split? Keep one split's questions and annotations in the folder")

        coco_by_id = _coco_index(folder.images)
        records = []
        for question_id in order:
            question = questions.get(question_id) if questions is not None else None
            annotation = annotations.get(question_id) if annotations is not None else None
            source = annotation or question
            image_id = source.get("image_id")
            records.append({
                "id": question_id,
                "question": None if question is None else question["question"],
                "answers": None if annotation is None else _answer_strings(annotation.get("answers"),
                                                                           f"question {question_id}"),
                "answer_type": None if annotation is None else annotation.get("answer_type"),
                "question_type": None if annotation is None else annotation.get("question_type"),
                "images": _coco_names(image_id, subtype, coco_by_id),
                "meta": {"question_id": source["question_id"], "image_id": image_id},
            })
        return records


def _official_file(folder: _Folder, candidates: list[Path], key: str, example: str) -> tuple[Path, dict]:
    """The VQA file among `candidates` (named with `key`) and its content, a dict holding a `key` list."""
    path = folder.pick(candidates, f"file with '{key}' in its name", "vqav2")
    content = load_json(path, "suite vqav2")
    if not isinstance(content, dict) or not isinstance(content.get(key), list):
        raise ValueError(  # noqa: TRY004 (kept a ValueError: a file of the wrong format is a bad --data)
            f"suite vqav2: {path} has no '{key}' list; expected the official VQA {key} file (e.g. {example})"
        )
    return path, content


def _coco_index(images: dict[str, str]) -> dict[int, str]:
    """COCO_<split>_<id:012d>.jpg file names by image id (whatever the split)."""
    index = {}
    for name in images:
        if name.startswith("COCO_"):
            stem = name.rsplit(".", 1)[0]
            number = stem.rsplit("_", 1)[-1]
            if number.isdigit():
                index.setdefault(int(number), name)
    return index


def _coco_names(image_id: Any, subtype: str | None, coco_by_id: dict[int, str]) -> list[str]:
    if image_id is None:
        return ["(no image_id)"]
    names = []
    if subtype:
        names.append(f"COCO_{subtype}_{int(image_id):012d}.jpg")
    if int(image_id) in coco_by_id:
        names.append(coco_by_id[int(image_id)])
    names += [f"{int(image_id):012d}.jpg", f"{image_id}.jpg"]
    return names


class TextVQA(VQASuite):
    """TextVQA: TextVQA_0.5.1_val.json style ({"data": [...]}) with images <image_id>.jpg."""

    name = "textvqa"
    data_help = "DIR: TextVQA_0.5.1_val.json; images <image_id>.jpg anywhere under DIR (e.g. train_images/)"
    image_names = "<image_id>.jpg anywhere under --data"

    def _records(self, folder: _Folder) -> list[dict[str, Any]]:
        candidates = folder.named("textvqa", exclude=("ocr",)) or [
            path for path in folder.jsons if "ocr" not in path.name.lower()]
        path = folder.pick(candidates, "TextVQA JSON (TextVQA_0.5.1_val.json)", "textvqa")
        content = load_json(path, "suite textvqa")
        if not isinstance(content, dict) or not isinstance(content.get("data"), list):
            raise TypeError(f"suite textvqa: {path} has no 'data' list; expected the official TextVQA file "
                             "(e.g. TextVQA_0.5.1_val.json)")
        records = []
        for entry in content["data"]:
            question_id = str(entry["question_id"])
            records.append({
                "id": question_id,
                "question": entry["question"],
                "answers": _answer_strings(entry.get("answers"), f"{path.name}, question {question_id}"),
                "answer_type": entry.get("answer_type", "all"),
                "question_type": entry.get("question_type"),
                "images": [f"{entry['image_id']}.jpg"],
                "meta": {"question_id": entry["question_id"], "image_id": entry["image_id"]},
            })
        return records


class VizWiz(VQASuite):
    """VizWiz-VQA: val.json style (a list of {"image", "question", "answers", "answer_type", ...})."""

    name = "vizwiz"
    instruction = VIZWIZ_INSTRUCTION
    data_help = "DIR: val.json (VizWiz annotations); images VizWiz_val_<8 digits>.jpg anywhere under DIR (e.g. val/)"
    image_names = "the 'image' field of val.json (VizWiz_val_<8 digits>.jpg) anywhere under --data"
    id_keys = ("id", "image", "question_id")

    def _records(self, folder: _Folder) -> list[dict[str, Any]]:
        path = folder.pick(folder.jsons, "VizWiz annotations JSON (val.json)", "vizwiz")
        content = load_json(path, "suite vizwiz")
        if not isinstance(content, list) or not all(isinstance(entry, dict) and "image" in entry
                                                    for entry in content):
            raise ValueError(f"suite vizwiz: {path} is not a list of {{'image', 'question', 'answers', ...}}; "
                             "expected the official VizWiz annotations (e.g. Annotations/val.json)")
        records = []
        for entry in content:
            image = entry["image"]
            records.append({
                "id": Path(image).stem,
                "question": entry["question"],
                "answers": _answer_strings(entry.get("answers"), f"{path.name}, image {image}"),
                "answer_type": entry.get("answer_type", "all") if entry.get("answers") else None,
                "question_type": None,
                "images": [image],
                "meta": {"image": image, "answerable": entry.get("answerable")},
            })
        return records

    def _id_of(self, key: str, value: Any) -> str:
        return Path(str(value)).stem if key == "image" else str(value)


SUITES = {"vqav2": VQAv2, "textvqa": TextVQA, "vizwiz": VizWiz}
