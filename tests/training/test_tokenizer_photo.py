"""Your photos -> your tokenizer: `mllm train-tokenizer` on a plain folder of images with any local HF vision
tower as the teacher (CLIP, SigLIP, ViT; vision-only or full checkpoints), no captions anywhere; pretokenize
and eval-tokenizer on a folder; train-teacher's one-line refusal of caption-less data; the tokenizer-photo
recipe; the photo benchmark's split of scikit-image's sample photos."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.cli import main

ROOT = Path(__file__).resolve().parents[2]
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "image_size": 32, "patch_size": 8}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "vocab_size": 99, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# What each folder's tower becomes inside the tokenizer: a full checkpoint gives its vision part.
TOWER_TYPES = {"clip_vision": "clip_vision_model", "clip_full": "clip_vision_model",
               "siglip_vision": "siglip_vision_model", "siglip_full": "siglip_vision_model",
               "vit": "vit", "vit_classifier": "vit"}
FAST = ["--set", "size=tiny", "batch_size=8", "log_every=1", "warmup_steps=1", "precision=fp32", "device=cpu",
        "crop_max_side=64"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Tiny random HF vision models saved with save_pretrained, as real checkpoints are: {kind: folder}."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipConfig,
        SiglipModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        ViTConfig,
        ViTForImageClassification,
        ViTModel,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("towers")
    models = {
        "clip_vision": CLIPVisionModel(CLIPVisionConfig(**TOWER)),
        "clip_full": CLIPModel(CLIPConfig(vision_config=TOWER, text_config=TEXT)),
        "siglip_vision": SiglipVisionModel(SiglipVisionConfig(**TOWER)),
        "siglip_full": SiglipModel(SiglipConfig(vision_config=TOWER, text_config=TEXT)),
        "vit": ViTModel(ViTConfig(**TOWER), add_pooling_layer=False),
        "vit_classifier": ViTForImageClassification(ViTConfig(**TOWER, num_labels=3)),
    }
    folders = {}
    for kind, model in models.items():
        model.save_pretrained(root / kind)
        folders[kind] = root / kind
    return folders


def write_photos(folder: Path, count: int = 16, seed: int = 0) -> Path:
    """`count` small non-square pictures (smooth colour ramps plus a block) as PNG, JPEG and WEBP files, some
    in a subfolder and with upper-case extensions."""
    rng = np.random.default_rng(seed)
    formats = [("png", "PNG"), ("JPG", "JPEG"), ("webp", "WEBP"), ("jpeg", "JPEG")]
    for index in range(count):
        height, width = int(rng.integers(36, 60)), int(rng.integers(36, 80))
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, int(rng.integers(256)))], -1)
        top, left = int(rng.integers(height // 2)), int(rng.integers(width // 2))
        pixels[top : top + 12, left : left + 12] = rng.integers(0, 256, 3)
        extension, fmt = formats[index % len(formats)]
        path = folder / ("nested" if index % 3 == 0 else "") / f"photo{index:02d}.{extension}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path, format=fmt)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def trained(photos, towers, tmp_path_factory):
    """A tokenizer trained on the photo folder with the full CLIP folder as teacher (the CLI, as documented)."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    assert main(["train-tokenizer", "--data", str(photos), "--teacher", str(towers["clip_full"]), "--recipe",
                 "tokenizer-photo", "--out", str(out), "--max-steps", "6", *FAST]) == 0
    return out


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_train_tokenizer_on_a_folder_with_a_full_clip_teacher(trained, towers, capsys):
    from tokenizer_vision import DualCodebookTokenizer

    metrics = _metrics(trained)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["psnr"]) for m in metrics)
    tokenizer = DualCodebookTokenizer.from_pretrained(trained)
    assert tokenizer.config.teacher_config["model_type"] == "clip_vision_model"
    assert tokenizer.config.image_size == 32  # the tiny size, set on the command line
    codes = tokenizer.encode(Image.new("RGB", (50, 30), (10, 120, 200)))
    assert codes.shape == (1, 4, 4)


@pytest.mark.parametrize("kind", ["clip_vision", "siglip_vision", "siglip_full", "vit", "vit_classifier"])
def test_any_local_vision_tower_folder_teaches_without_captions(kind, photos, towers, tmp_path, capsys):
    import training.train_tokenizer as recipe
    from training.config import load_config

    cfg = load_config(recipe.TokenizerTrainConfig, "tokenizer-photo", [
        f"data={photos}", f"out={tmp_path / 'tok'}", f"teacher={towers[kind]}", "size=tiny", "batch_size=4",
        "max_steps=2", "log_every=1", "warmup_steps=1", "precision=fp32", "device=cpu", "crop_max_side=64"])
    out = recipe.main(cfg)
    assert "16 photos (random crops)" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["teacher_config"]["model_type"] == TOWER_TYPES[kind]
    assert saved["teacher_path"] == str(towers[kind])
    assert len(_metrics(out)) == 2


def test_a_killed_folder_run_resumes_exactly(photos, towers, tmp_path, monkeypatch):
    """The crop sampler's position is in the checkpoint: the resumed run draws the crops the straight one drew."""
    from safetensors.torch import load_file

    import training.train_tokenizer as recipe
    from training.config import load_config

    def config(out):
        return load_config(recipe.TokenizerTrainConfig, "tokenizer-photo", [
            f"data={photos}", f"out={out}", f"teacher={towers['vit']}", "size=tiny", "batch_size=4", "max_steps=6",
            "save_every=3", "log_every=1", "warmup_steps=1", "precision=fp32", "device=cpu", "crop_max_side=64"])

    straight = recipe.main(config(tmp_path / "straight"))
    real_save = recipe.save_checkpoint

    def save_then_die(folder, *args, **kwargs):
        real_save(folder, *args, **kwargs)
        raise KeyboardInterrupt  # as if the process were killed right after the step-3 checkpoint

    monkeypatch.setattr(recipe, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(config(tmp_path / "resumed"))
    monkeypatch.setattr(recipe, "save_checkpoint", real_save)
    resumed = recipe.main(config(tmp_path / "resumed"), resume=True)
    expected, got = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert [m["loss"] for m in _metrics(resumed)][-3:] == [m["loss"] for m in _metrics(straight)][-3:]


def test_pretokenize_a_folder_writes_image_only_records_of_codes(trained, photos, tmp_path, capsys):
    from mllm.data.shards import DataStats, read_records

    out = tmp_path / "codes"
    assert main(["pretokenize", "--data", str(photos), "--vision-tokenizer", str(trained), "--out", str(out),
                 "--batch-size", "5", "--no-progress"]) == 0
    info = json.loads((out / "pretokenize.json").read_text())
    assert info["images_encoded"] == info["records_written"] == 16 and info["records_without_image"] == 0
    assert info["grid_size"] == [4, 4] and info["source"] == [str(photos.resolve())]
    stats = DataStats()
    records = list(read_records(out, stats=stats, split=False))
    assert len(records) == 16 and not stats.skipped
    assert records[0]["key"] == "nested/photo00_png" and records[0]["json"] == {"path": "nested/photo00.png"}
    assert all(r["image"] is None and r["codes"].shape == (4, 4) for r in records)
    # The codes are the tokenizer's own encoding of each file.
    from tokenizer_vision import DualCodebookTokenizer

    tokenizer = DualCodebookTokenizer.from_pretrained(trained)
    expected = tokenizer.encode([str(photos / r["json"]["path"]) for r in records[:3]])
    agree = (torch.stack([r["codes"] for r in records[:3]]) == expected).float().mean()
    assert agree > 0.9  # bf16 autocast in pretokenize may flip a near tie


def test_eval_tokenizer_on_a_folder(trained, photos, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval-tokenizer", "--tokenizer", str(trained), "--data", str(photos), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 16 and 5 < results["psnr"] < 60 and 0 < results["codebook_usage"] <= 1
    assert "judge_agreement" not in results and (out / "examples.png").is_file()


def test_a_folder_without_images_is_one_error_line(tmp_path, towers, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train-tokenizer", "--data", str(tmp_path / "empty"), "--teacher", str(towers["vit"]),
                 "--recipe", "tokenizer-photo", "--out", str(tmp_path / "tok"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mllm train-tokenizer: error: data folder ")
    assert "holds no images" in err and ".jpg/.jpeg/.png/.webp" in err
    assert main(["eval-tokenizer", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "empty")]) == 2


def _llava_shards(tmp_path) -> Path:
    """What `mllm data convert-llava` writes: images with conversations, no captions."""
    from mllm.data.llava import convert_llava

    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for index in range(6):
        Image.new("RGB", (20, 16), (40 * index, 90, 10)).save(images / f"{index}.png")
        entries.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Reddish."}]})
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    convert_llava(tmp_path / "llava.json", images, tmp_path / "llava", progress=False)
    return tmp_path / "llava"


def test_train_teacher_refuses_caption_less_data_in_one_line(tmp_path, photos, capsys):
    for data in (_llava_shards(tmp_path), photos):
        assert main(["train-teacher", "--data", str(data), "--out", str(tmp_path / "teacher")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("mllm train-teacher: error: "), err
        assert "no image captions" in err and "pretrained vision tower folder" in err
        assert "`mllm train-tokenizer --teacher DIR`" in err
        assert not (tmp_path / "teacher").exists()


def test_the_tokenizer_photo_recipe_loads_and_builds(towers):
    from training.recipes import RECIPES, load_recipe
    from training.train_tokenizer import build_tokenizer

    assert RECIPES["tokenizer-photo"].kind == "tokenizer"
    teacher = str(towers["siglip_full"])
    recipe, cfg = load_recipe("tokenizer-photo", ["data=photos", "out=tok", f"teacher={teacher}"],
                              kinds=("tokenizer",))
    assert recipe.command == "train-tokenizer" and cfg.quantizer == "dual" and cfg.size == "photo"
    tokenizer = build_tokenizer(cfg)
    assert tokenizer.image_size == 128 and tokenizer.grid_size == (16, 16)
    assert tokenizer.config.teacher_config["model_type"] == "siglip_vision_model"
    with pytest.raises(ValueError, match="pass --teacher DIR"):
        load_recipe("tokenizer-photo", ["data=photos", "out=tok"], kinds=("tokenizer",))


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_photo_tokenizer", ROOT / "scripts" / "bench_photo_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_splits_real_photos_without_overlap(tmp_path):
    for package in ("skimage", "sklearn", "matplotlib"):
        pytest.importorskip(package, reason=f"{package} (the `photos` extra) ships sample photos")
    bench = _bench_module()
    source = bench.skimage_data_dir()
    train, held_out = bench.write_split(source, tmp_path)
    train_names = sorted(path.name for path in train.iterdir())
    others = ["china.jpg", "flower.jpg", "grace_hopper.jpg"]
    assert train_names == sorted([*bench.TRAIN_PHOTOS, *others])
    assert not set(train_names) & set(bench.HELD_OUT_PHOTOS)
    tiles = sorted(held_out.iterdir())
    assert len(tiles) == 34  # astronaut 4x4 + chelsea 3x2 + coffee 4x3 tiles of 128 px
    assert {path.name.split("-")[0] for path in tiles} == {"astronaut", "chelsea", "coffee"}
    with Image.open(held_out / "astronaut-05.png") as tile, Image.open(source / "astronaut.png") as photo:
        assert tile.size == (128, 128)
        expected = np.asarray(photo.convert("RGB"))[128:256, 128:256]  # row 1, column 1
        assert np.array_equal(np.asarray(tile), expected)
    # The train folder is the photos' own files, which the folder reader takes as they are.
    assert (train / "retina.jpg").read_bytes() == (source / "retina.jpg").read_bytes()
    import matplotlib

    hopper = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    assert (train / "grace_hopper.jpg").read_bytes() == hopper.read_bytes()
