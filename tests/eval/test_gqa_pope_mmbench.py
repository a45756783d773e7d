"""POPE, multiple choice (MMBench) and GQA: scoring rules, hand-computed figures, official-format readers."""

import base64
import csv
import io
import json

import pytest

from eval.scoring.choice import (
    circular_accuracy,
    circular_group,
    circular_shifts,
    extract_choice,
    plain_accuracy,
)
from eval.scoring.gqa import gqa_scores, normalize_answer
from eval.scoring.pope import parse_yes_no, pope_metrics, pope_scores
from eval.suites import ScoreContext, get_suite

# ----------------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Yes", "yes"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No", "no"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image.", "no"),
        ("NO", "no"),  # compared lowercased
        ("Yes. There is no other animal.", "yes"),  # only the first sentence counts
        ("No.", "no"),
        ("There are no,", "no"),  # commas dropped before splitting
        ("Nothing suggests it", "yes"),  # "no" must be a word
        ("I don't know", "yes"),  # LLaVA's rule: whatever does not deny is a yes
        ("", "yes"),
    ],
)
def test_pope_parsing(text, parsed):
    assert parse_yes_no(text) == parsed


def test_pope_metrics_by_hand():
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no"]
    preds = ["yes", "yes", "no", "no", "yes", "yes", "yes", "no"]
    # TP = 2 (items 1, 2), FN = 2 (3, 4), FP = 3 (5, 6, 7), TN = 1 (8)
    metrics = pope_metrics(preds, labels)
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (2, 2, 3, 1)
    assert metrics["accuracy"] == pytest.approx(100 * 3 / 8)  # (TP + TN) / 8 = 37.5
    assert metrics["precision"] == pytest.approx(100 * 2 / 5)  # TP / (TP + FP) = 40
    assert metrics["recall"] == pytest.approx(100 * 2 / 4)  # TP / (TP + FN) = 50
    assert metrics["f1"] == pytest.approx(100 * 2 * 0.4 * 0.5 / 0.9)  # 44.44
    assert metrics["yes_ratio"] == pytest.approx(100 * 5 / 8)  # 62.5
    # no positive prediction: precision is 0, not a ZeroDivisionError
    assert pope_metrics(["no", "no"], ["yes", "no"])["precision"] == 0.0
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])


def test_pope_scores_count_missing_predictions_as_wrong():
    result = pope_scores({"a": "Yes"}, {"a": "yes", "b": "yes", "c": "no"}, {"a": "x", "b": "x", "c": "y"})
    assert result["missing"] == 2
    metrics = result["metrics"]
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (1, 1, 1, 0)
    assert set(result["breakdown"]["category"]) == {"x", "y"}


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_pope_suite_reads_the_official_files_and_scores_per_category(tmp_path):
    folder = tmp_path / "pope"
    (folder / "images").mkdir(parents=True)
    for name in ("COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"):
        (folder / "images" / name).write_bytes(b"not opened by load_items")
    image_1, image_2 = "COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"
    _write_jsonl(folder / "coco_pope_adversarial.json", [
        {"question_id": 1, "image": image_1, "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": image_1, "text": "Is there a car in the image?", "label": "no"},
        {"question_id": 3, "image": image_2, "text": "Is there a cup in the image?", "label": "no"},
    ])
    _write_jsonl(folder / "coco_pope_random.json", [
        {"question_id": 1, "image": image_2, "text": "Is there a bus in the image?", "label": "yes"},
        {"question_id": 2, "image": image_2, "text": "Is there a kite in the image?", "label": "no"},
    ])
    # a question-only file (no labels), as LLaVA ships: skipped in folder mode
    _write_jsonl(folder / "llava_pope_test.jsonl", [{"question_id": 9, "image": image_1, "text": "?"}])

    suite = get_suite("pope")
    assert suite.primary_metric == "f1"
    items = suite.load_items(str(folder))
    # categories interleaved, ids unique across files
    assert [item.id for item in items] == ["adversarial-1", "random-1", "adversarial-2", "random-2",
                                           "adversarial-3"]
    assert items[0].prompt == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert items[0].image == str(folder / "images" / image_1)
    assert items[1].meta == {"label": "yes", "category": "random", "question_id": 1,
                             "question": "Is there a bus in the image?"}
    assert [item.id for item in suite.load_items(str(folder), limit=2)] == ["adversarial-1", "random-1"]
    single = suite.load_items(str(folder / "coco_pope_random.json"))
    assert [item.meta["category"] for item in single] == ["random", "random"]
    with pytest.raises(ValueError, match="without 'label'"):
        suite.load_items(str(folder / "llava_pope_test.jsonl"))

    answers = {
        "adversarial-1": "Yes, there is a dog.",  # yes / yes: TP
        "adversarial-2": "Yes.",  # yes / no: FP
        "adversarial-3": "No, there is not.",  # no / no: TN
        "random-1": "There is no bus.",  # no / yes: FN
        "random-2": "No",  # no / no: TN
    }
    predictions = {key: {"id": key, "answer": text} for key, text in answers.items()}
    result = suite.score(predictions, items, ScoreContext())
    metrics = result["metrics"]
    # overall: TP 1, FP 1, TN 2, FN 1
    assert metrics["accuracy"] == pytest.approx(100 * 3 / 5)
    assert metrics["precision"] == pytest.approx(50.0)
    assert metrics["recall"] == pytest.approx(50.0)
    assert metrics["f1"] == pytest.approx(50.0)
    assert metrics["yes_ratio"] == pytest.approx(40.0)
    adversarial = result["breakdown"]["category"]["adversarial"]  # TP 1, FP 1, TN 1
    assert adversarial["accuracy"] == pytest.approx(100 * 2 / 3)
    assert adversarial["precision"] == pytest.approx(50.0)
    assert adversarial["recall"] == pytest.approx(100.0)
    assert adversarial["f1"] == pytest.approx(100 * 2 / 3)
    assert adversarial["yes_ratio"] == pytest.approx(100 * 2 / 3)
    random_ = result["breakdown"]["category"]["random"]  # FN 1, TN 1
    assert (random_["accuracy"], random_["precision"], random_["recall"], random_["f1"]) == (50.0, 0.0, 0.0, 0.0)
    assert metrics["f1_category_mean"] == pytest.approx((100 * 2 / 3 + 0.0) / 2)
    assert result["count"] == 5


# ------------------------------------------------------------------------------- multiple choice

OPTIONS = {"A": "red", "B": "blue", "C": "a green apple", "D": "none of these"}


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("b", "B"),
        ("B. blue", "B"),
        ("B blue", "B"),
        ("The answer is B", "B"),
        ("The answer is (B).", "B"),
        ("Answer: C", "C"),
        ("option D", "D"),
        ("I think C is right", "C"),
        ("blue", "B"),  # the option text itself
        ("Blue.", "B"),
        ("A green apple", "C"),  # "A" as an article, and the text of option C
        ("A", "A"),
        ("A. red", "A"),
        ("The answer is A", "A"),
        ("A, B", None),  # two letters
        ("A and B", None),
        ("red or blue", None),  # two option texts
        ("E", None),  # not an offered letter
        ("The answer is a cat", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_choice(answer, letter):
    assert extract_choice(answer, OPTIONS) == letter


def test_extract_choice_takes_a_list_of_options():
    assert extract_choice("dog", ["cat", "dog"]) == "B"
    assert extract_choice("C", ["cat", "dog"]) is None


def test_circular_evaluation_groups_copies_by_index_mod_a_million():
    assert circular_group("2000007") == 7
    correct = {
        "1": True, "1000001": True, "2000001": True, "3000001": True,  # question 1: every shift right
        "2": True, "1000002": False, "2000002": True,  # question 2: one shift wrong
        "3": True,  # question 3: no copies
    }
    result = circular_accuracy(correct)
    assert result["per_question"] == {1: True, 2: False, 3: True}
    assert result["questions"] == 3
    assert result["copies"] == {1: 4, 2: 3, 3: 1}
    assert result["accuracy"] == pytest.approx(100 * 2 / 3)
    assert plain_accuracy(correct.values()) == pytest.approx(100 * 7 / 8)
    with pytest.raises(ValueError, match="integer"):
        circular_group("q1")


def test_circular_shifts_rotate_the_answer():
    assert circular_shifts(["red", "blue", "green"], "B") == [
        (["red", "blue", "green"], "B"),
        (["blue", "green", "red"], "A"),
        (["green", "red", "blue"], "C"),
    ]


def _png_base64(color) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_mmbench_suite_reads_the_tsv_and_scores_plain_and_circular(tmp_path):
    red = _png_base64((255, 0, 0))
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image",
               "source", "split"]
    rows = [
        # question 0 and its circular copies (VLMEvalKit TSVs point copies' images at the original's index)
        ["0", "What color is the square?", "A tiny picture.", "red", "blue", "green", "", "A",
         "attribute", "perception", red, "x", "dev"],
        ["1000000", "What color is the square?", "A tiny picture.", "blue", "green", "red", "nan", "C",
         "attribute", "perception", "0", "x", "dev"],
        ["2000000", "What color is the square?", "A tiny picture.", "green", "red", "blue", "nan", "B",
         "attribute", "perception", "0", "x", "dev"],
        # question 1: no hint, two options, quoting and a tab-free multi-word question
        ["1", 'Is the "square" a circle?', "nan", "yes", "no", "", "", "B", "logic", "reasoning", red, "y",
         "dev"],
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    (tmp_path / "mmbench").mkdir()
    (tmp_path / "mmbench" / "mmbench_dev_en.tsv").write_text(buffer.getvalue())

    suite = get_suite("mmbench")
    assert suite.primary_metric == "accuracy"
    items = suite.load_items(str(tmp_path / "mmbench"))
    assert [item.id for item in items] == ["0", "1000000", "2000000", "1"]
    assert items[0].prompt == ("A tiny picture.\nWhat color is the square?\nA. red\nB. blue\nC. green\n"
                               "Answer with the option's letter from the given choices directly.")
    assert items[3].prompt == ('Is the "square" a circle?\nA. yes\nB. no\n'
                               "Answer with the option's letter from the given choices directly.")
    assert items[1].meta["options"] == {"A": "blue", "B": "green", "C": "red"}
    assert items[1].meta["answer"] == "C"
    assert items[0].meta["category"] == "attribute" and items[0].meta["l2-category"] == "perception"
    # the image is a data URL, decoded only by whoever opens it; the copies share the original's image
    assert items[0].image == f"data:image/png;base64,{red}"
    assert items[1].image == items[0].image
    from PIL import Image

    decoded = Image.open(io.BytesIO(base64.b64decode(items[1].image.split(",", 1)[1])))
    assert decoded.size == (4, 4) and decoded.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert len(suite.load_items(str(tmp_path / "mmbench" / "mmbench_dev_en.tsv"), limit=2)) == 2

    predictions = {
        "0": {"id": "0", "answer": "A"},  # right
        "1000000": {"id": "1000000", "answer": "The answer is C."},  # right
        "2000000": {"id": "2000000", "answer": "green"},  # option A's text: wrong (answer B)
        "1": {"id": "1", "answer": "B. no"},  # right
    }
    plain = suite.score(predictions, items, ScoreContext())
    assert plain["metrics"]["accuracy"] == pytest.approx(75.0)
    assert plain["count"] == 4
    assert plain["breakdown"]["category"]["attribute"] == {"accuracy": pytest.approx(100 * 2 / 3), "count": 3}
    assert any("circular=true" in note for note in plain["notes"])

    circular = suite.score(predictions, items, ScoreContext(options={"circular": "true"}))
    assert circular["metrics"]["accuracy"] == pytest.approx(50.0)  # question 0 fails one copy, question 1 right
    assert circular["metrics"]["circular_accuracy"] == pytest.approx(50.0)
    assert circular["metrics"]["plain_accuracy"] == pytest.approx(75.0)
    assert circular["count"] == 2
    assert circular["breakdown"]["category"] == {"attribute": {"accuracy": 0.0, "count": 1},
                                                 "logic": {"accuracy": 100.0, "count": 1}}
    with pytest.raises(ValueError, match="circular=true or circular=false"):
        suite.score(predictions, items, ScoreContext(options={"circular": "maybe"}))


def test_mmbench_reader_names_missing_columns(tmp_path):
    (tmp_path / "bad.tsv").write_text("index\tquestion\n0\tWhy?\n")
    with pytest.raises(ValueError, match="lacks the column"):
        get_suite("mmbench").load_items(str(tmp_path / "bad.tsv"))


# ---------------------------------------------------------------------------------------- GQA


@pytest.mark.parametrize(
    ("text", "normalized"),
    [("Yes", "yes"), (" left. ", "left"), ("Table.", "table"), ("red...", "red"), ("T-shirt", "t-shirt"),
     (None, "")],
)
def test_gqa_normalisation(text, normalized):
    assert normalize_answer(text) == normalized


def test_gqa_scores_and_breakdown():
    types = {"a": {"structural": "verify", "semantic": "obj"}, "b": {"structural": "query", "semantic": "attr"},
             "c": {"structural": "query", "semantic": "attr"}}
    result = gqa_scores({"a": "Yes.", "b": "blue", "c": None}, {"a": "yes", "b": "red", "c": "white"}, types)
    assert result["accuracy"] == pytest.approx(100 / 3)
    assert result["missing"] == 1
    assert result["breakdown"]["structural"] == {"query": {"accuracy": 0.0, "count": 2},
                                                 "verify": {"accuracy": 100.0, "count": 1}}
    assert set(result["breakdown"]["semantic"]) == {"obj", "attr"}


def test_gqa_suite_reads_the_official_question_file(tmp_path):
    root = tmp_path / "gqa"
    (root / "questions").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "images" / "n161313.jpg").write_bytes(b"not opened by load_items")
    questions = {
        "20968379": {"imageId": "n161313", "question": "Is the sky blue?", "answer": "yes",
                     "fullAnswer": "Yes, the sky is blue.", "isBalanced": True,
                     "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "20968380": {"imageId": "n161313", "question": "What is on the table?", "answer": "cup",
                     "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
        "20968381": {"imageId": "n161313", "question": "Which side is the cup on?", "answer": "left",
                     "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
    }
    (root / "questions" / "testdev_balanced_questions.json").write_text(json.dumps(questions))

    suite = get_suite("gqa")
    assert suite.primary_metric == "accuracy"
    items = suite.load_items(str(root))
    assert [item.id for item in items] == ["20968379", "20968380", "20968381"]
    assert items[0].prompt == "Is the sky blue?\nAnswer the question using a single word or phrase."
    assert items[0].image == str(root / "images" / "n161313.jpg")
    assert items[0].meta["answer"] == "yes" and items[0].meta["types"]["structural"] == "verify"
    assert len(suite.load_items(str(root / "questions" / "testdev_balanced_questions.json"), limit=1)) == 1

    predictions = {"20968379": {"id": "20968379", "answer": "Yes."},
                   "20968380": {"id": "20968380", "answer": "Cup"},
                   "20968381": {"id": "20968381", "answer": "right"}}
    result = suite.score(predictions, items, ScoreContext())
    assert result["metrics"]["accuracy"] == pytest.approx(100 * 2 / 3)
    assert result["count"] == 3
    assert result["breakdown"]["structural"]["query"] == {"accuracy": 50.0, "count": 2}
    assert result["breakdown"]["semantic"]["attr"] == {"accuracy": 100.0, "count": 1}

    with pytest.raises(FileNotFoundError, match="testdev_balanced_questions.json"):
        suite.load_items(str(tmp_path / "empty_dir_that_does_not_exist"))
