"""The suite interface of `mllm eval` / `mllm eval-score`: a suite = reader + prompt template + scorer.

A suite module in `eval/suites/` exposes `SUITES = {"name": factory, ...}` (a factory takes no argument
and returns a `Suite`); the registry (`eval.suites.get_suite`) finds it by name, so adding a benchmark
means adding one module. Modules import heavy dependencies inside functions only.

Kinds:
    "answer"  image + prompt -> text. The runner sends [{"role": "user", "content": [image, prompt]}]
              (greedy, `max_new_tokens`) and records {"id", "answer"}. An item whose `image` is a list
              sends every image of it, in order, before the prompt in that one user turn.
    "draw"    prompt -> `images_per_prompt` images (seeds 0..n-1). The runner saves them with
              `save_images` and records {"id", "images": [paths relative to OUT]}.
    "edit"    image + instruction (the prompt) -> `images_per_prompt` edited images (seeds 0..n-1), through
              `MLLM.edit` with the suite's `guidance` and `guidance_scale` (`EditSuite`). Saved and recorded
              as for "draw", the record with the "instruction" too.
    "custom"  the suite does everything in `run` (e.g. the tokenizer metrics); no predictions file.

Predictions are JSONL, one object per item id; `score` gets them keyed by id, with the items, and
returns {"metrics": {name: value}, "breakdown": {group: {value: {metric: value}}}, "count": n,
"notes": [str]}: percentages in [0, 100] where a metric is a rate.

Images: an answer suite's `load_items` resolves every image name to a path (`ImageDir`: `.jpg`, `.jpeg`
and `.png` under the same stem all match) or to a `MissingImage`, opening none; `mllm eval` then lists the
missing ones (`missing_images`) before the model loads. A suite says what --data holds in `data_help`
(one line of `mllm eval --help`) and which file names it looks for in `image_names`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizer_vision.schema import check_keys, unknown_name

KINDS = ("answer", "draw", "edit", "custom")


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
    data_help: str = ""  # what --data holds, in one line of `mllm eval --help` (docs/evaluation.md: in full)
    image_names: str = ""  # the image file names the suite looks for, quoted when some are missing

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

    def use_model(self, model_dir: str | Path) -> None:
        """`mllm eval` calls this with --model before items are read: a suite that renders its own images
        reads the model's image size here (`model_image_size`). Scoring never calls it."""


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


class EditSuite(Suite):
    """An edit suite: `images_per_prompt` edits per item (seeds 0..n-1, `--option seeds=N`), with classifier-free
    guidance set by `--option guidance=instruction|both` (what the unconditional branch drops) and
    `--option guidance_scale=S` (1: none), `--option image_guidance_scale=S` (both guidances at once, each with
    its own scale; unset: off), and the codes' `--option temperature=T` (0: greedy); defaults those
    of `MLLM.edit`. A subclass gives its own defaults
    as class attributes and may read more options (extend `option_names`, call `super().configure`)."""

    kind = "edit"
    option_names = ("seeds", "guidance", "guidance_scale", "image_guidance_scale", "temperature")
    images_per_prompt = 1

    def __init__(self) -> None:
        from mllm.config import EDIT_GUIDANCE, EDIT_TEMPERATURE

        self.guidance: str = EDIT_GUIDANCE
        self.guidance_scale: float | None = None  # None: the model's own (`config.edit_guidance_scale`)
        self.image_guidance_scale: float | None = None
        self.temperature: float = EDIT_TEMPERATURE

    def configure(self, options: dict[str, Any] | None) -> None:
        from mllm.config import EDIT_GUIDANCE_MODES

        options = options or {}
        self.images_per_prompt = int_option(options, "seeds", self.images_per_prompt)
        guidance = str(options.get("guidance") or self.guidance).strip()
        if guidance not in EDIT_GUIDANCE_MODES:
            raise unknown_name("--option guidance value", guidance, EDIT_GUIDANCE_MODES)
        self.guidance = guidance
        self.guidance_scale = _number_option(options, "guidance_scale", self.guidance_scale, lambda v: v > 0,
                                             "must be positive (1: no guidance)")
        self.image_guidance_scale = _number_option(options, "image_guidance_scale", self.image_guidance_scale,
                                                   lambda v: v > 0, "must be positive")
        self.temperature = _number_option(options, "temperature", self.temperature, lambda v: v >= 0,
                                          "must be 0 (greedy) or more")


def _number_option(options: dict[str, Any], name: str, default: float, valid, rule: str) -> float:
    """`--option NAME=V` as a number (default when absent or empty); an invalid one raises with `rule`."""
    text = options.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"--option {name}={text!r}: expected a number") from None
    if not valid(value):
        raise ValueError(f"--option {name}={text}: {rule}")
    return value


def model_image_size(model_dir: str | Path | None) -> int | None:
    """The image side of a model folder (`mllm_config.json`'s image_size), read without loading the model;
    None when `model_dir` is not a model folder (loading it reports that properly later)."""
    if model_dir is None:
        return None
    from mllm.config import MLLMConfig

    try:
        return int(MLLMConfig.load(model_dir).image_size)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def model_edit_guidance_scale(model_dir: str | Path | None) -> float | None:
    """The guidance scale a model folder's edits use by default (`mllm_config.json`'s edit_guidance_scale), read
    without loading the model; None when `model_dir` is not a model folder."""
    if model_dir is None:
        return None
    from mllm.config import MLLMConfig

    try:
        return float(MLLMConfig.load(model_dir).edit_guidance_scale)
    except (OSError, ValueError, TypeError, KeyError):
        return None


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


def parse_flag(value: Any, name: str) -> bool:
    """A boolean option's value (a string from `--option name=value`, or a bool) -> bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"--option {name}={value!r} is not a boolean; use {name}=true or {name}=false")


def bool_option(options: dict[str, Any] | None, key: str, default: bool = False) -> bool:
    """A boolean `--option key=value` (true/false, 1/0, yes/no, on/off), or `default` when absent."""
    value = (options or {}).get(key)
    return default if value is None else parse_flag(value, key)


NORMALIZE_OPTION = "normalize"
NORMALIZE_MODES = ("official", "lmms-eval")  # answer normalisation of the VQA-style suites


def normalize_option(options: dict[str, Any] | None) -> str:
    """`--option normalize=official|lmms-eval` (default official): how predicted answers are normalised
    before they are compared (the suites that read it document the two rules)."""
    value = str((options or {}).get(NORMALIZE_OPTION) or "official").strip()
    if value not in NORMALIZE_MODES:
        raise unknown_name(f"--option {NORMALIZE_OPTION} value", value, NORMALIZE_MODES)
    return value


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
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a text file ({error.reason}); expected JSONL or a JSON list") from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(stripped)
        else:
            records = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{number}: not JSON ({error.msg}); expected one object per "
                                         "line") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno}); expected a JSON list of "
                         "objects or JSONL") from None
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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # an image named x.jpg in a benchmark's files may be x.png on disk


def image_name_variants(name: str) -> list[str]:
    """`name` first, then the same stem with every other accepted suffix (lower and upper case): a benchmark
    names its images `.jpg`, a converted copy of it may hold `.png` files (or `.JPG`)."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or f".{suffix.lower()}" not in IMAGE_SUFFIXES:
        return [name]
    variants = [name]
    for other in IMAGE_SUFFIXES:
        for candidate in (stem + other, stem + other.upper()):
            if candidate not in variants:
                variants.append(candidate)
    return variants


class MissingImage(os.PathLike):
    """An item's image that is not under --data. Scoring never opens images, so this is harmless there;
    `mllm eval` lists every missing image before the model loads (`missing_images`), and a model that opens
    one anyway (through `os.fspath`) gets a FileNotFoundError saying what was looked for where."""

    def __init__(self, names: list[str], root: Path):
        self.names = list(names)
        self.root = Path(root)

    def message(self) -> str:
        return (f"image {' / '.join(self.names)} not found under {self.root} (as .jpg, .jpeg or .png); put "
                "the benchmark's images there (or pass the folder that holds both the annotations and the "
                "images as --data)")

    def __fspath__(self) -> str:
        raise FileNotFoundError(self.message())

    def __repr__(self) -> str:
        return f"MissingImage({self.names[0]!r} under {str(self.root)!r})"


class ImageDir:
    """One folder of a benchmark's images, listed once: `find(name)` is the path of `name` or of a variant
    of it (`image_name_variants`: .jpg, .jpeg or .png), else a `MissingImage`. Names may hold a subfolder
    ("train2014/x.jpg"); those are looked up on disk."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._names: set[str] | None = None

    def _listing(self) -> set[str]:
        if self._names is None:
            self._names = set(os.listdir(self.folder)) if self.folder.is_dir() else set()
        return self._names

    def has(self, name: str) -> bool:
        return self._path(name) is not None

    def _path(self, name: str) -> str | None:
        for variant in image_name_variants(name):
            if "/" in variant or os.sep in variant:
                if (self.folder / variant).is_file():
                    return str(self.folder / variant)
            elif variant in self._listing():
                return str(self.folder / variant)
        return None

    def find(self, name: str) -> str | MissingImage:
        return self._path(name) or MissingImage([name], self.folder)


def first_dir_holding(candidates: list[Path], file_name: str) -> Path:
    """The first of `candidates` that holds `file_name` (or a .jpg / .jpeg / .png variant of it; else the
    first candidate): where a benchmark's images live, found from one of them."""
    for candidate in candidates:
        if ImageDir(candidate).has(file_name):
            return candidate
    return candidates[0]


def coco_image_dir(base: Path, first_image: str) -> Path:
    """Where COCO images are (the folder holding `first_image`, else images/ under `base`): images/,
    val2014/ or the folder itself, in `base` or one level up."""
    here = [base / "images", base / "val2014", base]
    above = [base.parent / "images", base.parent / "val2014", base.parent]
    return first_dir_holding(here + above, first_image)


def missing_images(items: list[Item]) -> tuple[int, list[MissingImage | Path]]:
    """(distinct images the items name, the missing ones in item order): an image is missing when it is a
    `MissingImage` or a local path (str / Path) that is not a file. PIL images, data URLs and remote
    URLs are never missing here."""
    seen: set[str] = set()
    missing: list[MissingImage | Path] = []
    for item in items:
        image = item.image
        if isinstance(image, MissingImage):
            key = str(image.root / image.names[0])
        elif isinstance(image, (str, Path)) and not str(image).startswith("data:") and "://" not in str(image):
            key = str(image)
        else:
            continue
        if key in seen:
            continue
        seen.add(key)
        if isinstance(image, MissingImage):
            missing.append(image)
        elif not Path(image).is_file():
            missing.append(Path(image))
    return len(seen), missing


def _safe(item_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(item_id)) or "_"


__all__ = [
    "IMAGE_SUFFIXES",
    "KINDS",
    "NORMALIZE_MODES",
    "NORMALIZE_OPTION",
    "DrawSuite",
    "EditSuite",
    "ImageDir",
    "Item",
    "MissingImage",
    "ScoreContext",
    "Suite",
    "coco_image_dir",
    "first_dir_holding",
    "image_name_variants",
    "int_option",
    "jsonl_objects",
    "jsonl_rows",
    "load_json",
    "missing_images",
    "model_image_size",
    "normalize_option",
    "prediction_notes",
    "read_jsonl_or_json",
    "save_pngs",
]
