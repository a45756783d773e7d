"""VQA accuracy, ported from the official VQA evaluation (GT-Vision-Lab/VQA, `vqaEval.py`, master).

This is our own code, but it follows the official evaluation step by step (the `VQAEval` class of
https://github.com/GT-Vision-Lab/VQA/blob/master/PythonEvaluationTools/vqaEvaluation/vqaEval.py) and copies
its tables (`contractions`, `manualMap`, `articles`, `punct`, `periodStrip`, `commaStrip`) entry for entry,
so the numbers are the ones the official script prints (its `accuracy['overall']` is
`round(100 * mean per-question accuracy, 2)`; we keep full precision and report the rounded figures too).

Per question (`VQAEval.evaluate`):
    1. every answer, ground truth and prediction: '\\n' and '\\t' -> ' ', then `.strip()`;
    2. ONLY when the ground-truth answers are not all identical (`len(set(gtAnswers)) > 1`), the ground-truth
       answers and the prediction go through `processPunctuation` then `processDigitArticle`. When all
       annotators gave the same string nothing is normalised: "Yes" or "yes." against ten "yes" scores 0
       (the authors' reason: not to touch OCR-style answers that everyone typed alike);
    3. accuracy = mean over the N ground-truth answers of `min(1, matches among the OTHER N-1 / 3)`, the
       annotator left out being taken by position (the official code compares answer dicts, whose
       `answer_id` differs), so 3 matches out of 10 give (7 * 1 + 3 * 2/3) / 10 = 0.9.

Overall and per answer type / question type: the mean of the per-question accuracies, times 100.

lmms-eval (EvolvingLMMs-Lab/lmms-eval, `tasks/vqav2/utils.py`, `tasks/textvqa/utils.py`,
`tasks/vizwiz_vqa/utils.py`, `tasks/_task_utils/vqa_eval_metric.py`) scores the same accuracy but
normalises EVERY answer, whether or not the annotators agree, so its figures are higher for a model that
answers "Yes" or "cat." (against ten "yes" / "cat": official 0, lmms-eval 100). Its rules, given here as
`normalizer`s of `vqa_accuracy` / `score_vqa` (the tables above are the same entry for entry):
    VQAv2            `lmms_eval_vqav2`: '\n' / '\t' -> ' ', strip, processPunctuation, processDigitArticle;
    TextVQA, VizWiz  `lmms_eval_answer_processor` (its EvalAIAnswerProcessor): first lower-case, delete ","
                     and "?", "'s" -> " 's", strip; then as for VQAv2.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

# ---------------------------------------------------------------------------------------- official tables
# Copied entry for entry from the official vqaEval.py (including its oddities: capitalised keys such as
# "Im" can never match because processDigitArticle lower-cases first, and "somebody'd" maps to "somebodyd").
# fmt: off
contractions = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
manualMap = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
articles = ["a", "an", "the"]
# The official pattern, typo included: "(?!<=\d)" is a negative LOOKAHEAD for the text "<=digit" (a look-behind
# was meant), so in effect a period is dropped whenever no digit follows it ("3." -> "3", "2.5" stays).
periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
commaStrip = re.compile(r"(\d)(\,)(\d)")
punct = [
    ";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
]
# fmt: on


# ---------------------------------------------------------------------------------------- normalisation
def process_punctuation(text: str) -> str:
    """The official `processPunctuation`.

    For each mark of `punct`: when the ORIGINAL text has it next to a space ("a, b") or contains a digit
    comma ("1,000"), every occurrence is deleted, otherwise each becomes a space ("red/white" -> "red white").
    Then periods not followed by a digit are deleted, at most 32 of them (see below).
    """
    out = text
    for mark in punct:
        if (mark + " " in text or " " + mark in text) or commaStrip.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The official code calls `periodStrip.sub("", outText, re.UNICODE)`: the flag lands in the third
    # positional parameter of Pattern.sub, which is `count`, so at most int(re.UNICODE) == 32 periods are
    # removed. Reproduced on purpose (as a keyword, to say so and to avoid Python 3.13's warning about a
    # positional count) so that the rare answer with more periods scores as it does officially.
    return periodStrip.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, split on whitespace, number words none/zero..ten ->
    digits, drop the articles a/an/the, expand `contractions` ("dont" -> "don't"), join with single spaces."""
    words = [manualMap.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in articles]
    return " ".join(contractions.get(word, word) for word in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def lmms_eval_vqav2(text: str) -> str:
    """lmms-eval's VQAv2 normalisation (`vqav2_process_results`), applied to every answer and prediction."""
    return process_digit_article(process_punctuation(_clean(text)))


def lmms_eval_answer_processor(text: str) -> str:
    """lmms-eval's `EvalAIAnswerProcessor()(text)` (TextVQA, VizWiz): its `word_tokenize` (lower-case, delete
    "," and "?", "'s" -> " 's", strip), then as `lmms_eval_vqav2`."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return process_digit_article(process_punctuation(_clean(text)))


# ---------------------------------------------------------------------------------------- accuracy
def vqa_accuracy(prediction: str, answers: list[str], normalizer: Callable[[str], str] | None = None) -> float:
    """The official accuracy (0..1) of one predicted answer against the annotators' answers.

    `answers` are the ground-truth strings in annotator order (10 for VQAv2, TextVQA and VizWiz).
    `normalizer`: None for the official rule (normalise only when the annotators disagree), or a function
    applied to every answer and to the prediction first (lmms-eval's rules: `lmms_eval_vqav2`,
    `lmms_eval_answer_processor`); the leave-one-out average is the same either way.
    """
    if not answers:
        raise ValueError("no ground-truth answers: VQA accuracy needs the annotators' answers (10 per question)")
    if not isinstance(prediction, str) or not all(isinstance(answer, str) for answer in answers):
        raise TypeError("vqa_accuracy takes a prediction string and a list of answer strings")
    if normalizer is not None:
        gt_answers = [normalizer(answer) for answer in answers]
        predicted = normalizer(prediction)
    else:
        gt_answers = [_clean(answer) for answer in answers]
        predicted = _clean(prediction)
    if normalizer is None and len(set(gt_answers)) > 1:
        gt_answers = [process_digit_article(process_punctuation(answer)) for answer in gt_answers]
        predicted = process_digit_article(process_punctuation(predicted))
    matches = sum(answer == predicted for answer in gt_answers)
    # Leave each annotator out in turn (by position): the others match `matches` minus its own match.
    per_annotator = [min(1, float(matches - (answer == predicted)) / 3) for answer in gt_answers]
    return float(sum(per_annotator)) / len(per_annotator)


def _mean_percent(values: list[float]) -> float:
    return 100 * float(sum(values)) / len(values)  # the official expression, before its round(..., 2)


def score_vqa(predictions: dict[str, str], annotations: list[dict[str, Any]],
              normalizer: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Score predicted answers against VQA-style annotations, as the official `VQAEval.evaluate` does
    (`normalizer`: as in `vqa_accuracy`; None is the official rule).

    predictions: {question id (str): answer}. annotations: [{"question_id", "answers": [str, ...],
    "answer_type", "question_type"}] (a missing or None type counts as "all"; a type no annotation has is
    left out of the breakdown). Question ids are compared as strings.

    Returns {"metrics": {"accuracy": percent, full precision}, "breakdown": {"answer type": {type:
    {"accuracy", "count"}}, "question type": {...}}, "count": questions scored, "notes": [...],
    "official": {"overall", "perAnswerType", "perQuestionType"}} where "official" holds the figures rounded
    to 2 decimals exactly as the official script reports them. Questions without a prediction are not
    scored and are counted in the notes (the official API refuses such a results file outright);
    predictions for ids not in the annotations are ignored, with a note.
    """
    seen: set[str] = set()
    scores: list[float] = []
    groups: dict[str, dict[str, list[float]]] = {"answer type": {}, "question type": {}}
    has_field = {"answer type": False, "question type": False}
    missing = 0
    for annotation in annotations:
        question_id = str(annotation["question_id"])
        if question_id in seen:
            raise ValueError(f"question id {question_id} appears twice in the annotations; ids must be unique")
        seen.add(question_id)
        answers = annotation.get("answers")
        if not answers:
            raise ValueError(f"question {question_id} has no ground-truth answers; VQA accuracy needs them "
                             "(test splits are scored by the official server)")
        for group, field in (("answer type", "answer_type"), ("question type", "question_type")):
            has_field[group] |= annotation.get(field) is not None
        if question_id not in predictions:
            missing += 1
            continue
        prediction = predictions[question_id]
        if not isinstance(prediction, str):
            raise TypeError(f"the prediction for question {question_id} is {prediction!r}, not a string")
        accuracy = vqa_accuracy(prediction, [str(answer) for answer in answers], normalizer)
        scores.append(accuracy)
        for group, field in (("answer type", "answer_type"), ("question type", "question_type")):
            value = annotation.get(field)
            groups[group].setdefault("all" if value is None else str(value), []).append(accuracy)

    notes = []
    if missing:
        notes.append(f"{missing} of {len(seen)} questions have no prediction and were not scored (the official "
                     "evaluation only accepts results that answer every question)")
    unknown = len(set(predictions) - seen)
    if unknown:
        notes.append(f"{unknown} predictions have question ids not in the annotations; ignored")
    if not scores:
        notes.append("no question had a prediction: nothing was scored")
        return {"metrics": {"accuracy": 0.0}, "breakdown": {}, "count": 0, "notes": notes,
                "official": {"overall": 0.0, "perAnswerType": {}, "perQuestionType": {}}}

    overall = _mean_percent(scores)
    breakdown = {
        group: {value: {"accuracy": _mean_percent(values), "count": len(values)}
                for value, values in sorted(rows.items())}
        for group, rows in groups.items() if has_field[group]
    }
    official = {
        "overall": round(overall, 2),
        "perAnswerType": {value: round(row["accuracy"], 2) for value, row in breakdown.get("answer type", {}).items()},
        "perQuestionType": {value: round(row["accuracy"], 2)
                            for value, row in breakdown.get("question type", {}).items()},
    }
    notes.append(f"official-style overall accuracy (round(100 * mean, 2)): {official['overall']:.2f}")
    return {"metrics": {"accuracy": overall}, "breakdown": breakdown, "count": len(scores), "notes": notes,
            "official": official}


__all__ = [
    "articles", "commaStrip", "contractions", "lmms_eval_answer_processor", "lmms_eval_vqav2", "manualMap",
    "periodStrip", "process_digit_article", "process_punctuation", "punct", "score_vqa", "vqa_accuracy",
]
