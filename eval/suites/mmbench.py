"""MMBench: multiple-choice perception and reasoning questions, with optional circular evaluation.

    mllm eval --suite mmbench --data /data/mmbench/mmbench_dev_20230712.tsv [--option circular=true]

Data: the official MMBench TSV (tab-separated, header row) with columns index, question, hint, A, B, C,
D (later options may be empty or "nan"), answer, category, l2-category, image (base64-encoded). --data
is the file, or a folder holding exactly one .tsv. In OpenCompass/VLMEvalKit TSVs an `image` cell of at
most 64 characters is the index of another row whose image it shares; that is resolved here.
Images are not decoded: `Item.image` is a "data:image/<type>;base64,..." URL the processor reads.
Prompt (LLaVA-1.5's MMBench format): [hint + "\\n"] + question + "\\nA. ..." for each option +
"\\nAnswer with the option's letter from the given choices directly.".

Score: the chosen letter is extracted from the answer by rules (eval.scoring.choice.extract_choice; no
ChatGPT fallback as in the official evaluator). `accuracy` is the headline: plain accuracy over the
rows, or, with `--option circular=true`, MMBench's circular accuracy: the TSV's shifted copies of a
question (index + k * 1,000,000) are grouped by index % 1,000,000 and the question counts only if every
copy is right. The suite does not create shifted copies itself: use a TSV that contains them (the dev
TSVs released for circular evaluation do), otherwise circular equals plain accuracy (a note says so).
"""

from __future__ import annotations

import csv
import math
import string
import sys
from pathlib import Path
from typing import Any

from eval.suites.base import Item, ScoreContext, Suite, parse_flag, prediction_notes

INSTRUCTION = "Answer with the option's letter from the given choices directly."
_REQUIRED = ("index", "question", "image", "A", "B")
_MIME = (("/9j/", "image/jpeg"), ("iVBOR", "image/png"), ("R0lGOD", "image/gif"), ("UklGR", "image/webp"),
         ("Qk", "image/bmp"))


def is_missing(value: Any) -> bool:
    """LLaVA's is_none: None, NaN, "" and the strings "nan" / "none" (any case) are missing values."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def build_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """LLaVA-1.5's MMBench prompt: hint, question, lettered options, then the instruction."""
    text = question if is_missing(hint) else f"{hint}\n{question}"
    for letter, option in options.items():
        text += f"\n{letter}. {option}"
    return f"{text}\n{INSTRUCTION}"


def image_data_url(b64: str) -> str:
    """A base64 image -> a data URL whose media type follows the payload's magic bytes (PNG if unknown)."""
    payload = "".join(b64.split())
    mime = next((kind for prefix, kind in _MIME if payload.startswith(prefix)), "image/png")
    return f"data:{mime};base64,{payload}"


def _find_tsv(data: str | None) -> Path:
    if not data:
        raise ValueError("mmbench needs --data: the MMBench TSV (e.g. mmbench_dev_20230712.tsv) or its folder")
    path = Path(data).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"mmbench: {path} does not exist; pass the MMBench TSV as --data")
    found = sorted(path.glob("*.tsv"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"mmbench: no .tsv file in {path}; download the MMBench TSV and pass it as --data")
    raise ValueError(f"mmbench: several .tsv files in {path} ({', '.join(p.name for p in found)}); pass the one "
                     "to evaluate as --data")


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    limit = sys.maxsize
    while True:  # base64 images exceed csv's default 128 KiB field limit
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:
            limit //= 2
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    return columns, rows


class MMBenchSuite(Suite):
    """MMBench (any language/split in the official TSV format); primary metric: accuracy (%)."""

    primary_metric = "accuracy"
    option_names = ("circular",)
    data_help = "the MMBench TSV (or DIR holding one .tsv), e.g. mmbench_dev_20230712.tsv; images inside it (base64)"

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        path = _find_tsv(data)
        columns, rows = _read_rows(path)
        missing = [column for column in _REQUIRED if column not in columns]
        if missing:
            raise ValueError(f"mmbench: {path} lacks the column(s) {missing} (found {columns}); expected the "
                             "official MMBench TSV: index, question, hint, A, B, C, D, answer, category, image")
        letters = [letter for letter in string.ascii_uppercase if letter in columns]
        images = {row["index"].strip(): row["image"] for row in rows}
        if limit is not None:
            rows = rows[: max(0, limit)]
        items = []
        seen: set[str] = set()
        for row in rows:
            index = row["index"].strip()
            if index in seen:
                raise ValueError(f"mmbench: index {index!r} appears twice in {path}; indices must be unique")
            seen.add(index)
            options: dict[str, str] = {}
            for letter in letters:  # like LLaVA: the options stop at the first missing one
                if is_missing(row.get(letter)):
                    break
                options[letter] = row[letter].strip()
            image = (row.get("image") or "").strip()
            if len(image) <= 64:  # a reference to the row whose image this one shares
                referenced = (images.get(image) or "").strip()
                if len(referenced) <= 64:
                    raise ValueError(f"mmbench: row {index} of {path} has no base64 image (image={image!r}); "
                                     "the TSV looks truncated or is not MMBench's format")
                image = referenced
            hint = None if is_missing(row.get("hint")) else row["hint"]
            answer = None if is_missing(row.get("answer")) else row["answer"].strip().upper()
            items.append(Item(
                id=index,
                prompt=build_prompt(row["question"], options, hint),
                image=image_data_url(image),
                meta={"index": index, "answer": answer, "options": options,
                      "category": None if is_missing(row.get("category")) else row["category"],
                      "l2-category": None if is_missing(row.get("l2-category")) else row["l2-category"]},
            ))
        return items

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        from eval.scoring.choice import (
            CIRCULAR_MODULUS,
            circular_accuracy,
            circular_group,
            extract_choice,
            plain_accuracy,
        )

        circular = parse_flag(context.options.get("circular", False), "circular")
        if items and all(item.meta.get("answer") is None for item in items):
            raise ValueError("mmbench: these rows have no 'answer' (the test split hides them); score the dev "
                             "split, or submit the predictions to the MMBench evaluation server")
        notes = [(
            "letters extracted by rules (eval.scoring.choice.extract_choice); unlike the official "
            "evaluator there is no ChatGPT fallback, so an unparseable answer is wrong"
        )]
        correct: dict[str, bool] = {}
        unparsed = missing = 0
        for item in items:
            record = predictions.get(item.id)
            if record is None or record.get("answer") is None:
                missing += 1
                choice = None
            else:
                choice = extract_choice(record["answer"], item.meta["options"])
                unparsed += choice is None
            correct[item.id] = choice is not None and choice == item.meta.get("answer")
        # `correct` has an entry per item: load_items rejects a repeated index
        notes += prediction_notes(predictions, correct, missing, what="question index")
        plain = plain_accuracy(correct.values())
        metrics: dict[str, float] = {
            "accuracy": plain,
            "plain_accuracy": plain,
            "unparsed": 100.0 * unparsed / len(items) if items else 0.0,
        }
        has_copies = any(item.id.isdigit() and int(item.id) >= CIRCULAR_MODULUS for item in items)

        # the units a breakdown counts: rows, or (circular) questions = groups of copies
        if circular:
            result = circular_accuracy(correct)
            metrics["accuracy"] = metrics["circular_accuracy"] = result["accuracy"]
            units = {}
            for item in items:  # category of a question: that of its first copy
                units.setdefault(circular_group(item.id), item)
            outcome = {group: result["per_question"][group] for group in units}
            notes.append(f"circular evaluation: {result['questions']} questions from {len(items)} rows; a "
                         "question counts only if all its copies (grouped by index % 1,000,000) are right")
            if not has_copies:
                notes.append("the TSV has no shifted copies (no index >= 1,000,000), so circular accuracy "
                             "equals plain accuracy; use a TSV with the circular copies")
            count = result["questions"]
        else:
            units = {item.id: item for item in items}
            outcome = correct
            if has_copies:
                notes.append("the TSV holds circular copies (index >= 1,000,000) and each row counts as a "
                              "question; pass --option circular=true for MMBench's circular accuracy")
            count = len(items)
        breakdown: dict[str, dict[str, dict[str, float]]] = {}
        for field in ("category", "l2-category"):
            tallies: dict[str, list[int]] = {}
            for key, item in units.items():
                value = item.meta.get(field)
                if value is None:
                    continue
                tally = tallies.setdefault(str(value), [0, 0])
                tally[0] += bool(outcome[key])
                tally[1] += 1
            if tallies:
                breakdown[field] = {value: {"accuracy": 100.0 * right / total, "count": total}
                                    for value, (right, total) in sorted(tallies.items())}
        return {"metrics": metrics, "breakdown": breakdown, "count": count, "notes": notes}


SUITES = {"mmbench": MMBenchSuite}
