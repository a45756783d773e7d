"""`geneval-export`: draw GenEval's prompts into the folder layout its official scorer reads.

    mllm eval --suite geneval-export --model MODEL --data geneval/prompts/evaluation_metadata.jsonl --out OUT

GenEval (Ghosh et al., 2023, https://github.com/djghosh13/geneval) scores images with an object detector
(Mask2Former) and CLIP, neither of which this project ships, so this suite only draws and lays the
images out; the scoring runs in a GenEval checkout:

    OUT/00000/metadata.jsonl          the metadata line of prompt 0, unchanged (one JSON object)
    OUT/00000/samples/0000.png        image 0 (seed 0), 0001.png (seed 1), ...
    OUT/00001/...

`--data` is GenEval's `evaluation_metadata.jsonl` (one JSON object per line with at least "prompt" and
"tag"; every field is kept and written back), or a folder holding it. The folder number is the line's
index in that file (blank lines are not counted; GenEval's own loader has none). GenEval's scorer skips
folders whose names are not all digits, so the runner's own files in OUT do not disturb it.

Images per prompt: 4 (GenEval's protocol), `--option seeds=N` to change it (the runner reads it through
`configure`). `score` checks that the layout is complete and prints the command of the official scorer;
the drawn images are the model's native resolution (GenEval's detector was tuned on 512 px images, so
low-resolution models score lower than their content deserves: upscale first if needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval.suites.base import DrawSuite, Item, ScoreContext, jsonl_objects, save_pngs

METADATA_NAME = "evaluation_metadata.jsonl"
DEFAULT_IMAGES_PER_PROMPT = 4  # GenEval's protocol


def metadata_path(data: str | Path) -> Path:
    """--data as GenEval's metadata file: the file itself, or `evaluation_metadata.jsonl` in a folder."""
    path = Path(data)
    if path.is_dir():
        path = path / METADATA_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"--data {data}: no GenEval metadata found (expected {METADATA_NAME} or a folder holding it; it "
            "is prompts/evaluation_metadata.jsonl in a GenEval checkout)"
        )
    return path


def read_metadata(data: str | Path) -> list[dict]:
    """The metadata objects in file order (blank lines skipped); each needs "prompt" and "tag"."""
    path = metadata_path(data)
    rows = jsonl_objects(path, ("prompt",), 'a JSON object with "prompt" and "tag"',
                         f"{path}: no metadata lines", keys=("tag",))
    return [record for _, record in rows]


class GenEvalExportSuite(DrawSuite):
    """Draws GenEval prompts into GenEval's folder layout (see the module docstring)."""

    name = "geneval-export"
    images_per_prompt = DEFAULT_IMAGES_PER_PROMPT
    primary_metric = "complete_prompts"
    data_help = "GenEval's prompts/evaluation_metadata.jsonl (or its folder); writes OUT/<index:05d>/samples/*.png"

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        if not data:
            raise ValueError(
                "geneval-export needs --data: GenEval's prompts/evaluation_metadata.jsonl (or its folder)"
            )
        records = read_metadata(data)
        if limit is not None:
            records = records[:limit]
        return [
            Item(
                id=f"{index:05d}",
                prompt=record["prompt"],
                meta={"index": index, "tag": record["tag"], "category": record["tag"], "metadata": record},
            )
            for index, record in enumerate(records)
        ]

    def save_images(self, out: Path, item: Item, images: list) -> list[str]:
        """OUT/<idx:05d>/metadata.jsonl (the item's metadata line) and OUT/<idx:05d>/samples/<k:04d>.png."""
        out = Path(out)
        folder = out / f"{int(item.meta['index']):05d}"
        samples = folder / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(item.meta["metadata"]) + "\n")
        return save_pngs(images, samples, out)

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        if context.out is None:
            raise ValueError("geneval-export scores the layout in the run folder; pass --out")
        out = Path(context.out)
        expected = self.images_per_prompt
        complete = 0
        problems: list[str] = []
        per_tag: dict[str, dict[str, int]] = {}
        images = 0
        for item in items:
            folder = out / f"{int(item.meta['index']):05d}"
            found = _sample_count(folder / "samples")
            images += found
            metadata_ok = _metadata_matches(folder / "metadata.jsonl", item.meta["metadata"])
            ok = metadata_ok and found >= expected
            if not ok:
                what = [] if metadata_ok else ["metadata.jsonl missing or different"]
                if found < expected:
                    what.append(f"{found}/{expected} samples")
                problems.append(f"{folder.name}: {', '.join(what)}")
            complete += ok
            row = per_tag.setdefault(item.meta["tag"], {"prompts": 0, "complete": 0})
            row["prompts"] += 1
            row["complete"] += ok
        results_file = out / "results.jsonl"
        notes = [
            (
                "geneval-export only lays out images; score them with GenEval's official scorer, in a "
                f"GenEval checkout: python evaluation/evaluate_images.py {out} --outfile {results_file} "
                "--model-path <folder holding the Mask2Former detector checkpoint>, then python "
                f"evaluation/summary_scores.py {results_file}"
            )
        ]
        if problems:
            first = "; ".join(problems[:5])
            notes.append(f"{len(problems)} of {len(items)} prompt folders are incomplete (first: {first})")
        missing_predictions = sum(1 for item in items if not (predictions.get(item.id) or {}).get("images"))
        if missing_predictions:
            notes.append(f"{missing_predictions} items have no prediction record")
        return {
            "metrics": {
                "complete_prompts": 100.0 * complete / len(items) if items else 0.0,
                "prompts": len(items),
                "images": images,
                "images_per_prompt": expected,
            },
            "breakdown": {
                "tag": {
                    tag: {
                        "prompts": row["prompts"],
                        "complete_prompts": 100.0 * row["complete"] / row["prompts"],
                    }
                    for tag, row in sorted(per_tag.items())
                }
            },
            "count": len(items),
            "notes": notes,
        }


def _sample_count(samples: Path) -> int:
    """Consecutive samples 0000.png, 0001.png, ... present in a samples folder."""
    count = 0
    while (samples / f"{count:04d}.png").is_file():
        count += 1
    return count


def _metadata_matches(path: Path, record: dict) -> bool:
    try:
        return json.loads(path.read_text()) == record
    except (OSError, json.JSONDecodeError):
        return False


SUITES = {"geneval-export": GenEvalExportSuite}
