"""The suite interface of `mllm eval` / `mllm eval-score`: a suite = reader + prompt template + scorer.

A suite module in `eval/suites/` exposes `SUITES = {"name": factory, ...}` (a factory takes no argument
and returns a `Suite`); the registry (`eval.suites.get_suite`) finds it by name, so adding a benchmark
means adding one module. Modules import heavy dependencies inside functions only.

Kinds:
    "answer"  image + prompt -> text. The runner sends [{"role": "user", "content": [image, prompt]}]
              (greedy, `max_new_tokens`) and records {"id", "answer"}.
    "draw"    prompt -> `images_per_prompt` images (seeds 0..n-1). The runner saves them with
              `save_images` and records {"id", "images": [paths relative to OUT]}.
    "custom"  the suite does everything in `run` (e.g. the tokenizer metrics); no predictions file.

Predictions are JSONL, one object per item id; `score` gets them keyed by id, with the items, and
returns {"metrics": {name: value}, "breakdown": {group: {value: {metric: value}}}, "count": n,
"notes": [str]}: percentages in [0, 100] where a metric is a rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("answer", "draw", "custom")


@dataclass
class Item:
    """One evaluation unit: `id` is unique within the suite (a string: question ids, image ids, indices)."""

    id: str
    prompt: str = ""  # answer: the full text turn (question + the suite's instruction); draw: the prompt
    image: Any = None  # answer: a PIL image or an image path
    meta: dict[str, Any] = field(default_factory=dict)  # what the scorer needs (answers, category, ...)


@dataclass
class ScoreContext:
    """What a scorer may need besides predictions and items."""

    out: Path | None = None  # the run's folder (draw suites: where the images are)
    data: str | None = None  # --data
    model: str | None = None  # --model (absent for eval-score)
    options: dict[str, Any] = field(default_factory=dict)  # suite options (--option key=value)


class Suite:
    name: str = ""
    kind: str = "answer"
    max_new_tokens: int = 32  # answer suites
    images_per_prompt: int = 1  # draw suites
    needs_data: bool = True  # False: the suite builds its own items when --data is omitted (shapes suites)

    def configure(self, options: dict[str, str]) -> None:
        """Apply `--option KEY=VALUE` settings (strings) before items are read; unknown keys are ignored."""

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        """The suite's items in a fixed order (the first `limit` when given)."""
        raise NotImplementedError

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        raise NotImplementedError

    def read_predictions(self, path: str | Path) -> list[dict]:
        """A predictions file -> [{"id": str, ...}]: JSONL (one object per line), or a JSON list."""
        return read_jsonl_or_json(path)

    def save_images(self, out: Path, item: Item, images: list) -> list[str]:
        """Draw suites: save an item's images under OUT; returns their paths relative to OUT."""
        folder = out / "images" / _safe(item.id)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, image in enumerate(images):
            path = folder / f"{k:04d}.png"
            image.save(path)
            paths.append(str(path.relative_to(out)))
        return paths

    def run(self, args, out: Path) -> dict[str, Any]:
        """Custom suites: evaluate and return the results dict."""
        raise NotImplementedError


def read_jsonl_or_json(path: str | Path) -> list[dict]:
    text = Path(path).read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(stripped)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a JSON list of objects or JSONL, one object per line")
    return records


def jsonl_rows(path: Path):
    """(where, row) for each non-blank line of a JSONL file; `where` is "path:line" for error messages."""
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from None


def first_dir_holding(candidates: list[Path], file_name: str) -> Path:
    """The first of `candidates` that holds `file_name` (else the first candidate): where a benchmark's
    images live, found from one of them."""
    for candidate in candidates:
        if (candidate / file_name).is_file():
            return candidate
    return candidates[0]


def _safe(item_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(item_id)) or "_"


__all__ = ["KINDS", "Item", "ScoreContext", "Suite", "first_dir_holding", "jsonl_rows", "read_jsonl_or_json"]
