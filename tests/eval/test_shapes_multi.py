"""shapes-multi: deterministic held-out pairs (half edits, half independent), exact-match scoring per question
type, rescoring a predictions file, and a real run with the tiny untrained model (two images in one turn)."""

import json
from collections import Counter

import pytest

from eval import runner
from eval.suites import ScoreContext, get_suite
from eval.suites.shapes_edit import render_scene
from eval.suites.shapes_multi import normalise
from mllm.data.shapes import make_scene, scene_seed
from mllm.data.shapes_tasks import MULTI_QUESTION_TYPES, make_edit, multi_qa


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mllm.init import init_model

    return init_model("tiny", "tiny", tmp_path_factory.mktemp("multi") / "model", seed=0)


def _suite(options=None):
    suite = get_suite("shapes-multi")
    suite.configure(options or {})
    return suite


def test_pairs_alternate_edit_and_independent_held_out_scenes_deterministically():
    suite = _suite()
    assert suite.kind == "answer" and not suite.needs_data and suite.primary_metric == "accuracy"
    items = suite.load_items(None)
    pairs = Counter(item.id.split("-")[0] for item in items)
    assert len(pairs) == 100 and len({item.id for item in items}) == len(items)
    kinds = Counter(item.meta["pair"] for item in items if item.id.endswith("-0"))
    assert kinds == {"edit": 50, "independent": 50}
    types = Counter(item.meta["type"] for item in items)
    assert types == {"count": 200, "more": 100, "change": 50, "single": 200}
    assert all(item.meta["pair"] == "edit" for item in items if item.meta["type"] == "change")
    # pair 0 is scene 0 and its edit, pair 1 scenes 2 and 3, all held out (odd seeds)
    first, second = make_scene(scene_seed("test", 0)), make_scene(scene_seed("test", 2))
    edit = make_edit(first)
    expected = multi_qa(first, edit.target, change=edit.change)
    expected += multi_qa(second, make_scene(scene_seed("test", 3)))
    assert [(i.prompt, i.meta["answer"], i.meta["type"]) for i in items[:len(expected)]] == [
        (qa["question"], qa["answer"], qa["type"]) for qa in expected]
    assert set(MULTI_QUESTION_TYPES) == {item.meta["type"] for item in items[:6]}  # the first pair has all
    image_1, image_2 = items[0].image
    assert image_1.tobytes() == render_scene(first, 48, "varied").tobytes()
    assert image_2.tobytes() == render_scene(edit.target, 48, "varied").tobytes()
    assert all(seed % 2 == 1 for item in items for seed in item.meta["scene_seeds"])

    again = _suite().load_items(None, limit=8)
    assert len(again) == 8
    assert [(i.id, i.prompt, i.meta, [im.tobytes() for im in i.image]) for i in again] == [
        (i.id, i.prompt, i.meta, [im.tobytes() for im in i.image]) for i in items[:8]]
    exact = _suite({"look": "exact", "size": "64"}).load_items(None, limit=1)[0]
    assert exact.image[0].size == (64, 64) and exact.image[0].tobytes() == render_scene(first, 64, "exact").tobytes()


def test_balanced_asks_each_type_once_a_pair_over_edit_pairs_from_a_later_scene():
    items = _suite({"balanced": "true", "first": "11000"}).load_items(None)
    assert len(items) == 400  # 100 edit pairs, one question of each type
    assert Counter(item.meta["type"] for item in items) == {t: 100 for t in MULTI_QUESTION_TYPES}
    assert {item.meta["pair"] for item in items} == {"edit"}
    for pair in (0, 1, 57):
        scene = make_scene(scene_seed("test", 11000 + pair))
        edit = make_edit(scene)
        questions = multi_qa(scene, edit.target, change=edit.change)
        asked = [item for item in items if item.id.startswith(f"{pair:03d}-")]
        assert [item.meta["scene_seeds"] for item in asked] == [[scene.seed, edit.target.seed]] * 4
        ordinal = ("first", "second")[pair % 2]  # the image asked about alternates by pair
        count = next(item for item in asked if item.meta["type"] == "count")
        assert count.prompt == f"How many objects are in the {ordinal} image?"
        assert count.meta["answer"] == str(len((scene, edit.target)[pair % 2].objects))
        single = next(item for item in asked if item.meta["type"] == "single")
        assert single.prompt == [qa for qa in questions if qa["type"] == "single"][pair % 2]["question"]
        change = next(item for item in asked if item.meta["type"] == "change")
        assert (change.prompt, change.meta["answer"]) == ("What changed between the two images?", edit.change)
    # without `balanced`, `first` moves the default mixture along the held-out scenes
    later = _suite({"first": "11000"}).load_items(None, limit=6)
    assert later[0].meta["scene_seeds"][0] == scene_seed("test", 11000)
    plain = _suite({"balanced": "no"}).load_items(None, limit=20)
    assert [(i.id, i.prompt) for i in plain] == [(i.id, i.prompt) for i in _suite().load_items(None, limit=20)]
    with pytest.raises(ValueError, match="--option balanced='maybe' is not a boolean"):
        _suite({"balanced": "maybe"})


def test_right_answers_score_100_and_wrong_ones_lower_it():
    suite = _suite()
    items = suite.load_items(None, limit=60)
    context = ScoreContext()
    right = {item.id: {"answer": f"  {item.meta['answer'].capitalize()}. "} for item in items}
    results = suite.score(right, items, context)
    assert results["metrics"]["accuracy"] == 100.0 and results["count"] == 60
    assert all(results["metrics"][f"accuracy_{t}"] == 100.0 for t in MULTI_QUESTION_TYPES)

    wrong = dict(right)
    changes = [item for item in items if item.meta["type"] == "change"]
    counts = [item for item in items if item.meta["type"] == "count"]
    for item in changes:
        wrong[item.id] = {"answer": "nothing changed"}
    wrong[counts[0].id] = {"answer": "7"}
    del wrong[counts[1].id]  # no prediction: not scored, and said so
    results = suite.score(wrong, items, context)
    metrics = results["metrics"]
    assert metrics["accuracy"] == pytest.approx(100 * (59 - len(changes) - 1) / 59)
    assert metrics["accuracy_change"] == 0.0
    assert metrics["accuracy_count"] == pytest.approx(100 * (len(counts) - 2) / (len(counts) - 1))
    assert metrics["accuracy_more"] == metrics["accuracy_single"] == 100.0
    assert results["breakdown"]["pair"]["independent"]["accuracy"] == 100.0
    assert any("1 of 60 questions have no prediction" in note for note in results["notes"])
    assert normalise(" The First. ") == "the first" and normalise("2..") == "2."


def test_eval_score_reads_a_predictions_file(tmp_path, capsys):
    items = _suite().load_items(None, limit=12)
    rows = [{"id": item.id, "answer": item.meta["answer"] if k % 4 else "no"} for k, item in enumerate(items)]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = runner.score_file("shapes-multi", path, options={"look": "exact"})
    correct = sum(row["answer"] == item.meta["answer"] for row, item in zip(rows, items))
    assert results["metrics"]["accuracy"] == pytest.approx(100 * correct / 12) and results["count"] == 12
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"accuracy {100 * correct / 12:.2f}"


def test_a_real_run_with_the_tiny_model_sends_both_images_in_one_turn(model_dir, tmp_path, monkeypatch):
    import mllm.api

    sent = []
    real = mllm.api.MLLM.generate_text

    def spy(self, conversations, **options):
        sent.extend(conversations)
        return real(self, conversations, **options)

    monkeypatch.setattr(mllm.api.MLLM, "generate_text", spy)
    out = tmp_path / "run"
    results = runner.evaluate(runner.EvalSettings(model=str(model_dir), suite="shapes-multi", out=str(out), limit=6,
                                                  batch_size=4, max_new_tokens=8, progress=False))
    assert len(sent) == 6
    content = sent[0][0]["content"]
    assert [part["type"] for part in content] == ["image", "image", "text"]
    assert content[0]["image"].size == (32, 32)  # rendered at the model's image size
    assert content[2]["text"] == "How many objects are in the first image?"
    saved = json.loads((out / runner.RESULTS_NAME).read_text())
    assert saved["suite"] == "shapes-multi" and saved["count"] == 6
    assert {"accuracy", *(f"accuracy_{t}" for t in MULTI_QUESTION_TYPES)} <= set(saved["metrics"])
    assert all(0.0 <= value <= 100.0 for value in saved["metrics"].values())
    assert results["metrics"] == saved["metrics"]
    assert len((out / runner.PREDICTIONS_NAME).read_text().splitlines()) == 6
