"""Teaching a trained shapes tokenizer's encoder to read objects anywhere in their cell (`mllm tune-encoder`).

A tokenizer trained on the varied world reads objects within VARIED_MAX_JITTER of their cell's centre; a
renderer that puts them further off (up to 0.21 of the cell side) got 91% judge agreement, the misses mostly
squares and triangles read as circles (docs/experiments.md, section 33). Training the whole tokenizer on
objects anywhere in the cell fixes that but gives the model new codes to learn, and in the demo's steps the
model fell below the two-image bar (section 33). This tunes the encoder alone, after the model is trained:
the codebooks and the decoder stay as they are, so every code keeps its meaning and the model needs no new
training.

Each step draws training scenes (train-split seeds from FIRST_SCENE, past any demo's data) rendered three
ways, as shares of the batch: objects anywhere in the cell (`render(..., look="varied", max_jitter=0.5)`),
the varied world itself, and the exact render. The target of every position is the code the tokenizer gave
the scene's exact render before tuning; the loss is the cross-entropy of the positions' distances to the
codes the exact renders use (`-distance / temperature` as logits), so the encoder keeps telling the cell
contents apart and moves off-centre objects onto the content's code. Near-duplicate codes of one content
(several codes decode to white) are left out of the logits: the tokenizer's preference for common codes
(`tokenizer.code_preference_margin`) already picks among them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FIRST_SCENE = 2_000_000  # train-split scene index of the first scene this draws (chat-threshold's are 1e6 on)
RESULT_NAME = "encoder_tuning.json"  # written next to the tuned tokenizer's config.json



class MarginTooWide(ValueError):
    """The preference margin asked for would let one cell content's codes stand for another's (a tokenizer
    trained too briefly to hold its contents apart)."""

@dataclass
class EncoderTuneConfig:
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 1e-4
    scenes: int = 4096  # distinct training scenes (each rendered the three ways)
    max_jitter: float = 0.5  # the "anywhere" renders' bound on centre offsets, in cell sides
    anywhere_share: float = 0.5  # of each batch; the varied world gets varied_share, the exact render the rest
    varied_share: float = 0.25
    temperature: float = 0.05
    # The tuned tokenizer's `code_preference_margin`: the encoder learns the contents' codes, not which of a
    # content's near-duplicate codes the old encoder picked, so the tuned one snaps to the common code within
    # this margin (the demo's 37 cell contents lie at least 0.136 apart). None: keep the tokenizer's own.
    preference_margin: float | None = 0.02
    check_scenes: int = 300  # held-out scenes (test split) for the before/after figures
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch_size", "scenes", "check_scenes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not self.temperature > 0:
            raise ValueError("learning_rate and temperature must be positive")
        if not 0.0 <= self.max_jitter <= 0.5:
            raise ValueError(f"max_jitter must lie in [0, 0.5] (cell sides), got {self.max_jitter}")
        if self.preference_margin is not None and self.preference_margin < 0:
            raise ValueError(f"preference_margin must be >= 0, got {self.preference_margin}")
        if self.anywhere_share < 0 or self.varied_share < 0 or self.anywhere_share + self.varied_share > 1:
            raise ValueError("anywhere_share and varied_share must be >= 0 and sum to at most 1")


def tokenizer_folder(path: str | Path) -> Path:
    """A tokenizer folder, or a model folder's vision_tokenizer/."""
    path = Path(path)
    if (path / "vision_tokenizer" / "config.json").is_file():
        return path / "vision_tokenizer"
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    raise FileNotFoundError(f"{path} is neither a tokenizer folder nor a model folder with vision_tokenizer/")


def _encoders(tokenizer) -> list:
    return [m for m in (tokenizer.local_encoder, tokenizer.pixel_encoder, tokenizer.semantic_encoder) if m is not None]


def _position_features(tokenizer, pixel_values):
    """(B, 3, S, S) -> {branch: (B * h * w, d) unit rows}, the quantizer's inputs, with gradients."""
    from tokenizer_vision.quantizer import _unit_rows

    z_sem, z_pix = tokenizer.encoder_outputs(pixel_values)
    maps = {"sem": z_sem, "pix": z_pix}
    return {branch: _unit_rows(maps[branch]) for branch in tokenizer.quantizer.branches}


def _renders(scenes: list, size: int, cfg: EncoderTuneConfig) -> dict[str, list]:
    from mllm.data import shapes

    return {"anywhere": [shapes.render(s, size, look="varied", max_jitter=cfg.max_jitter) for s in scenes],
            "varied": [shapes.render(s, size, look="varied") for s in scenes],
            "exact": [shapes.render(s, size) for s in scenes]}


def _batched(function, items: list, size: int = 256):
    import torch

    return torch.cat([function(items[i:i + size]) for i in range(0, len(items), size)])


def judge_agreement(tokenizer, images: list, scenes: list) -> float:
    """% of images whose reconstruction the judge reads as the scene."""
    import torch

    from mllm.data.judge import parse_image

    with torch.no_grad():
        codes = _batched(tokenizer.encode, images)
    right = sum(parse_image(image) == list(scene.objects)
                for image, scene in zip(tokenizer.decode_images(codes), scenes))
    return round(100.0 * right / len(scenes), 2)


def tune_encoder(path: str | Path, cfg: EncoderTuneConfig | None = None, out: str | Path | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Tune the encoder of the tokenizer at `path` (a tokenizer or model folder) in place, or into `out` (a
    copy of the tokenizer folder). Returns, and writes next to the weights, the judge agreement on held-out
    "anywhere" renders and the share of held-out varied and exact renders whose codes stay those before."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from mllm.data import shapes
    from mllm.runtime import autocast, resolve_precision
    from tokenizer_vision import DualCodebookTokenizer
    from tokenizer_vision.model import WEIGHTS_NAME

    cfg = cfg or EncoderTuneConfig()
    cfg.validate()
    source = tokenizer_folder(path)
    target = Path(out) if out is not None else source
    tokenizer = DualCodebookTokenizer.from_pretrained(source, device="cpu", dtype=torch.float32)
    if not tokenizer.config.uses_semantic and not tokenizer.config.uses_pixel:
        raise ValueError(f"{source} has no encoder to tune")
    size = tokenizer.image_size
    usage_counts = tokenizer.quantizer.usage_counts.clone()  # encoding here must not change the saved statistics
    started = time.time()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)

    scenes = [shapes.make_scene(shapes.scene_seed("train", FIRST_SCENE + i)) for i in range(cfg.scenes)]
    check = [shapes.make_scene(shapes.scene_seed("test", FIRST_SCENE + i)) for i in range(cfg.check_scenes)]
    renders, check_renders = _renders(scenes, size, cfg), _renders(check, size, cfg)
    pixels = {kind: tokenizer.processor.preprocess(images) for kind, images in renders.items()}
    with torch.no_grad():
        targets = _batched(tokenizer.encode, renders["exact"])  # (N, h, w)
        before = {kind: _batched(tokenizer.encode, images) for kind, images in check_renders.items()}
    before_agreement = judge_agreement(tokenizer, check_renders["anywhere"], check)

    quantizer = tokenizer.quantizer
    used = torch.unique(targets)  # the codes of the cell contents
    slot = torch.full((quantizer.codebook_size,), -1, dtype=torch.long)
    slot[used] = torch.arange(len(used))
    labels = slot[targets]  # (N, h, w) index into `used`
    codes = {branch: F.normalize(quantizer.codebook(branch).detach().float(), dim=-1)[used]
             for branch in quantizer.branches}
    if cfg.preference_margin is not None:  # checked before training: the codes do not move
        if not bool(quantizer.code_preference.any()):
            raise ValueError(f"{source} keeps no code counts (it was trained without code_preference_margin), so "
                             "it cannot prefer common codes; pass --preference-margin 0 to keep its own setting")
        gap = _smallest_gap(quantizer, codes)
        if cfg.preference_margin >= gap / 2:
            raise MarginTooWide(f"preference_margin {cfg.preference_margin} would merge cell contents (their codes "
                                f"lie {gap:.3g} apart); use less than {gap / 2:.3g}")

    tokenizer.requires_grad_(False)
    parameters = [p for encoder in _encoders(tokenizer) for p in encoder.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=0.0)
    # bf16 autocast where the CPU has bf16 units (as in training); the distances stay fp32.
    precision = resolve_precision("auto", "cpu")
    anywhere_end = cfg.anywhere_share
    varied_end = cfg.anywhere_share + cfg.varied_share
    losses = []
    for _ in tqdm(range(cfg.steps), desc="tuning the encoder", disable=not progress):
        index = torch.randint(0, cfg.scenes, (cfg.batch_size,), generator=generator)
        draw = torch.rand(cfg.batch_size, generator=generator)[:, None, None, None]
        batch = torch.where(draw < anywhere_end, pixels["anywhere"][index],
                            torch.where(draw < varied_end, pixels["varied"][index], pixels["exact"][index]))
        with autocast(precision, "cpu"):
            features = _position_features(tokenizer, batch)
        logits = -quantizer.combined_distances({b: f.float() for b, f in features.items()}, codes) / cfg.temperature
        loss = F.cross_entropy(logits, labels[index].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    tokenizer.requires_grad_(False)
    tokenizer.eval()
    if cfg.preference_margin is not None:
        tokenizer.config.code_preference_margin = quantizer.preference_margin = cfg.preference_margin

    with torch.no_grad():
        after = {kind: _batched(tokenizer.encode, images) for kind, images in check_renders.items()}
    figures = {
        "anywhere_judge_agreement_before": before_agreement,
        "anywhere_judge_agreement": judge_agreement(tokenizer, check_renders["anywhere"], check),
        "varied_judge_agreement": judge_agreement(tokenizer, check_renders["varied"], check),
        "exact_codes_kept": _share(after["exact"], before["exact"]),
        "varied_codes_of_exact_before": _share(before["varied"], before["exact"]),
        "varied_codes_of_exact": _share(after["varied"], after["exact"]),
        "anywhere_codes_of_exact_before": _share(before["anywhere"], before["exact"]),
        "anywhere_codes_of_exact": _share(after["anywhere"], after["exact"]),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "seconds": round(time.time() - started, 1),
        "config": asdict(cfg),
    }
    tokenizer.quantizer.usage_counts.copy_(usage_counts)
    _save(tokenizer, source, target, figures, WEIGHTS_NAME)
    return figures


def _share(codes, reference) -> float:
    """% of positions where `codes` equal `reference`."""
    return round(100.0 * float((codes == reference).float().mean()), 2)


def _smallest_gap(quantizer, codes: dict) -> float:
    """The smallest combined distance between two of the given codes."""
    distances = quantizer.combined_distances(codes, codes)
    distances.fill_diagonal_(float("inf"))
    return float(distances.min())


def _save(tokenizer, source: Path, target: Path, figures: dict, weights_name: str) -> None:
    """The weights, the config, then the figures, each written atomically: a killed run leaves the old or the
    new weights, and the figures file (the demo's marker) only once weights and config are in place."""
    import shutil

    from safetensors.torch import save_model

    from mllm.io import TMP_SUFFIX, aside, fsync_path, fsync_tree, write_file
    from tokenizer_vision.model import CONFIG_NAME

    if target != source:
        shutil.copytree(source, target, dirs_exist_ok=True)
    staging = aside(target / weights_name, TMP_SUFFIX)
    save_model(tokenizer, str(staging), metadata={"format": "pt"})  # drops aliases of tied tensors, as saving does
    fsync_path(staging)
    os.replace(staging, target / weights_name)
    # the config carries the preference margin the tuned encoder is meant to encode with
    write_file(target / CONFIG_NAME, json.dumps(tokenizer.config.to_dict(), indent=2) + "\n")
    write_file(target / RESULT_NAME, json.dumps(figures, indent=2) + "\n")
    fsync_tree(target)


__all__ = ["RESULT_NAME", "EncoderTuneConfig", "MarginTooWide", "judge_agreement", "tokenizer_folder", "tune_encoder"]
