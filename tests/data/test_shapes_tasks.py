"""Editing and multi-image tasks of the shapes world (`mllm.data.shapes_tasks`), their records in shards
(several images per record, pre-tokenized too) and the samples they expand into."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from mllm.data.judge import parse_image
from mllm.data.shapes import (
    CELLS,
    COLORS,
    SHAPES,
    Scene,
    ShapeObject,
    caption,
    make_scene,
    render,
    scene_seed,
)
from mllm.data.shapes_tasks import (
    EDIT_OPERATIONS,
    make_edit,
    multi_qa,
    possible_operations,
    reference,
    task_records,
)
from mllm.data.shards import DataStats, read_records, read_samples, record_samples, write_shards


def _scene(*objects: tuple[str, str, str, str], seed: int = 0) -> Scene:
    return Scene(objects=tuple(ShapeObject(*obj) for obj in objects), seed=seed)


def _changed(source: Scene, target: Scene) -> tuple[set, set]:
    """(objects only in the source, objects only in the target)."""
    return set(source.objects) - set(target.objects), set(target.objects) - set(source.objects)


@pytest.mark.parametrize("operation", EDIT_OPERATIONS)
def test_every_operation_changes_exactly_one_thing(operation):
    seen = 0
    for index in range(200):
        scene = make_scene(scene_seed("train", index))
        if operation not in possible_operations(scene):
            continue
        edit = make_edit(scene, operation=operation)
        gone, new = _changed(scene, edit.target)
        assert edit.target.seed == scene.seed and edit.operation == operation
        if operation == "add":
            assert not gone and len(new) == 1
            (added,) = new
            assert edit.instruction == f"add {added.describe()}"
            assert edit.change == f"{added.describe(with_cell=False)} was added {added.describe().split(' ', 4)[-1]}"
        elif operation == "remove":
            assert len(gone) == 1 and not new
            assert edit.instruction == f"remove the {reference(scene, next(iter(gone)))}"
        else:
            (old,), (changed,) = gone, new
            differing = [f for f in ("color", "shape", "size", "cell") if getattr(old, f) != getattr(changed, f)]
            field = {"recolour": "color", "replace": "shape", "resize": "size", "move": "cell"}[operation]
            assert differing == [field]
            name = reference(scene, old)
            value = getattr(changed, field)
            expected = {
                "recolour": f"make the {name} {value}", "move": f"move the {name} to the {value}",
                "resize": f"make the {name} {value}",
                "replace": f"turn the {name} into {'an' if value[0] in 'aeiou' else 'a'} {value}",
            }[operation]
            assert edit.instruction == expected
            if operation == "move":
                assert value not in [obj.cell for obj in scene.objects]
        seen += 1
    assert seen >= 20


def test_objects_are_named_by_shape_or_by_colour_and_shape():
    scene = _scene(("red", "circle", "small", "top left"), ("blue", "circle", "large", "center"),
                   ("red", "square", "small", "bottom"))
    assert reference(scene, scene.objects[0]) == "red circle"
    assert reference(scene, scene.objects[2]) == "square"
    twins = _scene(("red", "circle", "small", "top left"), ("red", "circle", "large", "center"))
    assert reference(twins, twins.objects[0]) is None
    # Only "add" names no object; two indistinguishable objects leave nothing else.
    assert possible_operations(twins) == ["add"]
    with pytest.raises(ValueError, match="allows no 'recolour'"):
        make_edit(twins, operation="recolour")
    with pytest.raises(ValueError, match="unknown edit operation"):
        make_edit(twins, operation="rotate")
    lone = _scene(("red", "circle", "small", "top left"))
    assert "remove" not in possible_operations(lone)  # a scene is never empty


def test_edits_are_deterministic_and_cover_every_operation():
    scenes = [make_scene(scene_seed("train", index)) for index in range(600)]
    first = [make_edit(scene) for scene in scenes]
    assert first == [make_edit(scene) for scene in scenes]
    counts = Counter(edit.operation for edit in first)
    assert set(counts) == set(EDIT_OPERATIONS)
    assert min(counts.values()) >= 50  # remove needs two objects: the rarest, still common


def test_the_judge_reads_every_edit_target_exactly():
    for index in range(60):
        edit = make_edit(make_scene(scene_seed("test", index)))
        assert parse_image(render(edit.target, 48)) == list(edit.target.objects)


def test_multi_image_questions_have_exact_answers():
    one = _scene(("red", "circle", "small", "top left"))
    three = _scene(("red", "circle", "small", "top left"), ("blue", "square", "large", "center"),
                   ("green", "triangle", "small", "bottom"), seed=1)
    pairs = multi_qa(one, three)
    by_question = {pair["question"]: pair["answer"] for pair in pairs}
    assert by_question["How many objects are in the first image?"] == "1"
    assert by_question["How many objects are in the second image?"] == "3"
    assert by_question["Which image has more objects?"] == "the second"
    assert multi_qa(three, one)[2]["answer"] == "the first"
    assert multi_qa(one, one)[2]["answer"] == "neither"
    assert not any(pair["type"] == "change" for pair in pairs)
    singles = [pair for pair in pairs if pair["type"] == "single"]
    assert len(singles) == 2
    assert all(pair["question"].endswith(f" in the {which} image?") for pair, which in zip(singles, ("first", "second")))
    edit = make_edit(three, operation="recolour")
    change = [p for p in multi_qa(three, edit.target, change=edit.change) if p["type"] == "change"]
    assert change == [{"question": "What changed between the two images?", "answer": edit.change, "type": "change"}]
    assert edit.change.startswith("the ") and edit.change.split()[-1] in COLORS


def test_single_image_questions_are_answered_from_their_own_image():
    for index in range(40):
        first, second = make_scene(scene_seed("train", index)), make_scene(scene_seed("train", index + 1000))
        for pair in multi_qa(first, second):
            if pair["type"] != "single":
                continue
            scene = first if pair["question"].endswith("in the first image?") else second
            if pair["question"].startswith("How many objects"):
                assert pair["answer"] == str(len(scene.objects))
            if pair["question"].startswith("What shape is the"):
                assert pair["answer"] in SHAPES


def test_task_records_round_trip_through_shards_and_pretokenized_codes(tmp_path):
    seeds = [scene_seed("train", index) for index in range(4)]
    records = [record for seed in seeds for record in task_records(seed, 48)]
    write_shards(iter(records), tmp_path / "shards", progress=False)
    read = list(read_records(tmp_path / "shards", split=False))
    assert [r["key"] for r in read] == [r["key"] for r in records]
    for original, back in zip(records, read):
        assert len(back["images"]) == 2 and back["image"] is back["images"][0]
        for image, again in zip(original["images"], back["images"]):
            assert np.array_equal(np.asarray(image), np.asarray(again))
    samples = list(read_samples(tmp_path / "shards", tasks=("edit", "multi")))
    edits = [s for s in samples if s.task == "edit"]
    assert len(edits) == 4
    user, reply = edits[0].messages
    assert [p["type"] for p in user["content"]] == ["text", "image"]  # the instruction first: a fixed copy offset
    assert user["content"][0]["text"] == records[0]["edit"]["instruction"]
    # the reply describes the result (the target scene's caption), then draws it
    assert [p["type"] for p in reply["content"]] == ["text", "image"]
    assert reply["content"][0]["text"] == caption(Scene.from_dict(records[0]["edit"]["target"]))
    assert np.array_equal(np.asarray(reply["content"][1]["image"]), np.asarray(records[0]["images"][1]))
    multi = [s for s in samples if s.task == "multi"]
    assert len(multi) == sum(len(r["multi_qa"]) for r in records)
    assert [p["type"] for p in multi[0].messages[0]["content"]] == ["image", "image", "text"]

    # Pre-tokenized: one grid per image, in order (fake codes: the image's index in the record).
    coded = [{**{k: v for k, v in r.items() if k != "images"}, "codes": [np.full((6, 6), i, np.int16) for i in (0, 1)]}
             for r in records]
    write_shards(iter(coded), tmp_path / "codes", progress=False)
    (back,) = [r for r in read_records(tmp_path / "codes", split=False) if r["key"] == records[0]["key"]]
    assert [int(grid[0, 0]) for grid in back["codes_list"]] == [0, 1] and back["images"] == []
    (edit,) = [s for s in record_samples(back, ("edit",))]
    assert torch.equal(edit.messages[1]["content"][-1]["codes"], torch.ones(6, 6, dtype=torch.long))


def test_a_two_image_task_on_a_one_image_record_is_skipped_and_counted(tmp_path):
    record = task_records(scene_seed("train", 0), 48)[0]
    stats = DataStats()
    one = {"key": "k", "image": record["images"][0], "images": record["images"][:1],
           "json": {"edit": record["edit"], "multi_qa": record["multi_qa"]}}
    assert record_samples(one, ("edit", "multi"), stats) == []
    assert stats.skipped["missing_image"] == 1 + len(record["multi_qa"])
    bad = {"key": "k", "image": None, "images": record["images"], "json": {"edit": {"instruction": ""}}}
    assert record_samples(bad, ("edit",), stats) == [] and stats.skipped["malformed_field"] == 1


def test_untouched_objects_keep_their_cells_after_a_move():
    scene = _scene(("red", "circle", "small", "top left"), ("blue", "square", "large", "center"))
    edit = make_edit(scene, operation="move")
    moved = [obj for obj in edit.target.objects if obj not in scene.objects]
    assert len(moved) == 1 and moved[0].cell in CELLS
    assert sum(obj in edit.target.objects for obj in scene.objects) == 1
    assert replace(moved[0], cell=next(o for o in scene.objects if o not in edit.target.objects).cell) in scene.objects


def test_the_cli_writes_each_scenes_task_records_after_it(tmp_path):
    from mllm.cli import main as mllm_main
    from mllm.data.shapes import iter_samples

    out = tmp_path / "llm"
    argv = ["data", "shapes", "--n", "3", "--out", str(out), "--size", "48", "--look", "varied", "--tasks",
            "--no-progress"]
    assert mllm_main(argv) == 0
    records = list(read_records(out, split=False))
    scenes = list(iter_samples(3, size=48, look="varied"))
    expected_keys = [key for s in scenes for key in (s["key"], f"{s['key']}-edit", f"{s['key']}-pair")]
    assert [r["key"] for r in records] == expected_keys
    for index, sample in enumerate(scenes):
        base, edit, pair = records[3 * index : 3 * index + 3]
        assert len(base["images"]) == 1 and len(edit["images"]) == 2 and len(pair["images"]) == 2
        # The edit's source is the scene's own render; its target is what the judge reads as the target scene.
        assert np.array_equal(np.asarray(edit["images"][0]), np.asarray(sample["image"]))
        target = Scene.from_dict(edit["json"]["edit"]["target"])
        assert parse_image(edit["images"][1]) == list(target.objects)
        assert edit["json"]["look"] == "varied"
    with pytest.raises(ValueError, match="only the wds format"):
        from mllm.data.shapes import write_shapes_data

        write_shapes_data(tmp_path / "x", 2, format="llava", tasks=True)


def test_training_draws_edits_with_their_dropped_branches_and_both_orders():
    """draw_conversations: edit_drops = (instruction, both) and edit_image_first, in their shares."""
    from training.components import draw_conversations, group_vqa_turns

    class Processor:  # what draw_conversations asks of a processor
        @staticmethod
        def unconditional_draw_conversation():
            return [{"role": "user", "content": [{"type": "text", "text": "Draw: "}]}]

    records = [task_records(scene_seed("train", index), 48)[0] for index in range(20)]
    pools = {"edit": [s for r in records for s in record_samples(
        {"key": r["key"], "image": r["images"][0], "images": r["images"], "json": r}, ("edit",))]}
    drawn = draw_conversations(pools, {"edit": 1.0}, Processor, 0.0, 4000, seed=0, edit_drops=(0.1, 0.2),
                               edit_image_first=0.5, edit_describe=True)
    kinds = Counter()
    for task, messages in drawn:
        assert task == "edit" and messages[-1]["role"] == "assistant"
        types = [part["type"] for part in messages[0]["content"]]
        reply = [part["type"] for part in messages[-1]["content"]]
        if messages[0] == Processor.unconditional_draw_conversation()[0]:
            kinds["both dropped"] += 1
            assert reply == ["image"]  # what is left cannot tell the result's description
        elif types == ["image"]:
            kinds["instruction dropped"] += 1
            assert reply == ["image"]
        else:
            assert reply == ["text", "image"]  # the result described, then drawn
            kinds[{("image",): "instruction dropped", ("text", "image"): "instruction first",
                   ("image", "text"): "image first"}[tuple(types)]] += 1
    shares = {kind: count / len(drawn) for kind, count in kinds.items()}
    assert abs(shares["instruction dropped"] - 0.1) < 0.03 and abs(shares["both dropped"] - 0.2) < 0.03
    assert abs(shares["image first"] - 0.35) < 0.04 and abs(shares["instruction first"] - 0.35) < 0.04
    # edit_describe false (the default): image-only replies from the same records
    plain = draw_conversations(pools, {"edit": 1.0}, Processor, 0.0, 50, seed=0)
    assert all([part["type"] for part in messages[-1]["content"]] == ["image"] for _, messages in plain)
    # Questions over two images group like VQA turns: the images once, every question of the record.
    multi = [s for r in records for s in record_samples(
        {"key": r["key"], "image": r["images"][0], "images": r["images"], "json": r}, ("multi",))]
    grouped = group_vqa_turns(multi, 12, seed=0, task="multi")
    assert len(grouped) == len(records) and all(s.task == "multi" for s in grouped)
    first_turn = [part["type"] for part in grouped[0].messages[0]["content"]]
    assert first_turn == ["image", "image", "text"] and len(grouped[0].messages) == 2 * len(records[0]["multi_qa"])


def test_training_weights_edits_by_operation():
    """edit_operations: an operation of weight w is drawn w times as often per sample; 0 leaves it out; the
    samples carry their record's operation; the recipe names only known operations."""
    from training.components import LLMTrainConfig, draw_conversations

    records = [task_records(scene_seed("train", index), 48)[0] for index in range(60)]
    pools = {"edit": [s for r in records for s in record_samples(
        {"key": r["key"], "image": r["images"][0], "images": r["images"], "json": r}, ("edit",))]}
    assert [s.operation for s in pools["edit"]] == [r["edit"]["operation"] for r in records]
    operation_of = {id(s.messages): s.operation for s in pools["edit"]}
    held = Counter(s.operation for s in pools["edit"])
    assert held["move"] > 0 and held["recolour"] > 0

    def shares(weights):
        drawn = draw_conversations(pools, {"edit": 1.0}, None, 0.0, 6000, seed=0, edit_describe=True,
                                   edit_operations=weights)
        counts = Counter(operation_of[id(messages)] for _, messages in drawn)
        return {operation: counts[operation] / len(drawn) for operation in held}

    plain = shares({})
    weighted = shares({"move": 3.0, "add": 0})
    total = sum(held.values())
    for operation, count in held.items():
        assert abs(plain[operation] - count / total) < 0.03
    assert weighted["add"] == 0
    expected_total = total + 2 * held["move"] - held["add"]
    assert abs(weighted["move"] - 3 * held["move"] / expected_total) < 0.03
    assert abs(weighted["recolour"] - held["recolour"] / expected_total) < 0.03
    with pytest.raises(ValueError, match="edit operation"):
        LLMTrainConfig(data="d", out="o", edit_operations={"shrink": 2.0}).validate()
    with pytest.raises(ValueError, match=">= 0"):
        LLMTrainConfig(data="d", out="o", edit_operations={"move": -1.0}).validate()
    with pytest.raises(ValueError, match="no edit sample"):
        draw_conversations(pools, {"edit": 1.0}, None, 0.0, 10, seed=0,
                           edit_operations=dict.fromkeys(held, 0.0))


def test_training_draws_a_two_image_question_type_alone(tmp_path):
    """multi_types: a question type's two-image questions become a pool of their own, one question an example,
    drawn at its weight beside the tasks; the samples carry their question's type; a type the data lacks and a
    negative weight are refused."""
    from mllm.data.shapes import write_shapes_data
    from training.components import (
        LLMTrainConfig,
        draw_conversations,
        load_task_pools,
        mixture_weights,
    )

    write_shapes_data(tmp_path / "d", 12, size=48, tasks=True)
    records = [record for record in read_records(str(tmp_path / "d")) if "multi_qa" in record["json"]]
    changes = [qa for record in records for qa in record["json"]["multi_qa"] if qa["type"] == "change"]
    assert len(changes) == 12  # one a scene: its edit record's

    cfg = LLMTrainConfig(data=str(tmp_path / "d"), out="o", tasks={"caption": 1.0},
                         multi_types={"change": 3.0, "count": 0.0})
    cfg.validate()
    assert mixture_weights(cfg) == {"caption": 1.0, "multi/change": 3.0, "multi/count": 0.0}
    pools = load_task_pools(cfg.data, cfg.tasks, 12, 0, cfg.multi_types)
    assert sorted(pools) == ["caption", "multi/change"]  # the multi task itself is not trained (weight 0)
    alone = pools["multi/change"]
    assert [s.messages[1]["content"][0]["text"] for s in alone] == [qa["answer"] for qa in changes]
    assert all(s.task == "multi" and s.question_type == "change" and len(s.messages) == 2 for s in alone)
    assert [part["type"] for part in alone[0].messages[0]["content"]] == ["image", "image", "text"]

    drawn = draw_conversations(pools, mixture_weights(cfg), None, 0.0, 2000, seed=0)
    share = Counter(task for task, _ in drawn)["multi/change"] / len(drawn)
    assert abs(share - 0.75) < 0.04
    # With the multi task trained too, it keeps every question, grouped by record.
    both = load_task_pools(cfg.data, {"caption": 1.0, "multi": 1.0}, 12, 0, {"change": 1.0})
    assert len(both["multi"]) == len(records) and len(both["multi/change"]) == 12

    with pytest.raises(ValueError, match="no two-image question of type 'shape'.*change"):
        load_task_pools(cfg.data, cfg.tasks, 12, 0, {"shape": 1.0})
    with pytest.raises(ValueError, match="multi_types.*>= 0"):
        LLMTrainConfig(data="d", out="o", multi_types={"change": -1.0}).validate()
    # A question type alone is a mixture of its own: no task weight needed; with neither, refused.
    LLMTrainConfig(data="d", out="o", tasks={"caption": 0.0}, multi_types={"change": 1.0}).validate()
    with pytest.raises(ValueError, match="at least one positive"):
        LLMTrainConfig(data="d", out="o", tasks={"caption": 0.0}, multi_types={"change": 0.0}).validate()


def test_pretokenizing_encodes_a_repeated_image_once():
    """A scene's edit and pair records repeat its image: pretokenize encodes it once, with the same codes."""
    from mllm.data.pretokenize import pretokenize_records

    class Tokenizer:  # codes from the pixels: the mean of each 8x8 patch's red channel, mod K
        codebook_size = 1024
        encoded = 0

        def encode(self, images):
            Tokenizer.encoded += len(images)
            arrays = np.stack([np.asarray(image)[..., 0].astype(np.int64) for image in images])
            patches = arrays.reshape(len(images), 6, 8, 6, 8).sum(axis=(2, 4))
            return torch.from_numpy(patches % 1024)

    records = []
    for index in range(5):
        seed = scene_seed("train", index)
        from mllm.data.shapes import make_sample

        sample = make_sample(seed, 48)
        records.append({"key": sample["key"], "image": sample["image"], "images": [sample["image"]], "json": {}})
        for record in task_records(seed, 48):
            records.append({"key": record["key"], "image": record["images"][0], "images": record["images"],
                            "json": {}})
    out = list(pretokenize_records(iter(records), Tokenizer(), 4, "cpu", "fp32", DataStats()))
    assert Tokenizer.encoded == 5 * 3  # per scene: its image, the edit's target, the pair's second scene
    for index in range(5):
        base, edit, pair = out[3 * index : 3 * index + 3]
        assert np.array_equal(edit["codes"][0], base["codes"]) and np.array_equal(pair["codes"][0], base["codes"])
        fresh = Tokenizer().encode(records[3 * index + 1]["images"])
        assert np.array_equal(edit["codes"][1], fresh[1].numpy())
