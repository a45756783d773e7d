"""Multiple-choice scoring: the chosen letter from a free-form answer, plain and circular accuracy.

    extract_choice("The answer is (B).", {"A": "red", "B": "blue"})  -> "B"
    extract_choice("blue", {"A": "red", "B": "blue"})                -> "B"
    circular_accuracy({"7": True, "1000007": False, "8": True})      -> {"accuracy": 50.0, ...}

Letter extraction is rule-based (no LLM judge, unlike MMBench's official evaluator, which falls back to
ChatGPT matching when its rules fail), tried in this order; the first rule that names exactly one of
the offered letters wins:

    1. the answer starts with a letter: "B", "(B)", "[B]", "B.", "B)", "B:", "B. blue", "B blue"
       (an initial "A" followed by a lowercase word is read as the article, "A cat ...", unless the
       rest is option A's text);
    2. a cue phrase: "the answer is B", "Answer: (B)", "option B", "correct choice is b";
    3. the answer is one option's text (case, surrounding spaces/quotes and a final period ignored);
    4. exactly one offered letter stands alone in the answer ("I think C is right");
    5. exactly one option's text occurs in the answer as a whole phrase ("It looks blue to me").

Anything else (no letter, several letters, an option letter that was not offered) is None: wrong.

Circular evaluation (MMBench): a question is asked once per circular shift of its options; the copies
share `index % 1_000_000` (the original has index < 1e6, its shifts index + k * 1e6), and a question
counts as correct only if every copy was answered correctly.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CIRCULAR_MODULUS = 1_000_000

_LEADING = re.compile(r"^\s*([(\[])?\s*([A-Za-z])\s*([)\].:])?(?=$|[\s.,:;)\]])(.*)$", re.DOTALL)
_CUE = re.compile(
    r"(?i:\b(?:answer|option|choice)\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?\s*(?:[:=-]\s*)?"
    r"(?:option\s+|choice\s+)?)[(\[]?([A-Za-z])[)\]]?(?=$|[\s.,:;!?)\]])"
)
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
# "A cat": the article, not option A; "A is right", "A or B": the letter.
_ARTICLE_FOLLOWS = re.compile(
    r"\s+(?!(?:and|or|nor|is|was|seems|looks|should|would|could|might|must|will|can|because|since|as|"
    r"then|but|if|only|also|too|both)\b)[a-z]"
)


def _normalize_text(text: str) -> str:
    text = " ".join(str(text).split()).strip().strip("\"'`").strip()
    return text.rstrip(".").strip().lower()


def _as_options(options: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    if isinstance(options, Mapping):
        return {str(letter).strip().upper(): str(text) for letter, text in options.items()}
    return {string.ascii_uppercase[k]: str(text) for k, text in enumerate(options)}


def _standalone_letters(text: str, letters: set[str]) -> set[str]:
    found = set()
    for match in _STANDALONE.finditer(text):
        letter = match.group(1)
        if letter in letters and not (letter == "A" and _ARTICLE_FOLLOWS.match(text, match.end())):
            found.add(letter)
    return found


def extract_choice(answer: str | None, options: Mapping[str, str] | Sequence[str]) -> str | None:
    """The option letter a free-form answer picks, or None when it picks none or several.

    options: {letter: option text} (e.g. {"A": "red", "B": "blue"}) or the option texts in order (lettered
    A, B, C, ...). Only offered letters count: "E" with options A-D is None.
    """
    if answer is None:
        return None
    opts = _as_options(options)
    letters = set(opts)
    text = str(answer).strip()
    if not text or not letters:
        return None

    # 1. a leading letter: "B", "(B)", "B.", "B. blue", "B blue"; not "A cat", not "A, B"
    match = _LEADING.match(text)
    if match and match.group(2).upper() in letters:
        opening, letter, closing, rest = match.groups()
        upper = letter.upper()
        rest_is_option = _normalize_text(rest.strip().lstrip(".:)]")) == _normalize_text(opts[upper])
        decorated = bool(opening or closing) or not rest.strip()
        article = upper == "A" and bool(_ARTICLE_FOLLOWS.match(rest))
        others = _standalone_letters(rest, letters) - {upper}
        if rest_is_option or (not others and (decorated or (letter.isupper() and not article))):
            return upper

    # 2. a cue phrase: "the answer is B", "Answer: (B)", "option B"
    found = set()
    for cue in _CUE.finditer(text):
        letter = cue.group(1)
        if letter in "Aa" and _ARTICLE_FOLLOWS.match(text, cue.end()):
            continue
        found.add(letter.upper())
    found &= letters
    if len(found) == 1:
        return found.pop()

    # 3. the text of exactly one option
    normalized = _normalize_text(text)
    exact = [letter for letter, option in opts.items() if _normalize_text(option) == normalized]
    if len(exact) == 1:
        return exact[0]

    # 4. exactly one offered letter standing alone
    standalone = _standalone_letters(text, letters)
    if len(standalone) == 1:
        return standalone.pop()

    # 5. exactly one option text inside the answer, as a whole phrase
    contained = []
    for letter, option in opts.items():
        phrase = _normalize_text(option)
        if phrase and re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", normalized):
            contained.append(letter)
    if len(contained) == 1:
        return contained[0]
    return None


def circular_group(index: int | str) -> int:
    """MMBench's question id of a (possibly shifted) copy: int(index) % 1_000_000."""
    try:
        return int(str(index).strip()) % CIRCULAR_MODULUS
    except ValueError as error:
        raise ValueError(f"circular evaluation needs integer MMBench indices, got {index!r}: "
                         "use the official TSV's `index` column as the item id") from error


def plain_accuracy(correct: Iterable[bool]) -> float:
    """The percentage of True in `correct` (0.0 for none)."""
    values = [bool(value) for value in correct]
    return 100.0 * sum(values) / len(values) if values else 0.0


def circular_accuracy(correct: Mapping[int | str, bool]) -> dict[str, Any]:
    """Circular accuracy over {MMBench index: answered correctly}.

    Copies are grouped by `index % 1_000_000`; a group is correct only if all its copies are. Returns
    {"accuracy": percent of groups correct, "questions": number of groups, "copies": {group: count},
    "per_question": {group: bool}}.
    """
    groups: dict[int, list[bool]] = {}
    for index, ok in correct.items():
        groups.setdefault(circular_group(index), []).append(bool(ok))
    per_question = {group: all(values) for group, values in groups.items()}
    return {
        "accuracy": plain_accuracy(per_question.values()),
        "questions": len(per_question),
        "copies": {group: len(values) for group, values in groups.items()},
        "per_question": per_question,
    }


def circular_shifts(options: Sequence[str], answer: str | None = None) -> list[tuple[list[str], str | None]]:
    """The circular shifts of an option list, with the correct letter of each (MMBench's rotation:
    shift k moves the first k options to the end). `answer` is the letter in the original order."""
    opts = list(options)
    position = string.ascii_uppercase.index(answer.upper()) if answer else None
    out = []
    for k in range(len(opts)):
        shifted = opts[k:] + opts[:k]
        letter = None if position is None else string.ascii_uppercase[(position - k) % len(opts)]
        out.append((shifted, letter))
    return out


__all__ = ["CIRCULAR_MODULUS", "circular_accuracy", "circular_group", "circular_shifts", "extract_choice",
           "plain_accuracy"]
