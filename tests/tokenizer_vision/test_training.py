"""A few optimisation steps on tiny images lower the loss, in fp32 and under bf16 autocast."""

import pytest
import torch


@pytest.mark.parametrize("mode", ["dual", "pixel"])
def test_adam_steps_lower_the_total_loss(mode, make_tokenizer, shape_images):
    tokenizer = make_tokenizer(quantizer_mode=mode).train()
    pixel_values = tokenizer.processor.preprocess(shape_images(6))
    optimizer = torch.optim.Adam(tokenizer.generator_parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        optimizer.zero_grad()
        out = tokenizer(pixel_values, step=step)
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.6 * losses[0]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_bf16_autocast_training_step(make_tokenizer, shape_images):
    tokenizer = make_tokenizer(entropy_loss_weight=0.1).train()
    pixel_values = tokenizer.processor.preprocess(shape_images(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tokenizer(pixel_values, step=0)
    assert out["reconstruction"].dtype == torch.bfloat16 and out["loss"].dtype == torch.float32
    out["loss"].backward()
    grads = [p.grad for p in tokenizer.generator_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in tokenizer.parameters())  # master weights stay fp32
