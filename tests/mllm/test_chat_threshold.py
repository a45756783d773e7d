"""`mllm chat-threshold` (mllm/chat_threshold.py): the calibration turns, the threshold rule, and the command
that measures a model and writes its `chat_image_threshold`."""

from __future__ import annotations

import json
import shutil

import pytest

from mllm.chat_threshold import FIRST_SCENE, calibration_turns, choose_threshold, measure
from mllm.cli import main
from mllm.config import MLLMConfig
from mllm.data import shapes, shapes_tasks


def test_the_threshold_is_a_margin_over_every_question():
    assert choose_threshold([0.3, 1e-3, 1e-5], [1e-5, 2e-4], margin=3.0) == pytest.approx(6e-4)
    assert choose_threshold([0.3, 1e-3], [1e-5, 2e-4], margin=10.0) == pytest.approx(2e-3)  # 0.3 reaches it
    assert choose_threshold([0.9], [0.2], margin=3.0) is None  # 0.6: over one half, the likeliest token anyway
    assert choose_threshold([1e-4, 2e-4], [1e-4], margin=3.0) is None  # no edit reaches 3e-4
    with pytest.raises(ValueError, match="needs the chances"):
        choose_threshold([], [0.1])


def test_calibration_turns_are_unseen_scenes_sent_image_first():
    turns = list(calibration_turns(8, size=32, look="varied"))
    assert [kind for kind, _ in turns] == ["edit", "question"] * 8
    for index in range(8):
        scene = shapes.make_scene(shapes.scene_seed("train", FIRST_SCENE + index))
        (_, edit), (_, question) = turns[2 * index: 2 * index + 2]
        for conversation in (edit, question):
            (turn,) = conversation
            image, text = turn["content"]
            assert image["type"] == "image" and image["image"].size == (32, 32) and text["type"] == "text"
        assert edit[0]["content"][1]["text"] == shapes_tasks.make_edit(scene).instruction
        asked = question[0]["content"][1]["text"]
        if index % 4 == 3:
            assert asked == "Describe the image."
        else:
            assert asked in {pair["question"] for pair in shapes.vqa_pairs(scene)}
    # train-split seeds (even) past any demo's training scenes: never a test scene, never trained on
    assert shapes.scene_seed("train", FIRST_SCENE) % 2 == 0 and FIRST_SCENE > 100_000


def test_the_command_measures_and_writes_the_threshold(model_tiny_dir, tmp_path, monkeypatch, capsys):
    import mllm.chat_threshold as module

    model_dir = tmp_path / "model"
    shutil.copytree(model_tiny_dir, model_dir)
    seen = {}
    real_choose = module.choose_threshold

    def choose(edits, questions, margin):  # an untrained model's chances: the rule is the one above
        seen.update(edits=edits, questions=questions)
        return real_choose(edits, questions, margin)

    monkeypatch.setattr(module, "choose_threshold", choose)
    out = tmp_path / "figures.json"
    assert main(["chat-threshold", "--model", str(model_dir), "--scenes", "6", "--margin", "1.5", "--dry-run",
                 "--device", "cpu", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert len(seen["edits"]) == len(seen["questions"]) == 6 and figures["scenes"] == 6
    assert figures["threshold"] == real_choose(seen["edits"], seen["questions"], 1.5)
    assert figures["question_chance_max"] == pytest.approx(max(seen["questions"]))
    assert MLLMConfig.load(model_dir).chat_image_threshold is None  # --dry-run
    assert "left as it is" in capsys.readouterr().out
    monkeypatch.setattr(module, "choose_threshold", lambda edits, questions, margin: 0.0123)
    assert main(["chat-threshold", "--model", str(model_dir), "--scenes", "2", "--device", "cpu"]) == 0
    assert MLLMConfig.load(model_dir).chat_image_threshold == 0.0123
    assert "chat_image_threshold = 0.0123, written to" in capsys.readouterr().out
    assert main(["chat-threshold", "--model", str(tmp_path / "missing")]) == 2


def test_measure_counts_what_the_threshold_changes(model_tiny_dir, monkeypatch):
    """The shares with the threshold are the greedy decision or a chance at or over the threshold."""
    import mllm
    from mllm import generation

    decisions = iter([(0.9, True), (1e-5, False), (1e-3, False), (2e-5, False), (1e-6, False), (0.2, True)])
    monkeypatch.setattr(generation, "image_start_decisions", lambda model, conversations: [next(decisions)])
    figures = measure(mllm.load(model_tiny_dir, device="cpu"), scenes=3, margin=3.0, progress=False)
    # edits 0.9 (likeliest), 1e-3, 1e-6; questions 1e-5, 2e-5, 0.2 (likeliest): 3 x 0.2 = 0.6 >= 0.5: none
    assert figures["threshold"] is None
    assert figures["edits_starting_an_image_plain"] == figures["edits_starting_an_image"] == pytest.approx(33.3)
    assert figures["questions_starting_an_image"] == pytest.approx(33.3)
    decisions = iter([(0.9, True), (1e-5, False), (1e-3, False), (2e-5, False), (1e-6, False), (3e-6, False)])
    figures = measure(mllm.load(model_tiny_dir, device="cpu"), scenes=3, margin=3.0, progress=False)
    assert figures["threshold"] == pytest.approx(6e-5)  # 3 x 2e-5
    assert figures["edits_starting_an_image_plain"] == pytest.approx(33.3)
    assert figures["edits_starting_an_image"] == pytest.approx(66.7)  # 0.9 and 1e-3; not 1e-6
    assert figures["questions_starting_an_image"] == figures["questions_starting_an_image_plain"] == 0.0
