"""The semantic branch loads real HF vision towers from local folders and pools their patch tokens."""

import json

import pytest
import torch
import torch.nn.functional as F

from tokenizer_vision import DualCodebookTokenizer
from tokenizer_vision.encoders import OPENAI_CLIP_MEAN, pool_to_grid


def tokenizer_from_folder(folder, **overrides) -> DualCodebookTokenizer:
    torch.manual_seed(0)
    return DualCodebookTokenizer.from_name("tiny", teacher_config=None, teacher_path=str(folder), **overrides)


@pytest.mark.parametrize(
    "kind, model_type, prefix_tokens, mean",
    [
        ("clip_vision", "clip_vision_model", 1, OPENAI_CLIP_MEAN),
        ("clip_full", "clip_vision_model", 1, OPENAI_CLIP_MEAN),
        ("siglip_vision", "siglip_vision_model", 0, (0.5, 0.5, 0.5)),
        ("vit", "vit", 1, (0.5, 0.5, 0.5)),
    ],
)
def test_tower_folders_load_as_the_semantic_tower(
    kind, model_type, prefix_tokens, mean, tower_folders, shape_images
):
    from transformers import AutoModel

    tokenizer = tokenizer_from_folder(tower_folders[kind]).eval()
    assert tokenizer.config.teacher_config["model_type"] == model_type
    assert tokenizer.config.teacher_mean == mean

    # The weights are the folder's (for a full CLIPModel: its vision part).
    reference = AutoModel.from_pretrained(tower_folders[kind])
    reference = getattr(reference, "vision_model", reference).eval()
    reference_weights = dict(reference.named_parameters())
    tower = tokenizer.semantic_encoder.backbone.tower
    for name, parameter in tower.named_parameters():
        matches = [w for key, w in reference_weights.items() if key.endswith(name)]
        assert matches and torch.equal(parameter, matches[0]), name

    pixel_values = tokenizer.processor.preprocess(shape_images(2))
    features = tokenizer.teacher_features(pixel_values)
    assert features.shape == (2, 32, 4, 4)
    # Patch tokens only (CLS dropped), in the tower's own normalisation, on the 4 x 4 patch grid.
    tower_input = (pixel_values * 0.5 + 0.5 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        tokenizer.config.teacher_std
    ).view(1, 3, 1, 1)
    tokens = reference(pixel_values=tower_input).last_hidden_state  # (B, T, 32)
    assert tokens.shape[1] == 16 + prefix_tokens
    expected = tokens[:, prefix_tokens:].transpose(1, 2).reshape(2, 32, 4, 4)
    assert torch.allclose(features, expected, atol=1e-5)

    out = tokenizer.train()(pixel_values)
    assert out["quantized_sem"].shape == (2, 4, 4, 8) and torch.isfinite(out["losses"]["semantic"])
    out["loss"].backward()
    no_gradient = [name for name, p in tokenizer.named_parameters() if p.requires_grad and p.grad is None]
    assert no_gradient == []  # pooling-only parts of the tower are frozen, everything else trains


def test_preprocessor_config_sets_the_tower_normalisation(tower_folders, tmp_path):
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(tower_folders["clip_vision"], folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]})
    )
    tokenizer = tokenizer_from_folder(folder)
    assert tokenizer.config.teacher_mean == (0.1, 0.2, 0.3) and tokenizer.config.teacher_std == (
        0.4,
        0.5,
        0.6,
    )
    explicit = tokenizer_from_folder(folder, teacher_mean=(0.5, 0.5, 0.5), teacher_std=(0.5, 0.5, 0.5))
    assert explicit.config.teacher_mean == (0.5, 0.5, 0.5)


def test_tower_resolution_differs_from_the_tokenizer(tower_folders, shape_images):
    # A 48 px tower input (interpolated position embeddings): 6 x 6 patches area-pooled to 4 x 4.
    tokenizer = tokenizer_from_folder(tower_folders["siglip_vision"], teacher_image_size=48).eval()
    assert tokenizer.teacher_features(tokenizer.processor.preprocess(shape_images(1))).shape == (1, 32, 4, 4)


def test_pool_to_grid():
    grid = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(pool_to_grid(grid, (2, 2)), F.avg_pool2d(grid, 2))  # area pooling when shrinking
    assert pool_to_grid(grid, (8, 8)).shape == (1, 1, 8, 8)  # interpolation when the tower is coarser
    assert pool_to_grid(grid, (4, 4)) is grid


def test_missing_teacher_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a local folder"):
        tokenizer_from_folder(tmp_path / "nowhere")
