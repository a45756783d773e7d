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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizer_vision.schema import check_keys

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
    """A benchmark (see the module docstring). A subclass sets only what differs from these defaults (an
    "answer" suite that reads --data and answers in up to 32 new tokens), and its `primary_metric`."""

    name: str = ""
    kind: str = "answer"
    max_new_tokens: int = 32  # answer suites
    images_per_prompt: int = 1  # draw suites
    needs_data: bool = True  # False: the suite builds its own items when --data is omitted (shapes suites)
    option_names: tuple[str, ...] = ()  # the `--option KEY=VALUE` keys the suite reads; others are refused

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse an `--option` key the suite does not read (a typo would otherwise be silently ignored)."""
        check_keys(options, self.option_names, f"{self.name} option")

    def configure(self, options: dict[str, str]) -> None:
        """Apply `--option KEY=VALUE` settings (strings) before items are read."""

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
        return save_pngs(images, out / "images" / _safe(item.id), out)

    def run(self, args, out: Path) -> dict[str, Any]:
        """Custom suites: evaluate and return the results dict."""
        raise NotImplementedError


class DrawSuite(Suite):
    """A draw suite whose images per prompt (seeds 0..n-1) `--option seeds=N` sets; a subclass gives its
    default as the class attribute `images_per_prompt`."""

    kind = "draw"
    option_names = ("seeds",)

    def __init__(self, images_per_prompt: int | None = None) -> None:
        if images_per_prompt is not None:
            self.images_per_prompt = images_per_prompt

    def configure(self, options: dict[str, Any] | None) -> None:
        """Apply `--option seeds=N` (images per prompt); call before drawing."""
        self.images_per_prompt = int_option(options, "seeds", self.images_per_prompt)


def int_option(options: dict[str, Any] | None, key: str, default: int, minimum: int = 1) -> int:
    """An integer `--option key=value` (options arrive as strings), or `default` when absent."""
    value = (options or {}).get(key)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--option {key}={value!r}: expected an integer") from None
    if number < minimum:
        raise ValueError(f"--option {key}={number}: must be at least {minimum}")
    return number


def save_pngs(images: list, folder: Path, out: Path) -> list[str]:
    """Save `images` as folder/0000.png, 0001.png, ... (creating the folder); their paths relative to OUT."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, image in enumerate(images):
        path = folder / f"{k:04d}.png"
        image.save(path)
        paths.append(str(path.relative_to(out)))
    return paths


def load_json(path: Path, suite: str, expected: str | None = None) -> Any:
    """The content of a JSON file; bad JSON is a ValueError "<suite>: <path> is not valid JSON (...)", with
    "; expected <expected>" after it when given (`suite` is what the suite's messages start with)."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        hint = f"; expected {expected}" if expected else ""
        raise ValueError(f"{suite}: {path} is not valid JSON ({error}){hint}") from error


def prediction_notes(predictions: dict[str, dict], ids: Iterable[str] | dict, missing: int = 0,
                     what: str = "question id") -> list[str]:
    """Score notes on coverage: `missing` of the `ids` scored have no prediction (counted wrong), and how
    many predictions match none of the `ids` (ignored; `what` names an id in that note)."""
    notes = []
    if missing:
        notes.append(f"{missing} of {len(ids)} questions have no prediction; counted wrong")
    extra = len(set(predictions) - set(ids))
    if extra:
        notes.append(f"{extra} predictions do not match any {what} and were ignored")
    return notes


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


def jsonl_objects(path: Path, strings: tuple[str, ...], expected: str, empty: str,
                  keys: tuple[str, ...] = ()) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a JSONL file, as `jsonl_rows`, where every row must be an object whose
    `strings` fields are strings and that has the `keys`: else a ValueError "<where>: expected <expected>".
    A file without rows is a ValueError with the message `empty`."""
    found = False
    for where, row in jsonl_rows(path):
        valid = isinstance(row, dict) and all(isinstance(row.get(name), str) for name in strings)
        if not valid or not all(key in row for key in keys):
            raise ValueError(f"{where}: expected {expected}")
        found = True
        yield where, row
    if not found:
        raise ValueError(empty)


def first_dir_holding(candidates: list[Path], file_name: str) -> Path:
    """The first of `candidates` that holds `file_name` (else the first candidate): where a benchmark's
    images live, found from one of them."""
    for candidate in candidates:
        if (candidate / file_name).is_file():
            return candidate
    return candidates[0]


def coco_image_dir(base: Path, first_image: str) -> Path:
    """Where COCO images are (the folder holding `first_image`, else images/ under `base`): images/,
    val2014/ or the folder itself, in `base` or one level up."""
    here = [base / "images", base / "val2014", base]
    above = [base.parent / "images", base.parent / "val2014", base.parent]
    return first_dir_holding(here + above, first_image)


def _safe(item_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(item_id)) or "_"


__all__ = ["KINDS", "DrawSuite", "Item", "ScoreContext", "Suite", "coco_image_dir", "first_dir_holding",
           "int_option", "jsonl_objects", "jsonl_rows", "load_json", "prediction_notes", "read_jsonl_or_json",
           "save_pngs"]
