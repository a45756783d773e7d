"""TokenizerConfig: named sizes, JSON round trip, validation with clear errors."""

import json

import pytest

from tokenizer_vision import TOKENIZER_SIZES, TokenizerConfig


@pytest.mark.parametrize("name, grid, codebook_size", [("tiny", (4, 4), 64), ("shapes", (8, 8), 1024)])
def test_named_sizes(name, grid, codebook_size):
    config = TokenizerConfig.from_name(name)
    assert config.grid_size == grid
    assert config.codebook_size == codebook_size
    assert config.downsample_factor == config.image_size // grid[0]


def test_photo_is_128_px_to_16x16_codes_with_a_local_teacher():
    with pytest.raises(ValueError, match="teacher_path"):
        TokenizerConfig.from_name("photo")
    config = TokenizerConfig.from_name("photo", teacher_path="/models/clip")
    assert (config.image_size, config.grid_size) == (128, (16, 16))


def test_base_needs_a_local_teacher():
    with pytest.raises(ValueError, match="teacher_path"):
        TokenizerConfig.from_name("base")
    config = TokenizerConfig.from_name("base", teacher_path="/models/siglip")
    assert (config.image_size, config.grid_size, config.codebook_size) == (256, (16, 16), 16384)


@pytest.mark.parametrize("name", sorted(TOKENIZER_SIZES))
def test_json_round_trip(name):
    overrides = {"teacher_path": "/models/siglip"} if name in ("base", "photo") else {}
    config = TokenizerConfig.from_name(name, **overrides)
    restored = TokenizerConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert isinstance(restored.channel_mult, tuple)


def test_unknown_keys_are_refused():
    values = TokenizerConfig.from_name("tiny").to_dict()
    with pytest.raises(ValueError, match=r"unknown TokenizerConfig key 'codebook_sise' \(did you mean codebook_size\?\)"):
        TokenizerConfig.from_dict({**values, "codebook_sise": 12})
    with pytest.raises(ValueError, match="unknown TokenizerConfig key .not_a_field."):
        TokenizerConfig.from_name("tiny", not_a_field=1)
    with pytest.raises(ValueError, match="unknown tokenizer size 'huge' .*tiny"):
        TokenizerConfig.from_name("huge")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"channel_mult": (1, 2, 2)}, "downsampling factor of 4"),
        ({"image_size": 36}, "multiple of 8"),
        ({"quantizer_mode": "both"}, "quantizer_mode"),
        ({"codebook_update": "kmeans"}, "codebook_update"),
        ({"teacher_config": {"model_type": "resnet"}}, "model_type"),
        ({"teacher_config": None}, "needs a semantic tower"),
        ({"perceptual_weight": 1.0}, "perceptual_path"),
        ({"image_mean": (0.5, 0.5)}, "3 values"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"full_resolution_res_blocks": -1}, "full_resolution_res_blocks"),
        ({"training_code_search": "fp16"}, "training_code_search"),
    ],
)
def test_invalid_values_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        TokenizerConfig.from_name("tiny", **overrides)


def test_pixel_mode_needs_no_teacher():
    config = TokenizerConfig.from_name("tiny", quantizer_mode="pixel", teacher_config=None)
    assert not config.uses_semantic and config.uses_pixel
