"""The train-tokenizer recipe end to end on tiny data: loss goes down, a kill + resume is exact."""

import json

import pytest
import torch
from safetensors.torch import load_file

import training.train_tokenizer as recipe
from mllm.data.shapes import iter_samples
from mllm.data.shards import write_shards
from training.config import load_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes32")
    write_shards(iter_samples(64, "train", base_seed=3, size=32), out, progress=False)
    return out


def _config(shards, out, **extra):
    overrides = [f"data={shards}", f"out={out}", "size=tiny", "batch_size=8", "max_steps=30", "log_every=5",
                 "save_every=10", "warmup_steps=5", "learning_rate=3e-3", "precision=fp32", "device=cpu"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(recipe.TokenizerTrainConfig, "tokenizer-shapes", overrides)


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_saves_a_loadable_tokenizer(shards, tmp_path):
    from tokenizer_vision import DualCodebookTokenizer

    out = recipe.main(_config(shards, tmp_path / "tok"))
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25, 30]
    assert metrics[-1]["loss"] < 0.7 * metrics[0]["loss"]
    assert metrics[-1]["psnr"] > metrics[0]["psnr"]
    tokenizer = DualCodebookTokenizer.from_pretrained(out)
    codes = tokenizer.encode(torch.zeros(2, 3, 32, 32))
    assert codes.shape == (2, *tokenizer.grid_size)


def test_killed_run_resumes_exactly(shards, tmp_path, monkeypatch):
    straight = recipe.main(_config(shards, tmp_path / "straight"))

    real_save = recipe.save_checkpoint

    def save_then_die(folder, *args, **kwargs):
        real_save(folder, *args, **kwargs)
        if folder.name == "step-20":
            raise KeyboardInterrupt  # as if the process were killed right after this checkpoint

    monkeypatch.setattr(recipe, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(_config(shards, tmp_path / "resumed"))
    monkeypatch.setattr(recipe, "save_checkpoint", real_save)
    resumed = recipe.main(_config(shards, tmp_path / "resumed"), resume=True)

    expected, got = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    # The resumed run logs the steps after the checkpoint with the same losses.
    after = {m["step"]: m["loss"] for m in _metrics(resumed) if m["step"] > 20}
    assert after == {m["step"]: m["loss"] for m in _metrics(straight) if m["step"] > 20}


def test_two_processes_train_through_torchrun(shards, tmp_path):
    """accelerate underneath: `torchrun --nproc_per_node 2 -m mllm.cli train-tokenizer` (gloo on CPU)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mllm.cli", "train-tokenizer", "--data", str(shards), "--out", str(out), "--max-steps", "6",
               "--set", "size=tiny", "batch_size=4", "log_every=3", "save_every=3", "precision=fp32", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in _metrics(out)] == [3, 6]  # logged once, by the main process
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "step-3").is_dir()


def test_rescale_round_trip_degrades_a_share_of_the_inputs_reproducibly():
    import numpy as np

    from mllm.data.shapes import make_scene, render, resized
    from training.data import rescale_round_trip

    batch = np.stack([np.asarray(render(make_scene(seed), 48)) for seed in range(40)])
    assert np.array_equal(rescale_round_trip(batch, 0.0, [1.33], np.random.default_rng(0)), batch)
    assert np.array_equal(rescale_round_trip(batch, 1.0, [1.0], np.random.default_rng(0)), batch)
    half = rescale_round_trip(batch, 0.5, [1.33, 2.0], np.random.default_rng(1))
    changed = [not np.array_equal(a, b) for a, b in zip(half, batch)]
    assert 10 < sum(changed) < 30 and half.dtype == np.uint8 and half.shape == batch.shape
    assert np.array_equal(half, rescale_round_trip(batch, 0.5, [1.33, 2.0], np.random.default_rng(1)))
    # Enlarging keeps hard edges (nearest), the way back is the image processor's resize.
    from PIL import Image

    up = rescale_round_trip(batch[:1], 1.0, [1.33], np.random.default_rng(0))[0]
    expected = resized(Image.fromarray(batch[0]).resize((64, 64), Image.Resampling.NEAREST), 48)
    assert np.array_equal(up, np.asarray(expected))


def test_rescale_training_keeps_the_clean_images_as_targets(shards, tmp_path):
    out = recipe.main(_config(shards, tmp_path / "rescaled", rescale_share=0.5))
    metrics = _metrics(out)
    assert metrics[-1]["loss"] < 0.7 * metrics[0]["loss"] and metrics[-1]["psnr"] > metrics[0]["psnr"]
    with pytest.raises(ValueError, match="rescale_share"):
        _config(shards, tmp_path / "bad", rescale_share=1.5).validate()


def test_resume_after_a_torn_metrics_line(shards, tmp_path, monkeypatch):
    """A kill while a metrics line is being appended leaves it torn: the resumed run drops it rather than
    appending its own lines onto it, so every line of the log still reads."""
    real_save = recipe.save_checkpoint

    def save_then_die(folder, *args, **kwargs):
        real_save(folder, *args, **kwargs)
        if folder.name == "step-10":
            raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(_config(shards, tmp_path / "run", max_steps=15))
    monkeypatch.setattr(recipe, "save_checkpoint", real_save)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as log:
        log.write('{"step": 11, "loss": 0.4, "ps')  # the kill cut this line short
    recipe.main(_config(shards, tmp_path / "run", max_steps=15), resume=True)
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [5, 10, 15]


def test_paired_renderings_go_in_against_the_first_rendering_as_target(shards, tmp_path, monkeypatch):
    """paired_data: a share of each batch goes in drawn the other way (the same scene, matched by key), and
    the target is always data's image."""
    import numpy as np

    from tokenizer_vision import DualCodebookTokenizer
    from training.data import load_images

    varied = tmp_path / "varied"
    write_shards(iter_samples(64, "train", base_seed=3, size=32, look="varied"), varied, progress=False)
    clean, drawn = load_images(str(shards), 32, None, progress=False), load_images(str(varied), 32, None,
                                                                                   progress=False)
    assert clean.keys == drawn.keys and not np.array_equal(clean.images, drawn.images)
    exact = {image.tobytes(): index for index, image in enumerate(clean.images)}
    seen = []
    real_forward = DualCodebookTokenizer.forward

    def record(self, pixel_values, *args, target=None, **kwargs):
        seen.append((pixel_values.detach().clone(), target.detach().clone()))
        return real_forward(self, pixel_values, *args, target=target, **kwargs)

    monkeypatch.setattr(DualCodebookTokenizer, "forward", record)
    config = _config(shards, tmp_path / "paired", paired_data=varied, paired_share=0.5, max_steps=10)
    out = recipe.main(config)
    assert (out / "model.safetensors").is_file() and len(seen) == 10
    # Back from pixel values to the uint8 images: every target is one of data's images; each input is that
    # image or, for about half, the same scene's varied rendering.
    from tokenizer_vision import TokenizerConfig

    tiny = TokenizerConfig.from_name("tiny")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (tiny.image_mean, tiny.image_std))

    def to_uint8(pixels):
        return (pixels * std + mean).mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()

    paired = 0
    for inputs, targets in seen:
        for given, target in zip(to_uint8(inputs), to_uint8(targets)):
            index = exact[target.tobytes()]
            if np.array_equal(given, target):
                continue
            assert np.array_equal(given, drawn.images[index])
            paired += 1
    assert 20 < paired < 60  # of 80 rows, share 0.5


def test_paired_data_must_hold_every_training_image(shards, tmp_path):
    fewer = tmp_path / "fewer"
    write_shards(iter_samples(10, "train", base_seed=3, size=32, look="varied"), fewer, progress=False)
    with pytest.raises(ValueError, match="paired_data must hold the same records"):
        recipe.main(_config(shards, tmp_path / "out", paired_data=fewer, paired_share=0.5))
    with pytest.raises(ValueError, match="paired_share needs paired_data"):
        _config(shards, tmp_path / "bad", paired_share=0.5).validate()


def test_code_preference_counts_the_training_images_nearest_codes(shards, tmp_path):
    """tokenizer.code_preference_margin: when training ends, the codes of the training images are counted (by
    distance alone) and saved with the tokenizer, whose encoding then prefers common codes among near ones."""
    from mllm.data.arrays import to_pixel_values
    from tokenizer_vision import DualCodebookTokenizer
    from training.data import load_images

    out = recipe.main(_config(shards, tmp_path / "tok", max_steps=10, **{"tokenizer.code_preference_margin": 0.05}))
    tokenizer = DualCodebookTokenizer.from_pretrained(out)
    counts = tokenizer.quantizer.code_preference
    images = load_images(str(shards), 32, None, progress=False).images
    assert counts.sum().item() == len(images) * 16  # every training image (under 4096), 4 x 4 codes each
    nearest = DualCodebookTokenizer.from_pretrained(out, code_preference_margin=0.0)
    config = tokenizer.config
    with torch.no_grad():
        plain = nearest.encode(to_pixel_values(images, config.image_mean, config.image_std))
        preferred = tokenizer.encode(to_pixel_values(images, config.image_mean, config.image_std))
    # Preferring common codes changes a code only toward a more common one.
    changed = preferred != plain
    assert (counts[preferred[changed]] > counts[plain[changed]]).all()
    assert torch.equal(counts, torch.bincount(plain.flatten(), minlength=tokenizer.codebook_size).float())
