"""shapes-edit: deterministic, balanced held-out items; the judge's scoring (accuracy, per operation, kept) from
rendered targets and from a predictions file; a real run with the tiny untrained model."""

import json
from collections import Counter

import pytest
from PIL import Image

from eval import runner
from eval.suites import ScoreContext, get_suite
from eval.suites.shapes_edit import EXAMPLES_NAME, SCORED_NAME, render_scene
from mllm.config import EDIT_GUIDANCE_SCALE, EDIT_TEMPERATURE
from mllm.data.shapes import Scene, make_scene, scene_seed
from mllm.data.shapes_tasks import EDIT_OPERATIONS, make_edit, possible_operations


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mllm.init import init_model

    return init_model("tiny", "tiny", tmp_path_factory.mktemp("edit") / "model", seed=0)


def _suite(options=None):
    suite = get_suite("shapes-edit")
    suite.configure(options or {})
    return suite


def _scene(item, which: str) -> Scene:
    return Scene.from_dict({"seed": item.meta["scene_seed"], "objects": item.meta[which]})


def _save(tmp_path, item, scene: Scene) -> str:
    """A clean 48 px render of `scene` saved under tmp_path as the item's prediction; its path relative to it."""
    path = tmp_path / "images" / item.id / "0000.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    render_scene(scene, 48, "exact").save(path)
    return str(path.relative_to(tmp_path))


def test_items_are_held_out_balanced_round_robin_and_deterministic():
    suite = _suite()
    assert suite.kind == "edit" and not suite.needs_data and suite.primary_metric == "accuracy"
    assert (suite.images_per_prompt, suite.look, suite.image_size) == (1, "varied", 48)
    items = suite.load_items(None)
    assert Counter(item.meta["operation"] for item in items) == {op: 50 for op in EDIT_OPERATIONS}
    assert [item.meta["operation"] for item in items[:12]] == list(EDIT_OPERATIONS) * 2
    assert [item.id for item in items[:7]] == [f"{op}-000" for op in EDIT_OPERATIONS] + ["recolour-001"]
    assert len({item.id for item in items}) == len(items)
    seeds = [item.meta["scene_seed"] for item in items]
    assert seeds == sorted(set(seeds)) and all(seed % 2 == 1 for seed in seeds)  # held out, in index order
    # A scene that does not allow the operation in turn is skipped: the first items are the first fitting scenes.
    index, expected = 0, []
    while len(expected) < 12:
        scene = make_scene(scene_seed("test", index))
        operation = EDIT_OPERATIONS[len(expected) % len(EDIT_OPERATIONS)]
        if operation in possible_operations(scene):
            expected.append((scene.seed, make_edit(scene, operation=operation)))
        index += 1
    for item, (seed, edit) in zip(items, expected):
        assert item.meta["scene_seed"] == seed and item.prompt == edit.instruction == item.meta["instruction"]
        assert _scene(item, "target") == edit.target and _scene(item, "source") == edit.source
        assert item.image.size == (48, 48)
        assert item.image.tobytes() == render_scene(edit.source, 48, "varied").tobytes()
    again = _suite().load_items(None, limit=9)
    assert [(i.id, i.prompt, i.meta, i.image.tobytes()) for i in again] == [
        (i.id, i.prompt, i.meta, i.image.tobytes()) for i in items[:9]]

    other = _suite({"look": "other", "size": "40", "seeds": "2", "guidance": "both", "guidance_scale": "2"})
    first = other.load_items(None, limit=1)[0]
    assert first.id == items[0].id and first.image.size == (40, 40) and first.meta["look"] == "other"
    assert (other.images_per_prompt, other.guidance, other.guidance_scale) == (2, "both", 2.0)
    assert (_suite().guidance_scale, _suite().temperature) == (None, EDIT_TEMPERATURE)  # None: the model's own
    assert _suite({"temperature": "0"}).temperature == 0.0
    assert (_suite().image_guidance_scale, _suite({"image_guidance_scale": "1.25"}).image_guidance_scale) == (None, 1.25)
    with pytest.raises(ValueError, match="--option image_guidance_scale=0: must be positive"):
        _suite({"image_guidance_scale": "0"})
    with pytest.raises(ValueError, match="look"):
        _suite({"look": "blurry"})
    with pytest.raises(ValueError, match=r"--option temperature=-1: must be 0 \(greedy\) or more"):
        _suite({"temperature": "-1"})
    with pytest.raises(ValueError, match="--option guidance_scale='x': expected a number"):
        _suite({"guidance_scale": "x"})
    with pytest.raises(ValueError, match="size"):
        _suite({"size": "8"})
    # per_operation: more items per operation only add scenes after the default 50 of each
    more = _suite({"per_operation": "60"}).load_items(None)
    assert Counter(item.meta["operation"] for item in more) == {op: 60 for op in EDIT_OPERATIONS}
    assert [(i.id, i.prompt) for i in more[:len(items)]] == [(i.id, i.prompt) for i in items]
    assert len(_suite({"per_operation": "2"}).load_items(None)) == 2 * len(EDIT_OPERATIONS)
    with pytest.raises(ValueError, match="per_operation"):
        _suite({"per_operation": "0"})


def test_first_starts_the_items_at_a_later_held_out_scene():
    items = _suite({"first": "5000", "per_operation": "2"}).load_items(None)
    assert [item.meta["operation"] for item in items] == list(EDIT_OPERATIONS) * 2
    seeds = [item.meta["scene_seed"] for item in items]
    assert seeds[0] == scene_seed("test", 5000) and seeds == sorted(seeds)
    default = {item.meta["scene_seed"] for item in _suite({"per_operation": "100"}).load_items(None)}
    assert not default & set(seeds)  # none of the demo's 600 items
    # the same round-robin as from scene 0: scene 5000 + i gets the operation in turn when it allows it
    index, expected = 5000, []
    while len(expected) < len(items):
        scene = make_scene(scene_seed("test", index))
        operation = EDIT_OPERATIONS[len(expected) % len(EDIT_OPERATIONS)]
        if operation in possible_operations(scene):
            expected.append((scene.seed, make_edit(scene, operation=operation).instruction))
        index += 1
    assert [(item.meta["scene_seed"], item.prompt) for item in items] == expected
    with pytest.raises(ValueError, match="--option first=-1: must be at least 0"):
        _suite({"first": "-1"})


def test_rendered_targets_score_100_and_wrong_edits_lower_it(tmp_path):
    suite = _suite()
    items = suite.load_items(None, limit=12)  # two items per operation
    context = ScoreContext(out=tmp_path)
    perfect = {item.id: {"images": [_save(tmp_path, item, _scene(item, "target"))]} for item in items}
    results = suite.score(perfect, items, context)
    metrics = results["metrics"]
    assert metrics["accuracy"] == 100.0 and metrics["kept"] == 100.0 and metrics["copied"] == 0.0
    assert all(metrics[f"accuracy_{op}"] == 100.0 for op in EDIT_OPERATIONS)
    assert metrics["images"] == 12 and results["count"] == 12
    assert set(results["breakdown"]["operation"]) == set(EDIT_OPERATIONS)

    # The two removals are not done (the source again): those items are wrong, but every untouched object is
    # still there. The first addition drops every source object (only the new one drawn): wrong, nothing kept.
    wrong = dict(perfect)
    removals = [item for item in items if item.meta["operation"] == "remove"]
    for item in removals:
        wrong[item.id] = {"images": [_save(tmp_path, item, _scene(item, "source"))]}
    add = next(item for item in items if item.meta["operation"] == "add")
    source, target = _scene(add, "source"), _scene(add, "target")
    new_only = Scene(objects=tuple(obj for obj in target.objects if obj not in source.objects), seed=target.seed)
    wrong[add.id] = {"images": [_save(tmp_path, add, new_only)]}
    untouched = {item.id: sum(obj in _scene(item, "target").objects for obj in _scene(item, "source").objects)
                 for item in items}
    total = sum(untouched.values())

    results = suite.score(wrong, items, context)
    metrics = results["metrics"]
    assert metrics["accuracy"] == pytest.approx(100 * 9 / 12)
    assert metrics["accuracy_remove"] == 0.0 and metrics["accuracy_add"] == 50.0
    assert metrics["accuracy_recolour"] == metrics["accuracy_replace"] == 100.0
    assert metrics["kept"] == pytest.approx(100 * (total - untouched[add.id]) / total)
    assert metrics["copied"] == pytest.approx(100 * 2 / 12)
    records = {r["id"]: r for r in map(json.loads, (tmp_path / SCORED_NAME).read_text().splitlines())}
    assert len(records) == 12
    removal = records[removals[0].id]
    assert removal["instruction"].startswith("remove the ") and removal["operation"] == "remove"
    assert removal["outputs"][0]["detected"] == removal["source"] != removal["target"]
    assert removal["outputs"][0]["correct"] is False
    assert records[add.id]["outputs"][0]["kept"] == 0
    sheet = Image.open(tmp_path / EXAMPLES_NAME)
    assert sheet.size[1] > 12 * 96  # two rows per operation
    assert results["files"]["examples"] == str(tmp_path / EXAMPLES_NAME)
    assert any(EXAMPLES_NAME in note for note in results["notes"])


def test_eval_score_reads_a_predictions_file_with_relative_image_paths(tmp_path, capsys):
    items = _suite().load_items(None, limit=6)
    rows = [{"id": item.id, "instruction": item.prompt,
             "images": [_save(tmp_path, item, _scene(item, "source" if k == 0 else "target"))]}
            for k, item in enumerate(items)]
    (tmp_path / runner.PREDICTIONS_NAME).write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = runner.score_file("shapes-edit", tmp_path / runner.PREDICTIONS_NAME)
    assert results["metrics"]["accuracy"] == pytest.approx(100 * 5 / 6)
    assert results["metrics"]["accuracy_recolour"] == 0.0 and results["count"] == 6
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"accuracy {100 * 5 / 6:.2f}"
    assert any("294 of 300 items had no images" in note for note in results["notes"])


def test_a_real_run_with_the_tiny_model(model_dir, tmp_path):
    out = tmp_path / "run"
    settings = runner.EvalSettings(model=str(model_dir), suite="shapes-edit", out=str(out), limit=6, batch_size=4,
                                   progress=False, options={"seeds": "2", "look": "other", "image_guidance_scale": "1.2"})
    results = runner.evaluate(settings)
    saved = json.loads((out / runner.RESULTS_NAME).read_text())
    assert saved["suite"] == "shapes-edit" and saved["count"] == 6 and saved["guidance"] == "instruction"
    assert saved["image_guidance_scale"] == 1.2
    assert saved["guidance_scale"] == EDIT_GUIDANCE_SCALE  # the model's own, recorded as a number
    assert {"accuracy", "kept", "copied", *(f"accuracy_{op}" for op in EDIT_OPERATIONS)} <= set(saved["metrics"])
    for name, value in saved["metrics"].items():
        if name != "images":
            assert 0.0 <= value <= 100.0, name
    assert saved["metrics"]["images"] == 12 and results["metrics"] == saved["metrics"]
    rows = [json.loads(line) for line in (out / runner.PREDICTIONS_NAME).read_text().splitlines()]
    assert len(rows) == 6 and all(len(row["images"]) == 2 and row["instruction"] for row in rows)
    # the sources were rendered at the model's image size (32 px for the tiny model), the edits come out so too
    assert Image.open(out / rows[0]["images"][0]).size == (32, 32)
    assert (out / EXAMPLES_NAME).is_file() and (out / SCORED_NAME).is_file()
