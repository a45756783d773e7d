"""GQA scoring: exact match after light normalisation, with per-type breakdowns.

    normalize_answer(" Yes.")  -> "yes"
    gqa_scores({"q1": "Left."}, {"q1": "left"}, {"q1": {"structural": "choose", "semantic": "rel"}})
    -> {"accuracy": 100.0, "count": 1, "breakdown": {"structural": {"choose": {...}}, ...}, ...}

The official GQA evaluator (eval.py of the GQA release) scores accuracy as `prediction == answer`;
LLaVA (scripts/convert_gqa_for_eval.py) prepares predictions with `text.rstrip('.').lower()`. This
module does the same to both prediction and answer, and also strips surrounding whitespace (LLaVA's
answers are already stripped when they are generated). The official script's other metrics
(consistency, validity, plausibility, grounding, distribution) need the scene graphs and choices
files and are not computed.

lmms-eval's `gqa` task instead scores `exact_match` with `ignore_case` and `ignore_punctuation`: both
strings lower-cased and every `string.punctuation` character deleted, surrounding whitespace kept
(`lmms_eval_normalize`: "T-shirt!" -> "tshirt"), which `gqa_scores(..., normalizer=lmms_eval_normalize)`
reproduces.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from typing import Any

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str | None) -> str:
    """Lowercase, strip surrounding whitespace and drop trailing periods: " Yes." -> "yes"."""
    return "" if text is None else str(text).strip().rstrip(".").strip().lower()


def lmms_eval_normalize(text: str | None) -> str:
    """lmms-eval's exact_match(ignore_case, ignore_punctuation): lower-case, delete string.punctuation."""
    return "" if text is None else str(text).lower().translate(_PUNCTUATION)


def gqa_scores(predictions: Mapping[str, str | None], answers: Mapping[str, str],
               types: Mapping[str, Mapping[str, str]] | None = None,
               groups: tuple[str, ...] = ("structural", "semantic"),
               normalizer: Callable[[str | None], str] = normalize_answer) -> dict[str, Any]:
    """Exact-match accuracy of {id: prediction} against {id: answer}, over the ids of `answers`.

    A missing prediction (absent or None) is wrong. `normalizer` is applied to both strings before they
    are compared (`normalize_answer`, or lmms-eval's `lmms_eval_normalize`). `types` maps an id to its GQA `types` dict
    ({"structural": "query", "semantic": "attr", "detailed": ...}); each name in `groups` present there
    gets a breakdown {group: {type: {"accuracy": percent, "count": n}}}.
    Returns {"accuracy": percent, "count": n, "missing": n, "breakdown": {...}, "correct": {id: bool}}.
    """
    correct: dict[str, bool] = {}
    missing = 0
    for key, answer in answers.items():
        prediction = predictions.get(key)
        if prediction is None:
            missing += 1
            correct[key] = False
        else:
            correct[key] = normalizer(prediction) == normalizer(answer)
    breakdown: dict[str, dict[str, dict[str, float]]] = {}
    if types:
        for group in groups:
            tallies: dict[str, list[int]] = {}
            for key, ok in correct.items():
                value = (types.get(key) or {}).get(group)
                if value is None:
                    continue
                tally = tallies.setdefault(str(value), [0, 0])
                tally[0] += ok
                tally[1] += 1
            if tallies:
                breakdown[group] = {value: {"accuracy": 100.0 * right / count, "count": count}
                                    for value, (right, count) in sorted(tallies.items())}
    count = len(correct)
    return {
        "accuracy": 100.0 * sum(correct.values()) / count if count else 0.0,
        "count": count,
        "missing": missing,
        "breakdown": breakdown,
        "correct": correct,
    }


__all__ = ["gqa_scores", "lmms_eval_normalize", "normalize_answer"]
