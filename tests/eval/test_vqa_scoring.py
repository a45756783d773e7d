"""The VQA accuracy follows the official vqaEval.py rule by rule; expected values are worked out by hand."""

import pytest

from eval.scoring.vqa import (
    contractions,
    manualMap,
    process_digit_article,
    process_punctuation,
    punct,
    score_vqa,
    vqa_accuracy,
)


def leave_one_out(matches: int, total: int = 10) -> float:
    """Hand formula: the `matches` matching annotators each see matches-1 others, the rest see all."""
    return (matches * min(1, (matches - 1) / 3) + (total - matches) * min(1, matches / 3)) / total


# ---------------------------------------------------------------------------------------- tables
def test_tables_match_the_official_ones():
    assert len(contractions) == 120
    assert contractions["dont"] == "don't" and contractions["somebody'd"] == "somebodyd"
    assert contractions["twas"] == "'twas" and contractions["Im"] == "I'm"
    assert manualMap == {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                         "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
    assert punct == [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                     ",", "?", "!"]
    assert "'" not in punct and ":" not in punct and "." not in punct


# ---------------------------------------------------------------------------------------- processPunctuation
def test_punctuation_next_to_a_space_is_deleted_else_replaced_by_a_space():
    assert process_punctuation("red/white") == "red white"
    assert process_punctuation("red, white") == "red white"  # ", " in the text: every "," deleted
    assert process_punctuation("red,white") == "red white"
    assert process_punctuation("(yes)") == " yes "
    # The test looks at the ORIGINAL text: " (" occurs, so "(" is deleted; ")" never touches a space.
    assert process_punctuation("yes (maybe)") == "yes maybe "


def test_digit_comma_deletes_every_mark():
    assert process_punctuation("1,000") == "1000"
    assert process_punctuation("1,000 (approx)") == "1000 approx"


def test_periods_are_dropped_unless_a_digit_follows():
    assert process_punctuation("yes.") == "yes"
    assert process_punctuation("3.") == "3"
    assert process_punctuation("2.5") == "2.5"
    assert process_punctuation("st. louis") == "st louis"


def test_at_most_32_periods_are_removed_as_officially():
    # periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) is the `count` argument.
    assert process_punctuation("." * 40) == "." * 8
    assert process_punctuation("." * 32) == ""


# ---------------------------------------------------------------------------------------- processDigitArticle
def test_digit_article_contractions():
    assert process_digit_article("Two") == "2"
    assert process_digit_article("none") == "0"
    assert process_digit_article("eleven") == "eleven"
    assert process_digit_article("a dog") == "dog"
    assert process_digit_article("The  Dog  ") == "dog"
    assert process_digit_article("an apple and the pear") == "apple and pear"
    assert process_digit_article("dont") == "don't"
    assert process_digit_article("Im") == "im"  # lower-cased first: the "Im" entry never fires (official)


# ---------------------------------------------------------------------------------------- accuracy
def test_leave_one_out_by_hand():
    others = ["3"] * 7
    assert vqa_accuracy("2", ["2"] * 3 + others) == pytest.approx((7 * 1 + 3 * (2 / 3)) / 10)
    assert vqa_accuracy("2", ["2"] * 3 + others) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)  # 0.6
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy("4", ["2"] * 4 + ["3"] * 6) == 0.0
    for matches in range(11):
        answers = ["yes"] * matches + ["no"] * (10 - matches)
        assert vqa_accuracy("yes", answers) == pytest.approx(leave_one_out(matches))


def test_annotator_left_out_by_position_not_by_value():
    # Dropping by value would drop all three "2"s at once; the official code drops one annotator.
    answers = ["2", "2", "2", "3", "3", "3", "4", "4", "4", "5"]
    assert vqa_accuracy("2", answers) == pytest.approx(leave_one_out(3))


def test_number_words_articles_and_contractions_are_normalised():
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("a dog", ["dog"] * 5 + ["cat"] * 5) == 1.0
    assert vqa_accuracy("The Dog.", ["dog"] * 5 + ["cat"] * 5) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("1,000", ["1000"] * 2 + ["100"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("yes.", ["yes"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("yes!", ["yes"] * 9 + ["no"]) == 1.0


def test_ground_truths_are_normalised_like_the_prediction():
    # The ground truths go through processPunctuation AND processDigitArticle (official master): "none"
    # and "two" among the annotators become "0" and "2" (GT-Vision-Lab/VQA issue #7's case).
    assert vqa_accuracy("none", ["none"] + ["nothing"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("2", ["two", "2", "2"] + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("yes", ["Yes", "yes.", "yes"] + ["no"] * 7) == pytest.approx(0.9)


def test_identical_ground_truths_leave_the_prediction_untouched():
    tens = ["yes"] * 10
    assert vqa_accuracy("yes", tens) == 1.0
    assert vqa_accuracy("Yes", tens) == 0.0
    assert vqa_accuracy("yes.", tens) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("  yes\n", tens) == 1.0  # newline / tab / strip always apply
    assert vqa_accuracy("yes", [" yes", "yes\t"] + ["yes"] * 8) == 1.0


def test_accuracy_needs_answers():
    with pytest.raises(ValueError, match="ground-truth"):
        vqa_accuracy("yes", [])


# ---------------------------------------------------------------------------------------- score_vqa
def annotations():
    return [
        {"question_id": 1, "answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        {"question_id": 2, "answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number", "question_type": "how many"},
        {"question_id": 3, "answers": ["red"] * 2 + ["blue"] * 8, "answer_type": "other",
         "question_type": "what color is the"},
        {"question_id": 4, "answers": ["no"] * 10, "answer_type": "yes/no", "question_type": "is the"},
    ]


def test_score_vqa_overall_and_breakdown():
    predictions = {"1": "yes", "2": "two", "3": "Red", "4": "yes"}
    results = score_vqa(predictions, annotations())
    per_question = [1.0, 0.9, 0.6, 0.0]
    assert results["count"] == 4
    assert results["metrics"]["accuracy"] == pytest.approx(100 * sum(per_question) / 4)  # 62.5
    answer_type = results["breakdown"]["answer type"]
    assert answer_type["yes/no"] == {"accuracy": pytest.approx(50.0), "count": 2}
    assert answer_type["number"]["accuracy"] == pytest.approx(90.0)
    assert answer_type["other"]["accuracy"] == pytest.approx(60.0)
    assert results["breakdown"]["question type"]["how many"]["count"] == 1
    assert results["official"] == {"overall": 62.5, "perAnswerType": {"number": 90.0, "other": 60.0, "yes/no": 50.0},
                                   "perQuestionType": {"how many": 90.0, "is the": 50.0, "what color is the": 60.0}}


def test_score_vqa_rounding_like_the_official_script():
    results = score_vqa({"1": "2", "2": "2", "3": "3"}, [
        {"question_id": 1, "answers": ["2"] + ["3"] * 9},  # 0.3
        {"question_id": 2, "answers": ["2"] * 2 + ["3"] * 8},  # 0.6
        {"question_id": 3, "answers": ["2"] * 3 + ["4"] * 7},  # 0.0
    ])
    assert results["metrics"]["accuracy"] == pytest.approx(30.0)
    results = score_vqa({"1": "2", "2": "4"}, [
        {"question_id": 1, "answers": ["2"] + ["3"] * 9},  # 0.3
        {"question_id": 2, "answers": ["4"] * 2 + ["3"] * 8},  # 0.6
        {"question_id": 3, "answers": ["4"] * 2 + ["3"] * 8},  # no prediction
    ])
    assert results["count"] == 2
    assert results["metrics"]["accuracy"] == pytest.approx(45.0)
    results = score_vqa({"1": "2", "2": "3", "3": "3"}, [
        {"question_id": 1, "answers": ["2"] + ["3"] * 9},  # 0.3
        {"question_id": 2, "answers": ["2"] + ["3"] * 9},  # 1.0
        {"question_id": 3, "answers": ["3"] * 2 + ["2"] * 8},  # 0.6
    ])
    assert results["metrics"]["accuracy"] == pytest.approx(100 * 1.9 / 3)  # 63.333...
    assert results["official"]["overall"] == 63.33
    assert "63.33" in " ".join(results["notes"])
    # Absent types count as "all"; a type no annotation has is left out.
    assert set(results["breakdown"]) == set()


def test_score_vqa_missing_and_unknown_predictions():
    results = score_vqa({"1": "yes", "99": "no"}, annotations())
    assert results["count"] == 1
    assert results["metrics"]["accuracy"] == 100.0
    notes = " ".join(results["notes"])
    assert "3 of 4 questions have no prediction" in notes
    assert "1 predictions have question ids not in the annotations" in notes


def test_score_vqa_without_predictions_and_bad_input():
    results = score_vqa({}, annotations())
    assert results["count"] == 0 and results["metrics"]["accuracy"] == 0.0
    with pytest.raises(ValueError, match="twice"):
        score_vqa({}, annotations() + annotations()[:1])
    with pytest.raises(ValueError, match="no ground-truth answers"):
        score_vqa({"1": "yes"}, [{"question_id": 1, "answers": []}])
    with pytest.raises(TypeError, match="not a string"):
        score_vqa({"1": None}, annotations())


def test_types_default_to_all():
    results = score_vqa({"1": "yes"}, [{"question_id": 1, "answers": ["yes"] * 10, "answer_type": None},
                                       {"question_id": 2, "answers": ["no"] * 10, "answer_type": "yes/no"}])
    assert results["breakdown"] == {"answer type": {"all": {"accuracy": 100.0, "count": 1}}}


def official_loop(prediction, answers):
    """VQAEval.evaluate's per-question body, transcribed statement by statement (answers as dicts with ids,
    so `item != gtAnsDatum` leaves out one annotator)."""
    gts = [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]
    for ansDic in gts:
        ansDic["answer"] = ansDic["answer"].replace("\n", " ").replace("\t", " ").strip()
    resAns = prediction.replace("\n", " ").replace("\t", " ").strip()
    gtAcc = []
    gtAnswers = [ans["answer"] for ans in gts]
    if len(set(gtAnswers)) > 1:
        for ansDic in gts:
            ansDic["answer"] = process_digit_article(process_punctuation(ansDic["answer"]))
        resAns = process_digit_article(process_punctuation(resAns))
    for gtAnsDatum in gts:
        otherGTAns = [item for item in gts if item != gtAnsDatum]
        matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
        gtAcc.append(min(1, float(len(matchingAns)) / 3))
    return float(sum(gtAcc)) / len(gtAcc)


def test_matches_the_official_loop_on_random_questions():
    import random

    vocabulary = ["yes", "Yes", "yes.", "no", "2", "two", "a dog", "dog", "dont", "don't", "1,000", "1000",
                  "red/white", "red white", " none", "0", "st. louis", "st louis", "(yes)"]
    rng = random.Random(0)
    for _ in range(2000):
        answers = [rng.choice(vocabulary[: rng.randint(1, len(vocabulary))]) for _ in range(rng.choice([3, 10]))]
        prediction = rng.choice(vocabulary)
        assert vqa_accuracy(prediction, answers) == official_loop(prediction, answers), (prediction, answers)
