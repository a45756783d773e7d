"""vqav2 / textvqa / vizwiz read tiny files in the official formats; scores are checked against hand figures."""

import json
import os

import pytest
from PIL import Image

from eval.suites.base import ScoreContext
from eval.suites.vqa import INSTRUCTION, SUITES, VIZWIZ_INSTRUCTION, MissingImage

PHRASE = "\nAnswer the question using a single word or phrase."


def save_image(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def write_json(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def check_items(items, ids, index, prompt, image):
    """The items' ids, and item `index`'s prompt and image path."""
    assert [item.id for item in items] == ids
    assert items[index].prompt == prompt
    assert items[index].image == str(image)


def vqa_answers(strings):
    return [{"answer": s, "answer_confidence": "yes", "answer_id": i + 1} for i, s in enumerate(strings)]


VQAV2_QUESTIONS = [
    (1, 42, "Is the sky blue?", ["yes"] * 10, "yes/no", "is the"),
    (2, 42, "How many dogs are there?", ["2"] * 3 + ["3"] * 7, "number", "how many"),
    (3, 73, "What color is the car?", ["red"] * 2 + ["blue"] * 8, "other", "what color is the"),
    (4, 99, "Is it raining?", ["no"] * 10, "yes/no", "is it"),
]


def write_vqav2(folder, questions=True, annotations=True, images=True):
    if questions:
        write_json(folder / "v2_OpenEnded_mscoco_val2014_questions.json", {
            "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
            "questions": [{"image_id": image, "question": q, "question_id": qid}
                          for qid, image, q, *_ in VQAV2_QUESTIONS]})
    if annotations:
        write_json(folder / "v2_mscoco_val2014_annotations.json", {
            "info": {}, "data_subtype": "val2014", "annotations": [
                {"question_id": qid, "image_id": image, "question_type": qtype, "answer_type": atype,
                 "answers": vqa_answers(answers), "multiple_choice_answer": answers[-1]}
                for qid, image, _, answers, atype, qtype in VQAV2_QUESTIONS]})
    if images:
        save_image(folder / "val2014" / "COCO_val2014_000000000042.jpg")
        save_image(folder / "more" / "000000000073.jpg")  # COCO-2017 style name
    return folder


# ---------------------------------------------------------------------------------------- vqav2
def test_vqav2_items(tmp_path):
    suite = SUITES["vqav2"]()
    items = suite.load_items(str(write_vqav2(tmp_path)))
    assert [item.id for item in items] == ["1", "2", "3", "4"]
    assert items[0].prompt == "Is the sky blue?" + PHRASE == "Is the sky blue?" + INSTRUCTION
    assert items[0].image == str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    assert items[1].image == items[0].image
    assert items[2].image == str(tmp_path / "more" / "000000000073.jpg")
    assert isinstance(items[3].image, MissingImage)
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000099.jpg"):
        os.fspath(items[3].image)
    assert items[1].meta["answers"] == ["2"] * 3 + ["3"] * 7
    assert items[1].meta["answer_type"] == "number" and items[1].meta["question_type"] == "how many"
    assert items[1].meta["question_id"] == 2 and items[1].meta["image_id"] == 42
    assert [item.id for item in suite.load_items(str(tmp_path), limit=2)] == ["1", "2"]
    assert suite.kind == "answer" and suite.max_new_tokens == 16 and suite.primary_metric == "accuracy"


def test_vqav2_score(tmp_path):
    suite = SUITES["vqav2"]()
    items = suite.load_items(str(write_vqav2(tmp_path)))
    predictions = {"1": {"id": "1", "answer": "yes"}, "2": {"id": "2", "answer": "two"},
                   "3": {"id": "3", "answer": "Red"}, "4": {"id": "4", "answer": "yes"}}
    results = suite.score(predictions, items, ScoreContext())
    # per question: 1.0, (7 + 3 * 2/3) / 10 = 0.9, (8 * 2/3 + 2 * 1/3) / 10 = 0.6, 0.0
    assert results["metrics"]["accuracy"] == pytest.approx(62.5)
    assert results["count"] == 4
    assert results["breakdown"]["answer type"]["yes/no"]["accuracy"] == pytest.approx(50.0)
    assert results["breakdown"]["answer type"]["number"]["accuracy"] == pytest.approx(90.0)
    assert results["breakdown"]["question type"]["what color is the"]["accuracy"] == pytest.approx(60.0)
    assert results["official"]["overall"] == 62.5

    del predictions["4"]
    results = suite.score(predictions, items, ScoreContext())
    assert results["metrics"]["accuracy"] == pytest.approx(100 * 2.5 / 3)
    assert any("1 of 4 questions have no prediction" in note for note in results["notes"])


def test_vqav2_annotations_alone_are_enough_to_score(tmp_path):
    suite = SUITES["vqav2"]()
    items = suite.load_items(str(write_vqav2(tmp_path, questions=False, images=False)))
    assert [item.id for item in items] == ["1", "2", "3", "4"]
    assert all(item.prompt == "" and isinstance(item.image, MissingImage) for item in items)
    results = suite.score({"2": {"id": "2", "answer": "2"}}, items, ScoreContext())
    assert results["metrics"]["accuracy"] == pytest.approx(90.0)


def test_vqav2_questions_alone_cannot_be_scored(tmp_path):
    suite = SUITES["vqav2"]()
    items = suite.load_items(str(write_vqav2(tmp_path, annotations=False)))
    assert items[3].prompt == "Is it raining?" + PHRASE and items[3].meta["answers"] is None
    with pytest.raises(ValueError, match="no ground-truth answers"):
        suite.score({"1": {"id": "1", "answer": "yes"}}, items, ScoreContext())


def test_vqav2_errors_say_what_to_do(tmp_path):
    suite = SUITES["vqav2"]()
    with pytest.raises(FileNotFoundError, match="no file with 'questions' or 'annotations' in its name"):
        suite.load_items(str(tmp_path))
    with pytest.raises(ValueError, match="needs --data"):
        suite.load_items(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        suite.load_items(str(tmp_path / "nowhere"))
    write_vqav2(tmp_path)
    write_json(tmp_path / "v2_mscoco_train2014_annotations.json", {"annotations": []})
    assert len(suite.load_items(str(tmp_path))) == 4  # several files: the one with "val" in its name
    write_json(tmp_path / "old" / "mscoco_val2014_annotations.json", {"annotations": []})
    with pytest.raises(ValueError, match="several candidates"):
        suite.load_items(str(tmp_path))


def test_vqav2_official_results_and_jsonl(tmp_path):
    suite = SUITES["vqav2"]()
    official = write_json(tmp_path / "results.json", [{"question_id": 1, "answer": "yes"},
                                                      {"question_id": 2, "answer": "2"}])
    assert [(r["id"], r["answer"]) for r in suite.read_predictions(official)] == [("1", "yes"), ("2", "2")]
    jsonl = tmp_path / "results.jsonl"
    jsonl.write_text('{"question_id": 3, "answer": "red"}\n{"id": "4", "answer": "no"}\n'
                     '{"question_id": 5, "text": "blue", "prompt": "..."}\n')
    assert [(r["id"], r["answer"]) for r in suite.read_predictions(jsonl)] == [("3", "red"), ("4", "no"),
                                                                                ("5", "blue")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "no"}\n')
    with pytest.raises(ValueError, match="record 1 has none of the keys"):
        suite.read_predictions(bad)


def test_eval_score_end_to_end(tmp_path, capsys):
    from eval.runner import score_file

    write_vqav2(tmp_path / "data", questions=False, images=False)
    predictions = write_json(tmp_path / "results.json", [
        {"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "two"},
        {"question_id": 3, "answer": "Red"}, {"question_id": 4, "answer": "yes"}])
    results = score_file("vqav2", predictions, data=str(tmp_path / "data"))
    assert results["metrics"]["accuracy"] == pytest.approx(62.5)
    assert capsys.readouterr().out.strip().splitlines()[-1] == "accuracy 62.50"


# ---------------------------------------------------------------------------------------- textvqa
def write_textvqa(folder):
    write_json(folder / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand of this phone?",
         "answers": ["nokia"] * 10, "image_classes": ["Mobile phone"], "set_name": "val"},
        {"question_id": 34603, "image_id": "00b1de3b1a2c2f0e", "question": "what drink is this?",
         "answers": ["coca cola"] * 3 + ["coke"] * 7, "set_name": "val"},
        {"question_id": 34604, "image_id": "00b1de3b1a2c2f0e", "question": "what year is it?",
         "answers": ["2010"] * 10, "set_name": "val"},
    ]})
    write_json(folder / "TextVQA_Rosetta_OCR_v0.2_val.json", {"data": [{"image_id": "003a8ae2ef43b901"}]})
    save_image(folder / "train_images" / "003a8ae2ef43b901.jpg")
    return folder


def test_textvqa_items_and_score(tmp_path):
    suite = SUITES["textvqa"]()
    items = suite.load_items(str(write_textvqa(tmp_path)))
    check_items(items, ["34602", "34603", "34604"], 0, "what is the brand of this phone?" + PHRASE,
                tmp_path / "train_images" / "003a8ae2ef43b901.jpg")
    assert isinstance(items[1].image, MissingImage)
    assert items[1].meta["answer_type"] == "all" and items[1].meta["answers"][0] == "coca cola"
    # the file itself works as --data too
    assert len(suite.load_items(str(tmp_path / "TextVQA_0.5.1_val.json"), limit=1)) == 1

    records = suite.read_predictions(write_json(tmp_path / "answers.json", [
        {"question_id": 34602, "answer": "nokia"}, {"question_id": 34603, "answer": "Coca-Cola"}]))
    predictions = {r["id"]: r for r in records}
    results = suite.score(predictions, items, ScoreContext())
    # 1.0 and "coca cola" (3 of 10) 0.9; 34604 has no prediction
    assert results["metrics"]["accuracy"] == pytest.approx(95.0)
    assert results["count"] == 2
    assert results["breakdown"] == {"answer type": {"all": {"accuracy": pytest.approx(95.0), "count": 2}}}
    assert any("1 of 3 questions have no prediction" in note for note in results["notes"])


# ---------------------------------------------------------------------------------------- vizwiz
def vizwiz_entry(index, question, answers, answer_type, split="val"):
    return {"image": f"VizWiz_{split}_{index:08d}.jpg", "question": question, "answer_type": answer_type,
            "answerable": int(answer_type != "unanswerable"),
            "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}


def write_vizwiz(folder):
    write_json(folder / "Annotations" / "val.json", [
        vizwiz_entry(0, "What is this?", ["unanswerable"] * 10, "unanswerable"),
        vizwiz_entry(1, "What color is this shirt?", ["red"] * 8 + ["dark red"] * 2, "other"),
        vizwiz_entry(2, "Is it on?", ["yes"] * 10, "yes/no"),
    ])
    write_json(folder / "Annotations" / "train.json", [vizwiz_entry(0, "What?", ["no"] * 10, "yes/no", "train")])
    save_image(folder / "val" / "VizWiz_val_00000001.jpg")
    return folder


def test_vizwiz_items_and_score(tmp_path):
    suite = SUITES["vizwiz"]()
    items = suite.load_items(str(write_vizwiz(tmp_path)))
    check_items(items, ["VizWiz_val_00000000", "VizWiz_val_00000001", "VizWiz_val_00000002"], 1,
                "What color is this shirt?" + VIZWIZ_INSTRUCTION,
                tmp_path / "val" / "VizWiz_val_00000001.jpg")
    assert VIZWIZ_INSTRUCTION.endswith(PHRASE) and "'Unanswerable'" in VIZWIZ_INSTRUCTION
    assert isinstance(items[0].image, MissingImage)
    assert items[0].meta["answer_type"] == "unanswerable" and items[0].meta["answerable"] == 0

    results_file = write_json(tmp_path / "results.json", [
        {"image": "VizWiz_val_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_val_00000001.jpg", "answer": "Dark red."},
        {"image": "VizWiz_val_00000002.jpg", "answer": "Yes"}])
    records = suite.read_predictions(results_file)
    assert [r["id"] for r in records] == [item.id for item in items]
    results = suite.score({r["id"]: r for r in records}, items, ScoreContext())
    # 1.0; "dark red" 2 of 10 -> 0.6; "Yes" against ten "yes" is not normalised -> 0.0
    assert results["metrics"]["accuracy"] == pytest.approx(100 * 1.6 / 3)
    assert results["official"]["overall"] == 53.33
    assert results["breakdown"]["answer type"]["other"]["accuracy"] == pytest.approx(60.0)
    assert "question type" not in results["breakdown"]


def test_registry_finds_the_suites():
    from eval.suites import get_suite

    for name in ("vqav2", "textvqa", "vizwiz"):
        assert get_suite(name).name == name
