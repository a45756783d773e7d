"""DualCodebookTokenizer: shapes through encode / decode / embed, gradients, frozen teacher, errors."""

import pytest
import torch
from PIL import Image

from tokenizer_vision import EncodedFeatures

WIDTHS = {"dual": (8, 4), "pixel": (None, 4), "semantic": (8, None)}  # (d_sem, d_pix) of the tiny size


@pytest.mark.parametrize("mode", ["dual", "pixel", "semantic"])
def test_shapes_through_encode_decode_embed(mode, make_tokenizer, shape_images):
    tokenizer = make_tokenizer(quantizer_mode=mode).eval()
    d_sem, d_pix = WIDTHS[mode]
    assert tokenizer.grid_size == (4, 4) and tokenizer.codebook_size == 64 and tokenizer.image_size == 32

    codes = tokenizer.encode(shape_images(3))
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    assert tokenizer.encode(shape_images(1)[0]).shape == (1, 4, 4)

    images = tokenizer.decode(codes)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(tokenizer.decode(codes.flatten(1)), images)  # (B, h*w) raster order is accepted
    pil_images = tokenizer.decode_images(codes)
    assert len(pil_images) == 3 and all(im.size == (32, 32) and im.mode == "RGB" for im in pil_images)

    sem, pix = tokenizer.embed(codes)
    assert (None if sem is None else sem.shape) == (None if d_sem is None else (3, 4, 4, d_sem))
    assert (None if pix is None else pix.shape) == (None if d_pix is None else (3, 4, 4, d_pix))

    pixel_values = tokenizer.processor.preprocess(shape_images(3))
    encoded = tokenizer.encode_features(pixel_values)
    assert isinstance(encoded, EncodedFeatures) and torch.equal(encoded.indices, codes)
    for features, rows in ((encoded.quantized_sem, sem), (encoded.quantized_pix, pix)):
        assert (features is None) == (rows is None)
        if rows is not None:
            assert torch.allclose(features, rows, atol=1e-6)  # STE features equal the codebook rows

    out = tokenizer(pixel_values)
    assert out["reconstruction"].shape == (3, 3, 32, 32) and torch.equal(out["indices"], codes)
    assert torch.allclose(out["reconstruction"], images, atol=1e-5)  # decode(encode(x)) == forward
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert ("semantic" in out["losses"]) == (mode != "pixel")


def test_full_resolution_res_blocks_sets_only_the_full_resolution_level(make_tokenizer, shape_images, tmp_path):
    from tokenizer_vision import DualCodebookTokenizer
    from tokenizer_vision.encoders import ResnetBlock

    def blocks(module) -> int:
        return sum(isinstance(m, ResnetBlock) for m in module.modules())

    default, lean = make_tokenizer(), make_tokenizer(full_resolution_res_blocks=0, num_res_blocks=2)
    levels = len(default.config.channel_mult)
    assert blocks(default.pixel_encoder.levels[0]) == 1 and blocks(default.pixel_decoder.levels[-1]) == 1
    assert blocks(lean.pixel_encoder.levels[0]) == 0 and blocks(lean.pixel_decoder.levels[-1]) == 0
    assert all(blocks(lean.pixel_encoder.levels[level]) == 2 for level in range(1, levels))
    assert all(blocks(lean.pixel_decoder.levels[level]) == 2 for level in range(levels - 1))
    out = lean(lean.processor.preprocess(shape_images(2)))
    assert out["reconstruction"].shape == (2, 3, 32, 32) and torch.isfinite(out["loss"])
    lean.save_pretrained(tmp_path)  # the setting travels with the folder
    assert DualCodebookTokenizer.from_pretrained(tmp_path).config.full_resolution_res_blocks == 0


@pytest.mark.parametrize("mode", ["dual", "pixel", "semantic"])
def test_local_codes_depend_only_on_their_own_patch_and_margin(mode, make_tokenizer, shape_images, tmp_path):
    from tokenizer_vision import DualCodebookTokenizer

    tokenizer = make_tokenizer(local_context=4, quantizer_mode=mode).eval()
    assert tokenizer.pixel_encoder is None and tokenizer.semantic_encoder is None
    assert (tokenizer.teacher is None) == (mode == "pixel")
    images = tokenizer.processor.preprocess(shape_images(2))  # (2, 3, 32, 32): 4 x 4 codes of 8 px
    changed = images.clone()
    changed[:, :, 20:24, 18:30] = torch.randn(2, 3, 4, 12)
    with torch.no_grad():
        before, after = tokenizer.encode(images), tokenizer.encode(changed)
        z_before, z_after = (tokenizer.local_encoder(x) for x in (images, changed))
    # A code sees its 8 px patch and 4 px around it: code row or column k reads pixels 8k - 4 to 8k + 11.
    # Rows 20-23 lie in the reach of code rows 2 (12-27) and 3 (20-35), not row 1 (4-19); columns 18-29 in
    # that of code columns 1 (4-19), 2 and 3, not column 0 (-4-11).
    reach = torch.zeros(4, 4, dtype=torch.bool)
    reach[2:4, 1:4] = True
    moved = (z_before - z_after).abs().amax(dim=1) > 0  # (2, 4, 4)
    assert torch.equal(moved, reach.expand(2, 4, 4))
    assert torch.equal(before[:, ~reach], after[:, ~reach])  # every code out of reach is kept exactly
    out = tokenizer.train()(images)
    out["loss"].backward()
    assert all(p.grad is not None for p in tokenizer.local_encoder.parameters())
    tokenizer.eval().save_pretrained(tmp_path)  # after a training step (EMA codebooks moved)
    loaded = DualCodebookTokenizer.from_pretrained(tmp_path)
    assert loaded.config.local_context == 4 and torch.equal(loaded.encode(images), tokenizer.encode(images))


def test_local_context_must_halve_evenly(make_tokenizer):
    from tokenizer_vision.config import TokenizerConfig

    with pytest.raises(ValueError, match="local_context must be None or a non-negative multiple of 4"):
        TokenizerConfig.from_name("tiny", local_context=3)


def test_forward_total_is_the_weighted_sum(make_tokenizer, shape_images):
    tokenizer = make_tokenizer(pixel_l1_weight=0.5, pixel_l2_weight=2.0, vq_weight=3.0, semantic_weight=0.7)
    out = tokenizer(tokenizer.processor.preprocess(shape_images(2)))
    losses = out["losses"]
    expected = (
        0.5 * losses["pixel_l1"] + 2.0 * losses["pixel_l2"] + 3.0 * losses["vq"] + 0.7 * losses["semantic"]
    )
    assert torch.allclose(out["loss"], expected)
    assert 0.0 <= out["usage_fraction"].item() <= 1.0 and out["perplexity"].item() >= 1.0


def test_target_sets_what_is_reconstructed_while_the_input_sets_the_codes(make_tokenizer, shape_images):
    from tokenizer_vision.losses import pixel_l1_loss

    tokenizer = make_tokenizer().eval()
    clean = tokenizer.processor.preprocess(shape_images(2))
    degraded = clean + 0.3 * torch.randn_like(clean)
    with torch.no_grad():
        plain = tokenizer(degraded)
        targeted = tokenizer(degraded, target=clean)
        same = tokenizer(clean, target=clean)
        default = tokenizer(clean)
    assert torch.equal(targeted["indices"], plain["indices"])  # the codes come from the input
    assert torch.allclose(targeted["losses"]["pixel_l1"], pixel_l1_loss(targeted["reconstruction"], clean))
    assert not torch.allclose(targeted["losses"]["pixel_l1"], plain["losses"]["pixel_l1"])
    assert torch.allclose(same["loss"], default["loss"])
    seen = []  # the teacher reads the target, not the input
    real = tokenizer.teacher_features
    tokenizer.teacher_features = lambda pixels: seen.append(pixels) or real(pixels)
    with torch.no_grad():
        again = tokenizer(degraded, target=clean)
    assert len(seen) == 1 and torch.equal(seen[0], clean)
    assert torch.allclose(again["losses"]["semantic"], targeted["losses"]["semantic"])
    assert not torch.allclose(targeted["losses"]["semantic"], plain["losses"]["semantic"])


def test_straight_through_reaches_the_encoders(make_tokenizer, shape_images):
    tokenizer = make_tokenizer().train()
    out = tokenizer(tokenizer.processor.preprocess(shape_images(2)))
    out["reconstruction"].pow(2).mean().backward()  # a loss on the decoder side only
    for parameter in (
        tokenizer.pixel_encoder.conv_in.weight,
        tokenizer.semantic_encoder.projection[0].weight,
        tokenizer.semantic_encoder.backbone.tower.embeddings.patch_embedding.weight,
    ):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_llm_side_gradients_reach_encoders_and_codebooks(make_tokenizer, shape_images):
    tokenizer = make_tokenizer(codebook_update="loss", restart_every=0).train()
    encoded = tokenizer.encode_features(tokenizer.processor.preprocess(shape_images(2)))
    weights = torch.randn_like(encoded.quantized_sem)
    (encoded.quantized_sem * weights).sum().backward()  # stands in for an LLM loss on the features
    assert tokenizer.semantic_encoder.projection[0].weight.grad.abs().sum() > 0  # straight-through
    used = torch.bincount(encoded.indices.flatten(), minlength=64) > 0
    row_grads = tokenizer.quantizer.codebook_sem.grad.norm(dim=1)
    assert (row_grads[used] > 0).all() and (row_grads[~used] == 0).all()  # exactly the used rows

    tokenizer.zero_grad()
    sem, pix = tokenizer.embed(torch.tensor([[1, 2], [3, 4]]))
    (sem.sum() + pix.sum()).backward()
    assert (tokenizer.quantizer.codebook_pix.grad.norm(dim=1) > 0).nonzero().flatten().tolist() == [
        1,
        2,
        3,
        4,
    ]


def test_teacher_is_a_frozen_copy_of_the_starting_tower(make_tokenizer, shape_images):
    tokenizer = make_tokenizer().train()
    teacher, tower = tokenizer.teacher, tokenizer.semantic_encoder.backbone
    assert not teacher.training and tower.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for (name, p), (_, q) in zip(teacher.named_parameters(), tower.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    pixel_values = tokenizer.processor.preprocess(shape_images(2))
    target = tokenizer.teacher_features(pixel_values)
    assert target.shape == (2, 32, 4, 4) and not target.requires_grad
    assert torch.allclose(tower(pixel_values), target)  # same weights, same features
    optimizer = torch.optim.SGD(tokenizer.generator_parameters(), lr=0.1)
    tokenizer(pixel_values)["loss"].backward()
    optimizer.step()
    assert torch.equal(tokenizer.teacher_features(pixel_values), target)
    assert not torch.allclose(tower(pixel_values), target)


def test_semantic_cosine_metric(make_tokenizer, shape_images):
    tokenizer = make_tokenizer().eval()
    pixel_values = tokenizer.processor.preprocess(shape_images(2))
    codes = tokenizer.encode(pixel_values)
    cosine = tokenizer.semantic_cosine(pixel_values, codes)
    assert cosine.shape == (2, 4, 4) and (cosine.abs() <= 1 + 1e-5).all()
    assert torch.equal(tokenizer.semantic_cosine(pixel_values), cosine)
    # It is the complement of the semantic loss that training minimises.
    loss = tokenizer(pixel_values)["losses"]["semantic"]
    assert torch.allclose(1 - cosine.mean(), loss, atol=1e-5)


def test_bad_inputs_raise_value_error(make_tokenizer):
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tokenizer.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match="integer"):
        tokenizer.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 4, 4\) or \(B, 16\)"):
        tokenizer.decode(torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"-1"):
        tokenizer.embed(torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="shape"):
        tokenizer.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="not a recognised image"):
        tokenizer.encode([b"not an image"])
    with pytest.raises(ValueError, match="no semantic teacher"):
        make_tokenizer(quantizer_mode="pixel").teacher_features(torch.zeros(1, 3, 32, 32))


def test_encode_accepts_paths_and_bytes(make_tokenizer, shape_images, tmp_path):
    tokenizer = make_tokenizer().eval()
    image = shape_images(1)[0]
    path = tmp_path / "x.png"
    image.save(path)
    expected = tokenizer.encode(image)
    assert torch.equal(tokenizer.encode([path]), expected)
    assert torch.equal(tokenizer.encode(path.read_bytes()), expected)
    assert isinstance(tokenizer.decode_images(expected)[0], Image.Image)


def test_package_imports_no_other_project_package():
    import pathlib
    import re

    import tokenizer_vision

    forbidden = re.compile(r"^\s*(from|import)\s+(mllm|training|eval|serve)\b", re.MULTILINE)
    for source in pathlib.Path(tokenizer_vision.__file__).parent.rglob("*.py"):
        assert not forbidden.search(source.read_text()), source
