"""POPE (object hallucination) scoring: yes/no parsing as in LLaVA's eval_pope.py, and its metrics.

    parse_yes_no("No, there is no dog.")  -> "no"
    pope_metrics(["yes", "no"], ["yes", "yes"])
    -> {"accuracy": 50.0, "precision": 100.0, "recall": 50.0, "f1": 66.7, "yes_ratio": 50.0, ...}

Parsing (LLaVA, llava/eval/eval_pope.py): keep the text before the first period, drop commas, split
into words; the answer is "no" if a word is "no" or "not", else "yes" (anything that does not deny is a
yes). Differences from LLaVA's code, all on its corner cases: words are compared lowercased (LLaVA
matches "No", "no" and "not" exactly, so "NO" or "Not" count as yes there) and split on any whitespace
(LLaVA splits on single spaces, so "no\\n" is a yes there).

Metrics (positive class = "yes"), all percentages: accuracy, precision = TP / (TP + FP),
recall = TP / (TP + FN), F1, yes_ratio = share of "yes" predictions. Where a denominator is 0 the
metric is 0 (LLaVA's script raises ZeroDivisionError there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_NEGATIONS = frozenset({"no", "not"})


def parse_yes_no(text: str | None) -> str:
    """A free-form answer -> "yes" or "no", by LLaVA's rule (see the module docstring)."""
    text = "" if text is None else str(text)
    first = text.split(".", 1)[0].replace(",", "")
    return "no" if any(word.lower() in _NEGATIONS for word in first.split()) else "yes"


def _label(value: str) -> str:
    label = str(value).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {value!r}: check the annotation file's "
                         "'label' field")
    return label


def pope_metrics(predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Metrics of parsed predictions ("yes"/"no") against labels ("yes"/"no"), in the same order.

    Returns {"accuracy", "precision", "recall", "f1", "yes_ratio"} as percentages, plus the counts
    "tp", "fp", "tn", "fn" and "count".
    """
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions for {len(labels)} labels: they must pair up")
    tp = fp = tn = fn = 0
    for pred, gold in zip(predicted, labels):
        pred, gold = _label(pred), _label(gold)
        if pred == "yes":
            tp, fp = (tp + 1, fp) if gold == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if gold == "no" else (tn, fn + 1)
    count = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / count if count else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / count if count else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "count": count,
    }


def pope_scores(predictions: Mapping[str, str | None], labels: Mapping[str, str],
                categories: Mapping[str, str] | None = None) -> dict[str, Any]:
    """POPE over {id: answer text} and {id: "yes"/"no"}, overall and per category.

    The ids scored are those of `labels`. A missing prediction (absent or None) counts as wrong: it is
    scored as the opposite of its label. Returns {"metrics": pope_metrics of all ids (plus
    "f1_category_mean", the mean of the per-category F1s, when there are several categories: the figure
    LLaVA-1.5-style tables report as "POPE"), "breakdown": {"category": {name: pope_metrics}},
    "missing": number of missing predictions}.
    """
    ids = list(labels)
    gold = {key: _label(labels[key]) for key in ids}
    parsed: dict[str, str] = {}
    missing = 0
    for key in ids:
        answer = predictions.get(key)
        if answer is None:
            missing += 1
            parsed[key] = "no" if gold[key] == "yes" else "yes"
        else:
            parsed[key] = parse_yes_no(answer)
    metrics = pope_metrics([parsed[key] for key in ids], [gold[key] for key in ids])
    breakdown: dict[str, dict[str, dict[str, Any]]] = {}
    if categories:
        by_category: dict[str, list[str]] = {}
        for key in ids:
            by_category.setdefault(str(categories.get(key, "")), []).append(key)
        breakdown["category"] = {
            name: pope_metrics([parsed[key] for key in keys], [gold[key] for key in keys])
            for name, keys in sorted(by_category.items())
        }
        if len(by_category) > 1:
            f1s = [values["f1"] for values in breakdown["category"].values()]
            metrics["f1_category_mean"] = sum(f1s) / len(f1s)
    return {"metrics": metrics, "breakdown": breakdown, "missing": missing}


__all__ = ["parse_yes_no", "pope_metrics", "pope_scores"]
