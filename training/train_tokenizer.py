"""Recipe: train the dual-codebook visual tokenizer.

    mllm train-tokenizer --data runs/demo/data/train --out runs/demo/tokenizer \
        --teacher runs/demo/teacher [--quantizer dual|pixel|semantic] [--max-steps N] [--resume]
    mllm train-tokenizer --data PHOTOS --teacher VISION_TOWER --recipe tokenizer-photo --out DIR

`--data` is image shards (each image resized and centre-cropped to the recipe's size) or a plain folder of
images (`mllm.data.image_folder`): its photos are held whole (shorter side capped at `crop_max_side`) and
every batch is fresh random square crops of them with scale jitter and flips (`training.data.random_crops`).

setup (data in memory, model, optimizer, accelerate) -> train (bf16 autocast where supported,
periodic checkpoints, exact resume) -> save (`save_pretrained` folder: config.json +
model.safetensors). Launch with `accelerate launch -m mllm.cli train-tokenizer ...` or
`torchrun --nproc_per_node N -m mllm.cli train-tokenizer ...` for several processes: each rank
draws its own slice of every global batch and accelerate averages the gradients.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from mllm.data.arrays import check_data_path, to_pixel_values
from mllm.data.image_folder import is_image_folder, list_images
from mllm.io import TMP_SUFFIX, aside, fsync_path, fsync_tree, recover_leftovers, rewrite_jsonl
from mllm.runtime import resolve_precision
from tokenizer_vision import DualCodebookTokenizer, TokenizerConfig
from tokenizer_vision.model import WEIGHTS_NAME
from tokenizer_vision.schema import coerce_fields
from training.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from training.config import save_config
from training.data import (
    CropSampler,
    EpochSampler,
    ImageRecipeConfig,
    load_images,
    load_photos,
    random_crops,
    rescale_round_trip,
    trained_already,
)


@dataclass
class TokenizerTrainConfig(ImageRecipeConfig):
    """The tokenizer recipe (`mllm train-tokenizer`): which tokenizer, and how it trains."""

    recipe_kind: ClassVar[str] = "tokenizer"

    data: str = ""  # training shards or a folder of images; held-out ones are for `mllm eval-tokenizer`
    size: str = "shapes"  # named tokenizer size: tiny | shapes | photo | base
    teacher: str | None = None  # local CLIP/SigLIP/ViT folder for the semantic branch
    quantizer: str = "dual"  # dual | pixel | semantic (ablations)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # overrides of TokenizerConfig fields
    max_steps: int = 1300
    learning_rate: float = 2e-3
    min_learning_rate_ratio: float = 0.05  # cosine decays to this fraction of the peak
    grad_clip: float = 1.0
    save_every: int = 500
    keep_checkpoints: int = 2
    # Share of each batch whose input image makes a round trip through another size (factors of the image
    # side; `training.data.rescale_round_trip`) while the targets stay the clean image: the encoder learns
    # to give pictures made at other sizes the codes of the clean one. 0: off.
    rescale_share: float = 0.0
    rescale_factors: list[float] = field(default_factory=lambda: [0.83, 1.17, 1.33, 1.33, 1.67, 2.0])
    # Paired renderings: data whose records have the same keys as `data`'s, each the same picture drawn
    # another way (for the shapes world, the same scenes rendered with `--look varied`). A `paired_share` of
    # each batch goes in as the paired rendering while the targets (pixels and the teacher's features) stay
    # `data`'s image: the encoder learns to give every rendering of a scene the codes of the one in `data`,
    # and the decoder draws that one. Applied before the size round trip, so the two combine. 0: off.
    paired_data: str = ""
    paired_share: float = 0.0
    # A folder of images: photos are held in memory with their shorter side at most this many pixels
    # (downscaled once when larger), and each training view is a random square crop of one of them, its side
    # log-uniform between the image size and that shorter side, resized to the image size.
    crop_max_side: int = 512

    def validate(self) -> None:
        super().validate()
        if self.quantizer not in ("dual", "pixel", "semantic"):
            raise ValueError(f"quantizer must be dual, pixel or semantic, got {self.quantizer!r}")
        if self.quantizer in ("dual", "semantic") and not self.teacher and self.size != "tiny":
            raise ValueError(
                f"the {self.quantizer!r} quantizer distils a teacher: pass --teacher DIR (a local Hugging Face "
                "CLIP, SigLIP or ViT folder; for the shapes world, `mllm train-teacher` output) or use --quantizer pixel"
            )
        if self.max_steps <= 0 or self.batch_size <= 0:
            raise ValueError("max_steps and batch_size must be positive")
        if not 0.0 <= self.rescale_share <= 1.0:
            raise ValueError(f"rescale_share must be in [0, 1], got {self.rescale_share}")
        if self.rescale_share > 0 and (not self.rescale_factors or any(f <= 0 for f in self.rescale_factors)):
            raise ValueError(f"rescale_factors must be positive numbers, got {self.rescale_factors}")
        if not 0.0 <= self.paired_share <= 1.0:
            raise ValueError(f"paired_share must be in [0, 1], got {self.paired_share}")
        if self.paired_share > 0 and not self.paired_data:
            raise ValueError("paired_share needs paired_data: the same images drawn another way, with data's keys")
        if self.crop_max_side <= 0:
            raise ValueError(f"crop_max_side must be a positive number of pixels, got {self.crop_max_side}")


def _paired_images(paired_data: str, data, image_size: int, progress: bool) -> np.ndarray:
    """The images of `paired_data` in the order of `data`'s records, matched by key; a record of `data`
    without its pair is an error that names it."""
    paired = load_images(paired_data, image_size, None, progress=progress)
    position = {key: index for index, key in enumerate(paired.keys)}
    missing = [key for key in data.keys if key not in position]
    if missing:
        raise ValueError(f"{paired_data} has no record for {len(missing)} of the training images (the first: "
                         f"{missing[0]!r}); paired_data must hold the same records as data, drawn another way")
    return paired.images[[position[key] for key in data.keys]]


def build_tokenizer(cfg: TokenizerTrainConfig) -> DualCodebookTokenizer:
    # The recipe's `tokenizer:` section, named as the user wrote it (`--set tokenizer.codebook_size=...`).
    overrides = coerce_fields(TokenizerConfig, dict(cfg.tokenizer), prefix="tokenizer.", where="the recipe")
    overrides["quantizer_mode"] = cfg.quantizer
    if cfg.teacher:
        overrides["teacher_path"] = str(cfg.teacher)
        overrides["teacher_config"] = None  # the tower reads its normalisation from the folder itself
    # One validation, of the size with the overrides in: a size without a tower of its own (photo, base) is
    # complete only once teacher_path is in.
    config = TokenizerConfig.from_name(cfg.size, **overrides)
    return DualCodebookTokenizer(config)


def _cosine_with_floor(optimizer, warmup: int, total: int, floor: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _psnr(reconstruction: torch.Tensor, target: torch.Tensor, std: float) -> float:
    """PSNR in dB on the [0, 1] scale, for the progress bar (eval-tokenizer uses torchmetrics)."""
    mse = ((reconstruction.float() - target.float()) * std).pow(2).mean().item()
    return 10.0 * math.log10(1.0 / max(mse, 1e-10))


def save_final(tokenizer: DualCodebookTokenizer, out: Path) -> None:
    """`tokenizer.save_pretrained` into OUT, which also holds the run's checkpoints and log, durably and without
    a moment where OUT looks trained but is not: the files are written to OUT/.final.tmp and fsynced, then
    renamed into OUT one by one, model.safetensors (the mark of a finished run, `trained_already`) last."""
    tmp = _final_staging(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    fsync_tree(tmp)
    for item in sorted(tmp.iterdir(), key=lambda path: path.name == WEIGHTS_NAME):
        os.replace(item, out / item.name)
    fsync_path(out)
    tmp.rmdir()


def _final_staging(out: Path) -> Path:
    return aside(out / "final", TMP_SUFFIX)


def recover_final(out: Path) -> None:
    """Remove what a final save killed midway left in OUT/.final.tmp (OUT looks trained only if it finished)."""
    shutil.rmtree(_final_staging(out), ignore_errors=True)


PREFERENCE_IMAGES = 4096  # training images (or crops) whose codes are counted for code_preference_margin


@torch.no_grad()
def count_code_preference(tokenizer: DualCodebookTokenizer, images: np.ndarray | list[np.ndarray], device: torch.device,
                          batch_size: int = 64, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Count the codes of up to PREFERENCE_IMAGES training images (an (N, H, W, 3) array: evenly spaced through
    it) or random crops of photos (a list of arrays), and store the counts as the tokenizer's
    `code_preference`: the common codes its encoding prefers among near-equal ones
    (`tokenizer.code_preference_margin`). Returns the (K,) counts."""
    config = tokenizer.config
    was_training = tokenizer.training
    tokenizer.eval()
    # With zero counts every near-equal code ranks alike and the nearest wins: the counts are of nearest codes.
    tokenizer.quantizer.set_code_preference(torch.zeros(tokenizer.codebook_size))
    if isinstance(images, np.ndarray):
        chosen = np.linspace(0, len(images) - 1, min(len(images), PREFERENCE_IMAGES)).round().astype(int)
        batches = [chosen[start : start + batch_size] for start in range(0, len(chosen), batch_size)]
    else:
        rng = np.random.default_rng([seed, 7])
        batches = [min(batch_size, PREFERENCE_IMAGES - start) for start in range(0, PREFERENCE_IMAGES, batch_size)]
    counts = torch.zeros(tokenizer.codebook_size)
    for batch in tqdm(batches, desc="code preference", unit="batch", disable=not progress):
        arrays = (images[batch] if isinstance(images, np.ndarray)
                  else random_crops(images, batch, config.image_size, rng))
        pixels = to_pixel_values(arrays, config.image_mean, config.image_std).to(device)
        codes = tokenizer.encode(pixels)
        counts += torch.bincount(codes.flatten().cpu(), minlength=tokenizer.codebook_size).float()
    tokenizer.quantizer.set_code_preference(counts)
    tokenizer.train(was_training)
    return counts


def main(cfg: TokenizerTrainConfig, resume: bool = False) -> Path:
    # --- setup
    out = Path(cfg.out)
    if int(os.environ.get("RANK", "0")) == 0:  # one process cleans up; the others only look
        recover_final(out)
    if trained_already(out, "tokenizer"):
        return out
    folder = is_image_folder(cfg.data)
    if folder:  # a wrong --data fails here, before the model is built
        list_images(cfg.data)
    else:
        check_data_path(cfg.data)
    pairing = cfg.paired_share > 0
    if pairing and folder:
        raise ValueError("paired_data works with training shards (records with keys), not a folder of photos")
    if pairing:
        check_data_path(cfg.paired_data)
    probe_device = "cuda" if (cfg.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu"
    precision = resolve_precision(cfg.precision, probe_device)
    set_seed(cfg.seed)
    model = build_tokenizer(cfg)
    # Under DDP the discriminator's weights get no gradient from the generator's backward pass.
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=model.discriminator is not None)
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=probe_device == "cpu",
                              kwargs_handlers=[ddp_kwargs])
    config = model.config
    if folder:
        data = load_photos(cfg.data, config.image_size, cfg.crop_max_side, cfg.max_images,
                           progress=accelerator.is_main_process)
        sampler = CropSampler(data, cfg.batch_size, config.image_size, cfg.seed, accelerator.process_index)
        next_batch = sampler.next_batch
        described = f"{len(data.images)} photos (random crops)"
    else:
        data = load_images(cfg.data, config.image_size, cfg.max_images, progress=accelerator.is_main_process)
        sampler = EpochSampler(len(data.images), cfg.batch_size, cfg.seed, accelerator.process_index,
                               accelerator.num_processes)

        def next_batch() -> np.ndarray:
            return data.images[sampler.next_indices()]

        described = f"{len(data.images)} images"
        if pairing:
            paired = _paired_images(cfg.paired_data, data, config.image_size, accelerator.is_main_process)
            described += f", {cfg.paired_share:.0%} a batch in their paired renderings"

            def next_batch() -> tuple[np.ndarray, np.ndarray]:
                indices = sampler.next_indices()
                return data.images[indices], paired[indices]
    trainable = model.generator_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    scheduler = _cosine_with_floor(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_learning_rate_ratio)
    stateful = {"optimizer": optimizer, "scheduler": scheduler}
    # The PatchGAN (off in the shapes recipe) has its own optimizer, stepped after the generator's.
    discriminator_optimizer = None
    if model.discriminator is not None:
        discriminator_optimizer = torch.optim.AdamW(model.discriminator.parameters(), lr=cfg.learning_rate,
                                                    betas=(0.5, 0.9), weight_decay=cfg.weight_decay)
        stateful["discriminator_optimizer"] = discriminator_optimizer
    checkpoints = out / "checkpoints"
    if accelerator.is_main_process:
        recover_leftovers(checkpoints)  # a checkpoint save cut short by a kill: undo it before reading or saving
    accelerator.wait_for_everyone()
    start_step = 0
    if resume and (last := latest_checkpoint(checkpoints)) is not None:
        model.load_state_dict(DualCodebookTokenizer.from_pretrained(last / "model").state_dict())
        state = load_training_state(last, stateful)
        sampler.load_state(state["sampler"])
        start_step = int(state["step"])
        if accelerator.is_main_process:
            print(f"resuming from {last} at step {start_step}")
            metrics = out / "metrics.jsonl"
            # A last line cut short by the kill: dropped, or the resumed run's first line would run into it.
            if metrics.is_file() and (dropped := rewrite_jsonl(metrics)):
                print(f"dropped {len(dropped)} unreadable line(s) of {metrics} (a write cut short by the kill)")
    elif resume and accelerator.is_main_process:
        print(f"no checkpoint under {checkpoints}; starting from scratch")
    model, optimizer = accelerator.prepare(model, optimizer)
    if discriminator_optimizer is not None:
        discriminator_optimizer = accelerator.prepare(discriminator_optimizer)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "train_recipe.yaml")
        params = sum(p.numel() for p in trainable) / 1e6
        print(f"tokenizer: {params:.2f}M trainable parameters, grid {unwrapped.grid_size}, K={unwrapped.codebook_size}, "
              f"{config.quantizer_mode} quantizer, {described}, {precision} on {accelerator.device}")

    # --- train
    metrics_file = out / "metrics.jsonl"
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="train-tokenizer",
               unit="step", disable=not accelerator.is_main_process)
    started, images_seen = time.time(), 0
    model.train()
    for step in bar:
        batch = next_batch()
        clean, drawn = batch if pairing else (batch, batch)
        pixels = to_pixel_values(clean, config.image_mean, config.image_std).to(accelerator.device)
        # Both choices seeded by step: a resumed run feeds the same inputs.
        if pairing:
            chosen = np.random.default_rng([cfg.seed, step, accelerator.process_index, 1]).random(len(clean))
            drawn = np.where((chosen < cfg.paired_share)[:, None, None, None], drawn, clean)
        if cfg.rescale_share > 0:
            drawn = rescale_round_trip(drawn, cfg.rescale_share, cfg.rescale_factors,
                                       np.random.default_rng([cfg.seed, step, accelerator.process_index]))
        inputs = pixels if drawn is clean else to_pixel_values(drawn, config.image_mean, config.image_std).to(
            accelerator.device)
        with accelerator.autocast():
            output = model(inputs, step=step, target=pixels)
        loss = output["loss"]
        if not torch.isfinite(loss):
            raise RuntimeError(
                f"loss became {loss.item()} at step {step}; the last good checkpoint is kept under {checkpoints}. "
                "Lower learning_rate or resume with --resume."
            )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if discriminator_optimizer is not None and unwrapped.gan_active(step):
            with accelerator.autocast():
                discriminator_loss = unwrapped.discriminator_loss(pixels, output["reconstruction"].detach())
            discriminator_optimizer.zero_grad(set_to_none=True)
            accelerator.backward(discriminator_loss)
            discriminator_optimizer.step()
        images_seen += pixels.shape[0] * accelerator.num_processes
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            record = {
                "step": done,
                "loss": loss.item(),
                **{k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in output.get("losses", {}).items()},
                "psnr": _psnr(output["reconstruction"].detach(), pixels, config.image_std[0]),
                "codebook_usage": unwrapped.quantizer.usage_fraction(),
                "lr": scheduler.get_last_lr()[0],
                "images_per_s": images_seen / max(time.time() - started, 1e-6),
            }
            unwrapped.quantizer.reset_usage()
            if accelerator.is_main_process:
                bar.set_postfix(loss=f"{record['loss']:.3f}", psnr=f"{record['psnr']:.1f}",
                                usage=f"{record['codebook_usage']:.2f}")
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
        if done % cfg.save_every == 0 and done < cfg.max_steps and accelerator.is_main_process:
            save_checkpoint(checkpoints / f"step-{done}", unwrapped.save_pretrained, stateful,
                            {"step": done, "sampler": sampler.state()}, keep=cfg.keep_checkpoints)
        if done % cfg.save_every == 0:
            accelerator.wait_for_everyone()

    # --- save
    if accelerator.is_main_process:
        if config.code_preference_margin > 0:
            count_code_preference(unwrapped, data.images, accelerator.device, seed=cfg.seed, progress=True)
        save_final(unwrapped, out)
        print(f"tokenizer saved to {out} ({time.time() - started:.0f}s of training)")
    accelerator.wait_for_everyone()
    return out


__all__ = ["TokenizerTrainConfig", "build_tokenizer", "main"]
