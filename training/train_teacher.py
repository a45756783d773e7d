"""Recipe: a tiny CLIP teacher for the semantic branch of the visual tokenizer.

No pretrained weights can be downloaded on the machines this project targets, so the demo
trains its own teacher: a small transformers `CLIPModel`, contrastively on shapes-world
images and their captions. The result is an ordinary CLIP checkpoint folder
(config.json + model.safetensors + tokenizer + preprocessor_config.json), which the tokenizer
loads through exactly the code path a real CLIP/SigLIP folder takes.

    mllm train-teacher --data runs/demo/data/train --out runs/demo/teacher

setup (captioned images in memory, a word-level tokenizer over the captions, a small CLIP) -> train
(CLIP's contrastive loss on random batches, AdamW, cosine schedule) -> save (atomically: a killed run
never leaves a folder that looks complete). It trains in minutes, so it keeps no checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

from mllm.data.arrays import NoUsableImages, check_data_path, to_pixel_values
from mllm.data.image_folder import is_image_folder
from mllm.data.shards import read_records
from mllm.io import recover_dir, write_dir
from mllm.runtime import autocast, resolve_device, resolve_precision
from training.config import save_config
from training.data import ImageRecipeConfig, load_images, trained_already

TEACHER_MEAN = (0.5, 0.5, 0.5)
TEACHER_STD = (0.5, 0.5, 0.5)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


@dataclass
class TeacherConfig(ImageRecipeConfig):
    """The teacher recipe (`mllm train-teacher`): a CLIP's two towers and its training settings."""

    recipe_kind: ClassVar[str] = "teacher"

    data: str = ""  # shards with images and a `caption` field
    image_size: int = 64
    patch_size: int = 8
    # The vision tower (a ViT over (image_size / patch_size)^2 patches) and the text tower (a transformer over
    # the caption's words); each MLP is 4x its hidden size wide.
    vision_hidden_size: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    projection_dim: int = 128  # the shared embedding space of images and captions
    max_text_length: int = 48
    batch_size: int = 128  # contrastive: every other caption of the batch is a negative
    max_steps: int = 400
    weight_decay: float = 0.05
    log_every: int = 50

    def validate(self) -> None:
        super().validate()
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")


def build_word_tokenizer(texts: list[str], max_length: int):
    """A word-level HF fast tokenizer over the caption vocabulary (lower-cased, <eos> appended)."""
    splitter = pre_tokenizers.Whitespace()
    words = sorted({word for text in texts for word, _ in splitter.pre_tokenize_str(text.lower())})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
    )


def build_clip(cfg: TeacherConfig, tokenizer) -> CLIPModel:
    def tower(hidden_size: int, layers: int, heads: int) -> dict:
        return {"hidden_size": hidden_size, "intermediate_size": 4 * hidden_size, "num_hidden_layers": layers,
                "num_attention_heads": heads}

    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            **tower(cfg.text_hidden_size, cfg.text_layers, cfg.text_heads),
            "max_position_embeddings": cfg.max_text_length,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            **tower(cfg.vision_hidden_size, cfg.vision_layers, cfg.vision_heads),
        },
        projection_dim=cfg.projection_dim,
    )
    return CLIPModel(config)


def write_preprocessor_config(out: Path, image_size: int) -> None:
    """The standard CLIP image-processor description, so any HF-style loader reads size and normalisation."""
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(TEACHER_MEAN),
        "image_std": list(TEACHER_STD),
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def no_captions(data: str, what: str) -> ValueError:
    return ValueError(
        f"{data} has no image captions ({what}): train-teacher trains a CLIP on image-caption pairs; for "
        "images without captions pass a pretrained vision tower folder (CLIP, SigLIP or ViT) as "
        "`mllm train-tokenizer --teacher DIR` instead"
    )


CAPTION_PEEK = 100  # records looked at for a caption before the whole set is loaded


def load_captioned_images(cfg: TeacherConfig):
    """The image-caption pairs of `cfg.data`. A folder of images, or shards whose first records have no
    caption (e.g. `mllm data convert-llava` output), is refused at once with a pointer to a pretrained tower."""
    if is_image_folder(cfg.data):
        raise no_captions(cfg.data, "a folder of images")
    check_data_path(cfg.data)
    count = 0
    for count, record in enumerate(islice(read_records(cfg.data, split=False), CAPTION_PEEK), start=1):
        caption = record["json"].get("caption")
        if isinstance(caption, str) and caption:
            break
    else:
        if count:
            first = "first " if count == CAPTION_PEEK else ""
            raise no_captions(cfg.data, f"none of its {first}{count} records has a `caption` field")
    try:
        return load_images(cfg.data, cfg.image_size, cfg.max_images, text_field="caption")
    except NoUsableImages as exn:
        if missing := exn.stats.skipped.get("missing_caption", 0):
            raise no_captions(cfg.data, f"none of its {missing} images has a `caption` field") from None
        raise


def main(cfg: TeacherConfig) -> Path:
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    out = Path(cfg.out)
    recover_dir(out)  # a save cut short by a kill: the folder it was replacing back, its partial copy gone
    if trained_already(out, "teacher"):
        return out

    # --- setup
    data = load_captioned_images(cfg)
    tokenizer = build_word_tokenizer(data.texts, cfg.max_text_length)
    encoded = tokenizer(data.texts, padding="max_length", truncation=True, max_length=cfg.max_text_length,
                        return_tensors="pt")
    model = build_clip(cfg, tokenizer).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    rng = np.random.default_rng(cfg.seed)
    n = len(data.texts)
    batch_size = min(cfg.batch_size, n)
    print(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {n} image-caption pairs, "
          f"{precision} on {device}")

    # --- train
    model.train()
    bar = tqdm(range(cfg.max_steps), desc="train-teacher", unit="step")
    start = time.time()
    for step in bar:
        idx = rng.choice(n, size=batch_size, replace=False)
        pixels = to_pixel_values(data.images[idx], TEACHER_MEAN, TEACHER_STD).to(device)
        ids = encoded["input_ids"][idx].to(device)
        mask = encoded["attention_mask"][idx].to(device)
        with autocast(precision, device):
            output = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True)
        loss = output.loss
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"teacher loss became {loss.item()} at step {step}; lower learning_rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
            accuracy = (output.logits_per_image.argmax(-1) == torch.arange(len(idx), device=device)).float().mean()
            bar.set_postfix(loss=f"{loss.item():.3f}", i2t_acc=f"{accuracy.item():.2f}")
    print(f"trained {cfg.max_steps} steps in {time.time() - start:.0f}s")

    # --- save atomically (mllm.io.write_dir): a killed run never leaves a folder that looks complete, and a
    # folder it replaces goes only once the new one is in place
    def write(tmp: Path) -> None:
        model.eval().to("cpu").save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_preprocessor_config(tmp, cfg.image_size)
        save_config(cfg, tmp / "teacher_recipe.yaml")

    write_dir(out, write)
    print(f"teacher saved to {out}")
    return out


__all__ = ["TEACHER_MEAN", "TEACHER_STD", "TeacherConfig", "build_clip", "build_word_tokenizer", "main",
           "write_preprocessor_config"]
