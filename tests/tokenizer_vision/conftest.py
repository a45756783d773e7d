"""Fixtures of the tokenizer_vision tests: tiny tokenizers, tiny images, tiny HF tower folders."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from tokenizer_vision import TOKENIZER_SIZES, DualCodebookTokenizer

COLOURS = [(220, 40, 40), (40, 170, 70), (40, 90, 220), (235, 200, 30), (140, 60, 190), (245, 130, 30)]
# The tiny size's own teacher tower, without its model_type, so any vision config class takes it.
TINY_TOWER = {key: value for key, value in TOKENIZER_SIZES["tiny"]["teacher_config"].items() if key != "model_type"}
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 99,
    "max_position_embeddings": 16,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@pytest.fixture
def make_tokenizer():
    """Factory: a fresh, seeded `tiny` tokenizer with config overrides."""

    def make(**overrides) -> DualCodebookTokenizer:
        torch.manual_seed(0)
        return DualCodebookTokenizer.from_name("tiny", **overrides)

    return make


@pytest.fixture
def shape_images():
    """Factory: n deterministic 32 x 32 shapes-world-like images (white, one coloured shape)."""

    def make(n: int, size: int = 32) -> list[Image.Image]:
        images = []
        for i in range(n):
            image = Image.new("RGB", (size, size), (255, 255, 255))
            draw = ImageDraw.Draw(image)
            x, y = (i * 7) % (size // 2), (i * 11) % (size // 2)
            box = (x, y, x + size // 2, y + size // 2)
            (draw.ellipse if i % 2 else draw.rectangle)(box, fill=COLOURS[i % len(COLOURS)])
            images.append(image)
        return images

    return make


@pytest.fixture(scope="session")
def tower_folders(tmp_path_factory):
    """Tiny Hugging Face vision models saved the way real checkpoints are: {kind: folder}."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        ViTConfig,
        ViTModel,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("towers")
    models = {
        "clip_vision": CLIPVisionModel(CLIPVisionConfig(**TINY_TOWER)),
        "clip_full": CLIPModel(CLIPConfig(vision_config=TINY_TOWER, text_config=TINY_TEXT)),
        "siglip_vision": SiglipVisionModel(SiglipVisionConfig(**TINY_TOWER)),
        "vit": ViTModel(ViTConfig(**TINY_TOWER), add_pooling_layer=False),
    }
    folders = {}
    for kind, model in models.items():
        folders[kind] = root / kind
        model.save_pretrained(folders[kind])
    return folders
