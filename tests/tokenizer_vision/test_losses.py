"""Optional losses: LPIPS from a local safetensors file, PatchGAN with hinge loss and a start step."""

import pytest
import torch
from safetensors.torch import save_file

from tokenizer_vision.losses import (
    LPIPS,
    PatchDiscriminator,
    hinge_discriminator_loss,
    hinge_generator_loss,
    semantic_distillation_loss,
)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """Random LPIPS weights saved under the lpips package's parameter names (the learned channel
    weights made non-negative, as trained LPIPS weights are)."""
    torch.manual_seed(0)
    weights = LPIPS().state_dict()
    for name in [name for name in weights if name.startswith("lin")]:
        weights[name] = weights[name].abs()
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_file(weights, str(path))
    return path


def test_lpips_loads_local_weights_and_measures_distance(lpips_file):
    module = LPIPS.from_safetensors(lpips_file)
    assert "net.slice1.0.weight" in module.state_dict() and "lin4.model.1.weight" in module.state_dict()
    assert all(not p.requires_grad for p in module.parameters())
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    module.train()
    assert not module.training  # a frozen metric stays in eval mode
    assert torch.equal(module(x, x), torch.zeros(2))
    distance = module(x, y)
    assert distance.shape == (2,) and (distance > 0).all()
    with pytest.raises(ValueError, match="local"):
        LPIPS.from_safetensors(lpips_file.parent / "missing.safetensors")


def test_tokenizer_with_perceptual_loss(make_tokenizer, shape_images, lpips_file, tmp_path):
    tokenizer = make_tokenizer(quantizer_mode="pixel", perceptual_weight=1.0, perceptual_path=str(lpips_file))
    out = tokenizer(tokenizer.processor.preprocess(shape_images(2)))
    assert out["losses"]["perceptual"].item() > 0
    tokenizer.save_pretrained(tmp_path / "tok")
    lpips_file_moved = tmp_path / "elsewhere.safetensors"
    lpips_file.rename(lpips_file_moved)  # the saved folder does not need perceptual_path any more
    try:
        from tokenizer_vision import DualCodebookTokenizer

        loaded = DualCodebookTokenizer.from_pretrained(tmp_path / "tok")
        assert torch.equal(loaded.perceptual.lin0.model[1].weight, tokenizer.perceptual.lin0.model[1].weight)
    finally:
        lpips_file_moved.rename(lpips_file)


def test_gan_terms_start_at_gan_start_step(make_tokenizer, shape_images):
    tokenizer = make_tokenizer(quantizer_mode="pixel", gan_weight=0.5, gan_start_step=10).train()
    pixel_values = tokenizer.processor.preprocess(shape_images(2))
    assert "gan" not in tokenizer(pixel_values, step=9)["losses"] and not tokenizer.gan_active(None)

    out = tokenizer(pixel_values, step=10)
    losses = out["losses"]
    expected = losses["pixel_l1"] + losses["pixel_l2"] + losses["vq"] + 0.5 * losses["gan"]
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    # The generator's backward reaches the decoder but leaves the discriminator's gradients empty ...
    assert tokenizer.pixel_decoder.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tokenizer.discriminator.parameters())
    assert not any(
        p is q for p in tokenizer.generator_parameters() for q in tokenizer.discriminator.parameters()
    )
    # ... which its own loss fills, without touching the generator.
    tokenizer.zero_grad()
    tokenizer.discriminator_loss(pixel_values, out["reconstruction"]).backward()
    assert all(p.grad is not None for p in tokenizer.discriminator.parameters())
    assert tokenizer.pixel_decoder.conv_out.weight.grad is None


def test_hinge_losses_and_discriminator_shape():
    logits = PatchDiscriminator(channels=8, num_layers=2)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1, 6, 6)
    assert hinge_discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0
    assert hinge_generator_loss(torch.full((4,), 3.0)).item() == -3.0


def test_semantic_distillation_loss_is_one_minus_cosine():
    teacher = torch.randn(2, 16, 4, 4)
    assert semantic_distillation_loss(3.0 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert semantic_distillation_loss(-teacher, teacher).item() == pytest.approx(2.0, abs=1e-6)
