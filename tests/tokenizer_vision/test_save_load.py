"""save_pretrained / from_pretrained: safetensors only, bit-exact, self-contained."""

import json
import shutil

import pytest
import torch

from tokenizer_vision import DualCodebookTokenizer, TokenizerConfig


def train_a_little(tokenizer, images, steps=3):
    """A few optimisation steps so EMA statistics, usage counts and weights are all non-trivial."""
    optimizer = torch.optim.Adam(tokenizer.generator_parameters(), lr=1e-3)
    pixel_values = tokenizer.processor.preprocess(images)
    tokenizer.train()
    for step in range(steps):
        optimizer.zero_grad()
        tokenizer(pixel_values, step=step)["loss"].backward()
        optimizer.step()
    return pixel_values


@pytest.mark.parametrize("mode", ["dual", "pixel"])
def test_round_trip_is_bit_exact(mode, make_tokenizer, shape_images, tmp_path):
    tokenizer = make_tokenizer(quantizer_mode=mode, restart_every=2)
    pixel_values = train_a_little(tokenizer, shape_images(4))
    assert tokenizer.quantizer.ema_cluster_size.sum() > 0 and int(tokenizer.quantizer.num_training_steps) == 3
    tokenizer.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]

    loaded = DualCodebookTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == tokenizer.config and not loaded.training
    original = dict(tokenizer.named_parameters()) | dict(tokenizer.named_buffers())
    restored = dict(loaded.named_parameters()) | dict(loaded.named_buffers())  # incl. non-persistent
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert tensor.dtype == restored[name].dtype and torch.equal(tensor, restored[name]), name
    for name, parameter in tokenizer.named_parameters():
        assert parameter.requires_grad == restored[name].requires_grad, name
    tokenizer.eval()
    assert torch.equal(loaded.encode(pixel_values), tokenizer.encode(pixel_values))
    codes = tokenizer.encode(pixel_values)
    assert torch.equal(loaded.decode(codes), tokenizer.decode(codes))


def test_folder_is_self_contained(tower_folders, tmp_path, shape_images):
    teacher_copy = tmp_path / "teacher"
    shutil.copytree(tower_folders["clip_vision"], teacher_copy)
    torch.manual_seed(0)
    tokenizer = DualCodebookTokenizer.from_name(
        "tiny", teacher_config=None, teacher_path=str(teacher_copy)
    ).eval()
    tokenizer.save_pretrained(tmp_path / "tok")
    shutil.rmtree(teacher_copy)  # teacher_path is only read the first time

    saved = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert saved["teacher_config"]["model_type"] == "clip_vision_model" and saved["teacher_image_size"] == 32
    loaded = DualCodebookTokenizer.from_pretrained(tmp_path / "tok")
    pixel_values = tokenizer.processor.preprocess(shape_images(2))
    assert torch.equal(loaded.teacher_features(pixel_values), tokenizer.teacher_features(pixel_values))
    assert torch.equal(loaded.encode(pixel_values), tokenizer.encode(pixel_values))


def test_from_pretrained_dtype_and_overrides(make_tokenizer, shape_images, tmp_path):
    make_tokenizer().save_pretrained(tmp_path / "tok")
    half = DualCodebookTokenizer.from_pretrained(tmp_path / "tok", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.quantizer.usage_counts.dtype == torch.long
    assert half.encode(shape_images(2)).shape == (2, 4, 4)
    # A setting that keeps the weights' shapes can change at load time, e.g. for end-to-end tuning.
    tuned = DualCodebookTokenizer.from_pretrained(tmp_path / "tok", codebook_update="loss")
    assert tuned.quantizer.codebook_sem.requires_grad


def test_load_errors_are_clear(make_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="config.json missing"):
        DualCodebookTokenizer.from_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="do not match"):
        DualCodebookTokenizer.from_pretrained(tmp_path / "tok", codebook_size=32)
    # Saved before code preferences: loads with zero counts (the nearest code always); any other key missing
    # is an error.
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "tok" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "quantizer.code_preference"}, tmp_path / "tok" / "model.safetensors")
    assert DualCodebookTokenizer.from_pretrained(tmp_path / "tok").quantizer.code_preference.sum() == 0
    save_file({k: v for k, v in weights.items() if k != "quantizer.usage_counts"}, tmp_path / "tok" / "model.safetensors")
    with pytest.raises(ValueError, match="missing \\['quantizer.usage_counts'\\]"):
        DualCodebookTokenizer.from_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    (tmp_path / "tok" / "config.json").write_text(json.dumps({**config, "mystery": 1}))
    with pytest.raises(ValueError, match="mystery"):
        DualCodebookTokenizer.from_pretrained(tmp_path / "tok")


def test_saved_config_reloads_as_the_same_config(make_tokenizer, tmp_path):
    tokenizer = make_tokenizer(quantizer_mode="semantic")
    tokenizer.save_pretrained(tmp_path / "tok")
    values = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert TokenizerConfig.from_dict(values) == tokenizer.config
