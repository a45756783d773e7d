"""The shapes world: determinism, invariants of scenes, and consistency of every generated label."""

import json
import re

import numpy as np
import pytest

from mllm.data.shapes import (
    BACKGROUND,
    CELL_PHRASES,
    CELLS,
    COLORS,
    EXTENTS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    caption,
    draw_prompts,
    iter_samples,
    make_sample,
    make_scene,
    render,
    resized,
    scene_seed,
    vqa_pairs,
)

SEEDS = range(300)
CELL_OF_PHRASE = {phrase: cell for cell, phrase in CELL_PHRASES.items()}


def _count(scene: Scene, **attributes: str) -> int:
    return sum(all(getattr(obj, key) == value for key, value in attributes.items()) for obj in scene.objects)


def test_known_scenes_pin_the_generator():
    # Pinned values: a change here silently changes every data set built from seeds.
    assert make_scene(0) == Scene(objects=(ShapeObject("red", "square", "large", "bottom left"),), seed=0)
    assert caption(make_scene(2)) == (
        "a small green circle at the top right and a large yellow triangle on the right"
    )


def test_same_seed_gives_same_scene_and_image_bytes():
    for seed in range(20):
        assert make_scene(seed) == make_scene(seed)
        assert render(make_scene(seed)).tobytes() == render(make_scene(seed)).tobytes()


def test_different_seeds_mostly_differ():
    scenes = {make_scene(seed).objects for seed in range(50)}
    images = {render(make_scene(seed)).tobytes() for seed in range(50)}
    assert len(scenes) >= 45
    assert len(images) >= 45


def test_scene_invariants():
    counts = set()
    for seed in SEEDS:
        scene = make_scene(seed)
        cells = [obj.cell for obj in scene.objects]
        assert 1 <= len(scene.objects) <= 3
        assert len(set(cells)) == len(cells)
        assert cells == sorted(cells, key=CELLS.index)
        for obj in scene.objects:
            assert obj.color in COLORS and obj.shape in SHAPES and obj.size in SIZES and obj.cell in CELLS
        counts.add(len(scene.objects))
    assert counts == {1, 2, 3}


def test_object_count_bounds():
    assert {len(make_scene(seed, min_objects=2, max_objects=2).objects) for seed in range(30)} == {2}
    assert {len(make_scene(seed, min_objects=4, max_objects=5).objects) for seed in range(50)} == {4, 5}
    with pytest.raises(ValueError):
        make_scene(0, max_objects=10)
    with pytest.raises(ValueError):
        make_scene(0, min_objects=3, max_objects=2)


def test_scene_seed_splits_never_share_a_seed():
    train = {scene_seed("train", index, base) for index in range(2000) for base in range(10)}
    test = {scene_seed("test", index, base) for index in range(2000) for base in range(10)}
    assert len(train) == len(test) == 20000  # no collisions inside a split either
    assert not train & test
    assert scene_seed("heldout", 7, 1) == scene_seed("val", 7, 1) == scene_seed("test", 7, 1)
    assert scene_seed("train", 0) == 0 and scene_seed("test", 0) == 1


@pytest.mark.parametrize(
    ("split", "index", "base_seed"), [("dev", 0, 0), ("train", -1, 0), ("test", 0, -1), ("train", 10**9, 0)]
)
def test_scene_seed_rejects_bad_arguments(split, index, base_seed):
    with pytest.raises(ValueError):
        scene_seed(split, index, base_seed)


def test_scene_sorts_its_objects_and_validates():
    a = ShapeObject("red", "circle", "large", "bottom right")
    b = ShapeObject("blue", "square", "small", "top")
    assert Scene(objects=(a, b), seed=3) == Scene(objects=(b, a), seed=3)
    assert Scene(objects=(a, b), seed=3).objects == (b, a)
    with pytest.raises(ValueError, match="own cell"):
        Scene(objects=(a, ShapeObject("green", "circle", "small", "bottom right")), seed=0)
    with pytest.raises(ValueError, match="at least one"):
        Scene(objects=(), seed=0)
    with pytest.raises(ValueError, match="unknown color"):
        ShapeObject("pink", "circle", "small", "top")
    with pytest.raises(ValueError, match="unknown cell"):
        ShapeObject("red", "circle", "small", "middle")


def test_to_dict_round_trips_through_json():
    for seed in range(50):
        scene = make_scene(seed)
        data = json.loads(json.dumps(scene.to_dict()))
        assert Scene.from_dict(data) == scene
    assert make_scene(0).to_dict() == {
        "seed": 0,
        "objects": [{"color": "red", "shape": "square", "size": "large", "cell": "bottom left"}],
    }


def test_describe_phrasing():
    obj = ShapeObject("orange", "circle", "small", "left")
    assert obj.describe() == "a small orange circle on the left"
    assert obj.describe(with_size=False) == "an orange circle on the left"
    assert obj.describe(with_size=False, with_cell=False) == "an orange circle"
    assert ShapeObject("red", "square", "large", "center").describe() == "a large red square at the center"


@pytest.mark.parametrize("size", [16, 32, 64, 100, 128, 256])
def test_render_uses_only_palette_colours_and_keeps_objects_in_their_cells(size):
    allowed = {tuple(color) for color in COLORS.values()} | {(255, 255, 255)}
    for seed in range(20):
        scene = make_scene(seed)
        image = render(scene, size)
        assert image.mode == "RGB" and image.size == (size, size)
        pixels = np.asarray(image)
        assert {tuple(p) for p in pixels.reshape(-1, 3)} <= allowed
        drawn = np.zeros(pixels.shape[:2], dtype=bool)
        for obj in scene.objects:
            row, col = divmod(CELLS.index(obj.cell), 3)
            rows = slice(round(row * size / 3), round((row + 1) * size / 3))
            cols = slice(round(col * size / 3), round((col + 1) * size / 3))
            inside = np.all(pixels[rows, cols] == COLORS[obj.color], axis=-1)
            assert inside.any()
            drawn[rows, cols] |= inside
        assert (np.any(pixels != 255, axis=-1) == drawn).all()  # no ink outside the objects' cells


@pytest.mark.parametrize("size", [16, 32, 64, 100, 256])
def test_large_objects_are_clearly_bigger_than_small(size):
    for shape in SHAPES:
        areas = {}
        for name in SIZES:
            pixels = np.asarray(render(Scene((ShapeObject("blue", shape, name, "center"),), seed=0), size))
            areas[name] = np.any(pixels != 255, axis=-1).sum()
        ideal = (EXTENTS["large"] / EXTENTS["small"]) ** 2  # about 3.2
        assert areas["large"] > 0.6 * ideal * areas["small"] > 0


def test_render_rejects_tiny_images():
    with pytest.raises(ValueError):
        render(make_scene(0), 8)


def test_caption_names_every_object():
    for seed in SEEDS:
        scene = make_scene(seed)
        text = caption(scene)
        for obj in scene.objects:
            assert obj.describe() in text
            assert f"{obj.size} {obj.color} {obj.shape} {CELL_PHRASES[obj.cell]}" in text
        assert text.count(" and ") == (len(scene.objects) > 1)
        assert text.count(", ") == max(len(scene.objects) - 2, 0)


def _check_answer(scene: Scene, pair: dict) -> None:
    """Re-derive the answer of one VQA pair from the scene."""
    question, answer, kind = pair["question"], pair["answer"], pair["type"]
    if kind == "count":
        if question == "How many objects are there?":
            assert answer == str(len(scene.objects))
        elif match := re.fullmatch(r"How many (\w+)s are there\?", question):
            assert answer == str(_count(scene, shape=match[1]))
        else:
            match = re.fullmatch(r"How many (\w+) objects are there\?", question)
            assert answer == str(_count(scene, color=match[1]))
        return
    if kind == "exists":
        match = re.fullmatch(r"Is there an? (\w+) (\w+)\?", question)
        assert answer == ("yes" if _count(scene, color=match[1], shape=match[2]) else "no")
        return
    patterns = {
        "color": r"What colour is the (?P<shape>\w+)(?: (?P<where>(?:at|on) the [\w ]+))?\?",
        "shape": r"What shape is the (?P<color>\w+) object(?: (?P<where>(?:at|on) the [\w ]+))?\?",
        "position": r"Where is the (?:(?P<size>small|large) )?(?P<color>\w+) (?P<shape>\w+)\?",
    }
    match = re.fullmatch(patterns[kind], question)
    named = {key: value for key, value in match.groupdict().items() if value and key != "where"}
    if match.groupdict().get("where"):
        named["cell"] = CELL_OF_PHRASE[match["where"]]
    referents = [obj for obj in scene.objects if all(getattr(obj, k) == v for k, v in named.items())]
    assert len(referents) == 1, f"ambiguous question {question!r} for {scene}"
    attribute = {"color": "color", "shape": "shape", "position": "cell"}[kind]
    assert answer == getattr(referents[0], attribute)


def test_every_vqa_answer_matches_the_scene():
    kinds, negatives, zero_counts = set(), 0, 0
    for seed in SEEDS:
        scene = make_scene(seed)
        for pair in vqa_pairs(scene):
            assert set(pair) == {"question", "answer", "type"}
            assert pair["answer"] == pair["answer"].lower().strip() and len(pair["answer"].split()) <= 2
            _check_answer(scene, pair)
            kinds.add(pair["type"])
            negatives += pair["answer"] == "no"
            zero_counts += pair["answer"] == "0"
    assert kinds == {"count", "color", "shape", "position", "exists"}
    assert negatives == len(SEEDS)  # one true negative per scene
    assert zero_counts > len(SEEDS) // 3


def test_vqa_is_deterministic_and_seedable():
    scene = make_scene(5)
    assert vqa_pairs(scene) == vqa_pairs(scene) == vqa_pairs(scene, seed=scene.seed)
    assert any(vqa_pairs(make_scene(s)) != vqa_pairs(make_scene(s), seed=s + 1000) for s in range(10))


def test_disambiguating_questions():
    scene = Scene(
        objects=(
            ShapeObject("red", "circle", "large", "top left"),
            ShapeObject("red", "circle", "small", "center"),
            ShapeObject("blue", "circle", "small", "left"),
        ),
        seed=0,
    )
    questions = {pair["question"]: pair["answer"] for pair in vqa_pairs(scene)}
    assert questions["What colour is the circle on the left?"] == "blue"
    assert questions["What shape is the red object at the center?"] == "circle"
    assert questions["What shape is the blue object?"] == "circle"
    assert questions["Where is the large red circle?"] == "top left"
    assert questions["Where is the blue circle?"] == "left"
    assert "Where is the red circle?" not in questions


def test_draw_prompts():
    scene = Scene(
        objects=(
            ShapeObject("blue", "square", "large", "bottom right"),
            ShapeObject("red", "circle", "small", "top"),
        ),
        seed=0,
    )
    assert draw_prompts(scene) == [
        "a small red circle at the top and a large blue square at the bottom right",
        "a red circle",
        "a small red circle",
        "a red circle at the top",
        "a blue square",
        "a large blue square",
        "a blue square at the bottom right",
        "a red circle at the top and a blue square at the bottom right",
    ]
    for seed in SEEDS:
        prompts = draw_prompts(make_scene(seed))
        assert prompts[0] == caption(make_scene(seed))
        assert len(prompts) == len(set(prompts))


def test_make_sample_and_iter_samples():
    sample = make_sample(7, size=32)
    scene = make_scene(7)
    assert sample["key"] == "000000000007"
    assert sample["image"].size == (32, 32)
    assert sample["image"].tobytes() == render(scene, 32).tobytes()
    assert sample["scene"] == scene.to_dict()
    assert sample["caption"] == caption(scene)
    assert sample["qa"] == vqa_pairs(scene)
    json.dumps({key: value for key, value in sample.items() if key != "image"})

    samples = list(iter_samples(200, split="test", base_seed=2))
    assert [s["key"] for s in samples[:2]] == [f"{scene_seed('test', i, 2):012d}" for i in range(2)]
    full_scene = sum(s["prompt"] == s["caption"] for s in samples)
    assert 0.6 * len(samples) < full_scene < 0.9 * len(samples)
    for s in samples:
        assert s["prompt"] in draw_prompts(Scene.from_dict(s["scene"]))


def test_resized_share_renders_some_scenes_at_other_sizes_and_resizes_them():
    from tokenizer_vision.image_processing import ImageProcessor

    plain = list(iter_samples(200, size=48))
    mixed = list(iter_samples(200, size=48, resized_share=0.5))
    assert [s["key"] for s in mixed] == [s["key"] for s in plain]  # same scenes, same labels
    resized_ones = [s for s in mixed if "rendered_size" in s]
    assert 0.35 * len(mixed) < len(resized_ones) < 0.65 * len(mixed)
    sources = [s["rendered_size"] for s in resized_ones]
    assert 48 not in sources and 0.3 < sources.count(64) / len(sources) < 0.7 and len(set(sources)) >= 5
    for sample, reference in zip(mixed, plain):
        assert sample["caption"] == reference["caption"] and sample["qa"] == reference["qa"]
        assert sample["image"].size == (48, 48)
        if "rendered_size" in sample:
            # The image processor's own resize of the render at the other size; only exact renders are drawn.
            expected = ImageProcessor(48).resize_and_crop(render(make_scene(int(sample["key"])), sample["rendered_size"]))
            assert sample["image"].tobytes() == expected.tobytes()
            assert "prompt" not in sample
        else:
            assert sample["image"].tobytes() == reference["image"].tobytes()
            assert sample["prompt"] == reference["prompt"]
    # A resize blends edges: colours outside the palette appear, the background stays white.
    pixels = np.asarray(resized_ones[0]["image"]).reshape(-1, 3)
    palette = {tuple(c) for c in COLORS.values()} | {BACKGROUND}
    assert any(tuple(p) not in palette for p in pixels)
    assert tuple(pixels[0]) == BACKGROUND
    assert resized(render(make_scene(3), 48), 48).tobytes() == render(make_scene(3), 48).tobytes()
    assert next(iter_samples(5, size=48, resized_share=0.0))["image"].tobytes() == plain[0]["image"].tobytes()
    with pytest.raises(ValueError, match="resized_share"):
        make_sample(1, resized_share=1.5)
