"""Generation suites: shapes-t2i items and judging, GenEval export layout, FID / CLIP score, tokenizer."""

import argparse
import json
import math
from collections import Counter

import pytest

from eval.suites import ScoreContext, get_suite
from mllm.data.judge import parse_prompt
from mllm.data.shapes import COLORS, Scene, ShapeObject, make_scene, render


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from mllm.init import init_model

    return init_model("tiny", "tiny", tmp_path_factory.mktemp("model") / "m", seed=0)


# ------------------------------------------------------------------------------------------- shapes-t2i
def _scene_for(prompt: str, recolor: bool = False) -> Scene:
    """A scene satisfying `prompt` (sizes default to large, cells to the centre / free cells); with
    `recolor`, every object gets a colour the prompt never names, so the judge must reject it."""
    specs = parse_prompt(prompt)
    unused = [c for c in COLORS if c not in {spec["color"] for spec in specs}]
    free = iter(
        cell for cell in ("center", "top left", "bottom right") if cell not in {s.get("cell") for s in specs}
    )
    objects = [
        ShapeObject(
            unused[0] if recolor else spec["color"],
            spec["shape"],
            spec.get("size", "large"),
            spec.get("cell") or next(free),
        )
        for spec in specs
    ]
    return Scene(objects=tuple(objects), seed=0)


def test_shapes_t2i_items_cover_the_categories_parse_and_are_deterministic():
    suite = get_suite("shapes-t2i")
    assert suite.kind == "draw" and not suite.needs_data and suite.images_per_prompt == 4
    assert suite.primary_metric == "accuracy"
    items = suite.load_items(None)
    counts = Counter(item.meta["category"] for item in items)
    assert counts == {"single_object": 18, "size": 36, "position": 36, "two_objects": 36, "full_scene": 36}
    assert len({item.id for item in items}) == len(items) == len({item.prompt for item in items})
    for item in items:
        specs = parse_prompt(item.prompt)
        category = item.meta["category"]
        if category in ("single_object", "size", "position", "two_objects"):
            assert len(specs) == (2 if category == "two_objects" else 1)
        else:  # complete descriptions: every attribute of every object
            assert all(set(spec) == {"size", "color", "shape", "cell"} for spec in specs)
    assert [(i.id, i.prompt) for i in get_suite("shapes-t2i").load_items(None)] == [
        (i.id, i.prompt) for i in items
    ]
    assert items[0].prompt == "a red circle" and items[2].prompt == "a red circle at the top left"
    # Round-robin order: a short --limit still samples every category.
    assert {item.meta["category"] for item in suite.load_items(None, limit=5)} == set(counts)
    # Scene categories come from held-out (odd-seed) scenes, rendered to satisfy their own prompts.
    from mllm.data.judge import score_prompt

    for item in items:
        if "scene_seed" in item.meta:
            assert item.meta["scene_seed"] % 2 == 1
            assert score_prompt(render(make_scene(item.meta["scene_seed"])), item.prompt)["correct"]


def test_shapes_t2i_scores_rendered_predictions(tmp_path):
    suite = get_suite("shapes-t2i")
    items = {item.id: item for item in suite.load_items(None)}
    # item id -> how many of its 4 images are right (the rest get the wrong colour).
    plan = {
        "single_object-000": 4,
        "single_object-001": 4,
        "size-000": 2,
        "position-000": 0,
        "two_objects-000": 3,
        "full_scene-000": 4,
    }
    chosen = [items[item_id] for item_id in plan]
    predictions = {}
    for item in chosen:
        right = plan[item.id]
        images = [render(_scene_for(item.prompt, recolor=k >= right)) for k in range(4)]
        predictions[item.id] = {"id": item.id, "images": suite.save_images(tmp_path, item, images)}
    assert (tmp_path / predictions["size-000"]["images"][3]).is_file()

    results = suite.score(predictions, chosen, ScoreContext(out=tmp_path))
    metrics, by_category = results["metrics"], results["breakdown"]["category"]
    assert {c: row["accuracy"] for c, row in by_category.items()} == pytest.approx(
        {"single_object": 100.0, "size": 50.0, "position": 0.0, "two_objects": 75.0, "full_scene": 100.0}
    )
    assert metrics["accuracy"] == pytest.approx((100 + 50 + 0 + 75 + 100) / 5)  # mean of categories
    assert metrics["image_accuracy"] == pytest.approx(100 * 17 / 24)  # mean of images
    assert metrics["all_correct"] == pytest.approx(100 * 3 / 6)  # 2 single objects + the full scene
    assert by_category["two_objects"]["all_correct"] == 0.0 and by_category["single_object"]["prompts"] == 2
    assert metrics["shape_accuracy"] == 100.0 and metrics["color_accuracy"] < 100.0
    assert results["count"] == 6 and metrics["images"] == 24

    # A full-scene prompt is a complete description: an extra object makes it wrong.
    item = items["full_scene-000"]
    scene = make_scene(item.meta["scene_seed"])
    free = next(
        cell for cell in ("top left", "center", "bottom right") if cell not in {o.cell for o in scene.objects}
    )
    crowded = Scene(objects=scene.objects + (ShapeObject("red", "circle", "small", free),), seed=0)
    paths = suite.save_images(tmp_path / "crowded", item, [render(crowded)])
    results = suite.score({item.id: {"images": paths}}, [item], ScoreContext(out=tmp_path / "crowded"))
    assert results["metrics"]["accuracy"] == 0.0 and any("differ from seeds=4" in n for n in results["notes"])


def test_shapes_t2i_missing_images_and_options(tmp_path):
    suite = get_suite("shapes-t2i")
    items = suite.load_items(None, limit=2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        suite.score({items[0].id: {"images": ["nowhere/0000.png"]}}, items, ScoreContext(out=tmp_path))
    with pytest.raises(ValueError, match="none of the 2 items"):
        suite.score({}, items, ScoreContext(out=tmp_path))
    suite.configure({"seeds": "2"})
    assert suite.images_per_prompt == 2
    with pytest.raises(ValueError, match="seeds"):
        suite.configure({"seeds": "many"})


def test_shapes_t2i_data_file_overrides_and_is_checked(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "a blue square on the left", "category": "position"}\n\n'
        '{"prompt": "a large green triangle"}\n'
    )
    items = get_suite("shapes-t2i").load_items(str(path))
    assert [(i.prompt, i.meta["category"]) for i in items] == [
        ("a blue square on the left", "position"),
        ("a large green triangle", "custom"),
    ]
    path.write_text('{"prompt": "a red circle"}\n{"prompt": "two red circles", "category": "counting"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: the shapes judge cannot score"):
        get_suite("shapes-t2i").load_items(str(path))


# ------------------------------------------------------------------------------------------- geneval-export
GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "counting",
        "include": [{"class": "cat", "count": 2}],
        "exclude": [{"class": "cat", "count": 3}],
        "prompt": "a photo of two cats",
    },
    {
        "tag": "colors",
        "include": [{"class": "car", "count": 1, "color": "red"}],
        "prompt": "a photo of a red car",
    },
]


def test_geneval_export_layout(tmp_path):
    from PIL import Image

    data = tmp_path / "prompts"
    data.mkdir()
    (data / "evaluation_metadata.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in GENEVAL_LINES)
    )
    suite = get_suite("geneval-export")
    assert suite.kind == "draw" and suite.images_per_prompt == 4 and suite.needs_data
    items = suite.load_items(str(data))  # a folder holding the file
    assert [i.id for i in items] == ["00000", "00001", "00002"]
    assert items[1].prompt == "a photo of two cats" and items[1].meta["tag"] == "counting"
    assert [i.id for i in suite.load_items(str(data / "evaluation_metadata.jsonl"), limit=2)] == [
        "00000",
        "00001",
    ]

    out = tmp_path / "out"
    predictions = {}
    for item in items[:2]:
        images = [Image.new("RGB", (16, 16), (k * 60, 0, 0)) for k in range(4)]
        predictions[item.id] = {"id": item.id, "images": suite.save_images(out, item, images)}
    assert predictions["00001"]["images"] == [f"00001/samples/{k:04d}.png" for k in range(4)]
    lines = (out / "00001" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == GENEVAL_LINES[1]
    assert sorted(p.name for p in (out / "00000" / "samples").iterdir()) == [f"{k:04d}.png" for k in range(4)]
    assert Image.open(out / "00000" / "samples" / "0003.png").getpixel((0, 0)) == (180, 0, 0)

    results = suite.score(predictions, items, ScoreContext(out=out))
    assert results["metrics"]["complete_prompts"] == pytest.approx(100 * 2 / 3)
    assert results["metrics"]["images"] == 8 and results["count"] == 3
    assert results["breakdown"]["tag"]["colors"]["complete_prompts"] == 0.0
    assert any(
        "evaluation/evaluate_images.py" in note and "summary_scores.py" in note for note in results["notes"]
    )
    assert any("00002: metadata.jsonl missing or different, 0/4 samples" in note for note in results["notes"])


def test_geneval_export_rejects_bad_metadata(tmp_path):
    suite = get_suite("geneval-export")
    with pytest.raises(ValueError, match="needs --data"):
        suite.load_items(None)
    with pytest.raises(FileNotFoundError, match="evaluation_metadata.jsonl"):
        suite.load_items(str(tmp_path))
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text('{"prompt": "a photo of a dog"}\n')
    with pytest.raises(ValueError, match=r":1: expected a JSON object with \"prompt\" and \"tag\""):
        suite.load_items(str(path))


# ------------------------------------------------------------------------------------------- fid
def _fid_predictions(suite, out, items, images):
    return {
        item.id: {"id": item.id, "images": suite.save_images(out, item, [image])}
        for item, image in zip(items, images)
    }


def test_fid_on_the_teacher_features(tmp_path, tiny_model):
    from mllm.data.shapes import Scene as SceneType

    suite = get_suite("fid")
    assert suite.kind == "draw" and suite.images_per_prompt == 1 and not suite.needs_data
    items = suite.load_items(None, limit=12)
    assert len(items) == 12 and all(int(item.id) % 2 == 1 for item in items)  # held-out (odd) scene seeds
    references = [render(SceneType.from_dict(item.meta["scene"])) for item in items]
    options = {"device": "cpu", "batch_size": "5"}

    same = _fid_predictions(suite, tmp_path / "same", items, references)
    results = suite.score(
        same, items, ScoreContext(out=tmp_path / "same", model=str(tiny_model), options=options)
    )
    assert 0 <= results["metrics"]["fid"] < 1e-6
    assert results["count"] == 12 and results["metrics"]["images"] == 12
    assert any("not comparable to published FID" in note for note in results["notes"])
    assert any("CLIP score skipped" in note for note in results["notes"])

    shifted = [render(make_scene(2 * index)).rotate(90) for index in range(12)]  # other scenes, turned
    other = _fid_predictions(suite, tmp_path / "other", items, shifted)
    different = suite.score(
        other, items, ScoreContext(out=tmp_path / "other", model=str(tiny_model), options=options)
    )
    assert different["metrics"]["fid"] > 1e-3

    # The teacher may also come from the tokenizer folder itself (eval-score has no --model).
    from_option = suite.score(
        same,
        items,
        ScoreContext(
            out=tmp_path / "same", options={**options, "teacher": str(tiny_model / "vision_tokenizer")}
        ),
    )
    assert from_option["metrics"]["fid"] < 1e-6


def test_fid_without_a_feature_source_says_what_to_pass(tmp_path):
    from eval.suites.fid import FeatureSourceError

    suite = get_suite("fid")
    items = suite.load_items(None, limit=3)
    predictions = _fid_predictions(suite, tmp_path, items, [render(make_scene(1))] * 3)
    with pytest.raises(FeatureSourceError, match="--option inception=PATH"):
        suite.score(predictions, items, ScoreContext(out=tmp_path))
    with pytest.raises(FeatureSourceError, match="no such file"):
        suite.score(
            predictions, items, ScoreContext(out=tmp_path, options={"inception": str(tmp_path / "x.pth")})
        )

    # --data references: no silent fallback to the shapes teacher.
    render(make_scene(1)).save(tmp_path / "ref.png")
    data = tmp_path / "refs.jsonl"
    data.write_text('{"prompt": "a cat", "image": "ref.png"}\n{"prompt": "a dog", "image": "ref.png"}\n')
    data_items = suite.load_items(str(data))
    assert [i.prompt for i in data_items] == ["a cat", "a dog"] and data_items[0].meta["reference"].endswith(
        "ref.png"
    )
    data_predictions = _fid_predictions(suite, tmp_path / "d", data_items, [render(make_scene(1))] * 2)
    with pytest.raises(FeatureSourceError, match="features=teacher"):
        suite.score(data_predictions, data_items, ScoreContext(out=tmp_path / "d", model=str(tmp_path)))


def test_fid_clip_score_from_a_local_clip_folder(tmp_path, tiny_model):
    from transformers import CLIPConfig, CLIPModel

    from training.train_teacher import build_word_tokenizer, write_preprocessor_config

    suite = get_suite("fid")
    items = suite.load_items(None, limit=4)
    clip_dir = tmp_path / "clip"
    tokenizer = build_word_tokenizer([item.prompt for item in items], max_length=16)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    write_preprocessor_config(clip_dir, 32)

    images = [render(make_scene(2 * k)) for k in range(4)]
    predictions = _fid_predictions(suite, tmp_path / "out", items, images)
    results = suite.score(
        predictions,
        items,
        ScoreContext(
            out=tmp_path / "out", model=str(tiny_model), options={"clip": str(clip_dir), "device": "cpu"}
        ),
    )
    for key in ("clip_score", "clip_score_reference"):
        assert math.isfinite(results["metrics"][key]) and 0 <= results["metrics"][key] <= 100
    assert any("clip_score from the local CLIP model" in note for note in results["notes"])


# ------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_suite_on_model_and_tokenizer_folders(tmp_path, tiny_model):
    from mllm.data.shapes import iter_samples
    from mllm.data.shards import write_shards

    write_shards(iter_samples(8, "test", size=32), tmp_path / "data", progress=False)
    suite = get_suite("tokenizer")
    assert suite.kind == "custom" and suite.primary_metric == "psnr"
    for model in (tiny_model, tiny_model / "vision_tokenizer"):
        args = argparse.Namespace(
            model=str(model),
            data=str(tmp_path / "data"),
            out=str(tmp_path / "out"),
            batch_size=4,
            limit=None,
            option=["precision=fp32", "device=cpu"],
            no_progress=True,
        )
        results = suite.run(args, tmp_path / "out")
        metrics = results["metrics"]
        assert results["count"] == metrics["images"] == 8
        assert math.isfinite(metrics["psnr"]) and 0 < metrics["ssim"] <= 1
        assert 0 < metrics["codebook_usage"] <= 100 and 0 <= metrics["judge_agreement"] <= 100
        assert -1 <= metrics["semantic_cosine"] <= 1
        assert (tmp_path / "out" / "examples.png").is_file()

    with pytest.raises(ValueError, match="needs --data"):
        suite.run(argparse.Namespace(model=str(tiny_model), data=None), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        suite.run(argparse.Namespace(model=str(tmp_path), data=str(tmp_path / "data")), tmp_path / "out")
