"""COCO Captions: describe the image, scored with CIDEr-D and BLEU-4 (pycocoevalcap).

    mllm eval --suite coco-caption --data /data/coco/annotations/captions_val2014.json

Data: a COCO captions annotation file {"images": [{"id", "file_name"}, ...], "annotations":
[{"image_id", "caption"}, ...]} (captions_val2014.json, or a Karpathy-split file in the same format).
--data is the file, or a folder holding exactly one captions*.json (directly or under annotations/).
One item per image that has at least one caption, in the order of "images"; the image file is looked up
in images/, val2014/ or the folder itself, next to the file or one level up (an image without
"file_name" is taken to be COCO_val2014_<id, 12 digits>.jpg; .jpeg / .png instead of .jpg match too).
Missing images are listed by `mllm eval` before the model loads.
Prompt: "Describe the image." (the project's caption prompt); up to 64 new tokens.
Score (eval.scoring.captions.caption_scores): CIDEr (primary) and BLEU-4 as pycocoevalcap value x 100
(CIDEr 110.5), METEOR and SPICE too when Java is present; the notes say which tokenizer ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.suites.base import ImageDir, Item, ScoreContext, Suite, coco_image_dir, load_json, prediction_notes

PROMPT = "Describe the image."


def _find_annotations(data: str | None) -> Path:
    if not data:
        raise ValueError("coco-caption needs --data: a COCO captions annotation file (e.g. "
                         "annotations/captions_val2014.json) or its folder")
    path = Path(data).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"coco-caption: {path} does not exist; pass captions_val2014.json (or a "
                                "Karpathy-split file in the same format) as --data")
    found = sorted(path.glob("*caption*.json")) + sorted(path.glob("annotations/*caption*.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"coco-caption: no *caption*.json in {path} or {path / 'annotations'}; pass the "
                                "annotation file as --data")
    raise ValueError(f"coco-caption: several caption files in {path} ({', '.join(p.name for p in found)}); "
                     "pass the one to evaluate as --data")


class COCOCaptionSuite(Suite):
    """COCO captioning; primary metric: CIDEr (x 100)."""

    max_new_tokens = 64
    primary_metric = "cider"
    data_help = ("captions_val2014.json (or DIR holding it, or DIR/annotations/); images (their file_name, "
                 "COCO_val2014_<id:012d>.jpg) in images/ or val2014/")
    image_names = "the file_name of each image (COCO_val2014_<id:012d>.jpg) in images/ or val2014/ beside the file"

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        path = _find_annotations(data)
        content = load_json(path, "coco-caption")
        valid = isinstance(content, dict) and isinstance(content.get("annotations"), list)
        if not valid:
            raise ValueError(f"coco-caption: {path} is not a COCO captions file: expected {{'images': [...], "
                             "'annotations': [{'image_id', 'caption'}, ...]}")
        references: dict[str, list[str]] = {}
        for annotation in content["annotations"]:
            if "image_id" not in annotation or "caption" not in annotation:
                raise ValueError(f"coco-caption: an annotation of {path} lacks 'image_id' or 'caption': "
                                 f"{str(annotation)[:200]}")
            references.setdefault(str(annotation["image_id"]), []).append(str(annotation["caption"]))
        images = content.get("images") or [{"id": key} for key in references]
        base = path.parent.parent if path.parent.name == "annotations" else path.parent
        items: list[Item] = []
        seen: set[str] = set()
        image_dir: ImageDir | None = None
        for image in images:
            if limit is not None and len(items) >= limit:
                break
            image_id = str(image["id"])
            if image_id in seen or image_id not in references:
                continue
            seen.add(image_id)
            file_name = image.get("file_name") or f"COCO_val2014_{int(image_id):012d}.jpg"
            if image_dir is None:
                image_dir = ImageDir(coco_image_dir(base, file_name))
            items.append(Item(id=image_id, prompt=PROMPT, image=image_dir.find(file_name),
                              meta={"references": references[image_id], "file_name": file_name}))
        if not items and limit != 0:
            raise ValueError(f"coco-caption: no image of {path} has a caption; check the annotation file")
        return items

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        from eval.scoring.captions import caption_scores

        references = {item.id: list(item.meta["references"]) for item in items}
        captions = {key: record.get("answer") for key, record in predictions.items()
                    if key in references and record.get("answer") is not None}
        result = caption_scores(captions, references)
        notes = list(result["notes"]) + prediction_notes(predictions, references, what="image id")
        metrics = {name: result[name] for name in ("cider", "bleu4", "meteor", "spice") if name in result}
        return {"metrics": metrics, "breakdown": {}, "count": len(items), "notes": notes}


SUITES = {"coco-caption": COCOCaptionSuite}
