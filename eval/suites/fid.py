"""`fid`: FID (and optionally CLIP score) of drawn images against reference images, via torchmetrics.

    mllm eval --suite fid --model runs/demo/model --out runs/demo/eval/fid [--limit 500]
    mllm eval --suite fid --model M --data refs.jsonl --option inception=pt_inception-2015-12-05.pth
    mllm eval --suite fid --model M --option clip=runs/demo/teacher

Items (one image per prompt, seed 0):
    shapes world (no --data)  the first `limit` (default 1000) samples of the held-out "test" split:
                              prompt = the sample's drawing prompt (`iter_samples(...)[i]["prompt"]`, the
                              prompt the training data pairs with such a scene), reference = its render
                              at the data's default size (64 px)
    --data FILE               a JSONL of {"prompt", "image"} rows; relative image paths are read from
                              the JSONL's folder

Features for FID (nothing is ever downloaded; torchmetrics' default Inception would download its weights):
    --option inception=PATH   torchmetrics' FID Inception (2048-d pool features) with its weights read
                              from PATH (FID Inception weights, `pt_inception-2015-12-05-6726825d.pth`);
                              needs the `torch-fidelity` package and a torchmetrics whose
                              FrechetInceptionDistance takes `feature_extractor_weights_path`.
    the shapes teacher        default on the shapes world: the frozen CLIP-style teacher of the model
                              folder's vision tokenizer (`teacher_features`, mean-pooled over the code
                              grid to one vector per image). Its FID is NOT comparable to published FID:
                              use it to compare checkpoints of the shapes demo with each other. With
                              --data it is used only on request (`--option features=teacher`).
    --option teacher=DIR      take the teacher from this tokenizer (or model) folder instead of --model.

CLIP score (torchmetrics' CLIPScore: 100 x cosine of image and text embeddings): only with
`--option clip=PATH`, a local transformers CLIPModel folder with its tokenizer and
preprocessor_config.json (e.g. the shapes teacher folder written by `mllm train-teacher`); otherwise
skipped with a note. `clip_score_reference` is the same score of the reference images: the ceiling.

Other options: batch_size=N (default 16), device=cpu|cuda|auto (default auto).

Limitations: FID is biased upwards at small sample counts (compare runs only at equal --limit) and needs
at least 2 images per side; the teacher's feature width (e.g. 128) needs more images than that to give a
full-rank covariance.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from eval.suites.base import Item, ScoreContext, Suite, int_option, jsonl_objects
from eval.suites.shapes_t2i import resolve_image_path
from eval.suites.tokenizer import find_tokenizer_folder

DEFAULT_SHAPES_ITEMS = 1000
DEFAULT_BATCH_SIZE = 16
INCEPTION_SIZE = 299  # what torchmetrics' FID Inception resizes to anyway
TEACHER_NOTE = (
    "FID on the shapes teacher's features, not Inception: not comparable to published FID (use it to compare "
    "shapes-world models with each other)"
)


class FeatureSourceError(ValueError):
    """No usable feature extractor for FID; the message says which option to pass."""


def _teacher_folder(path: str | Path) -> Path:
    """A model folder (its vision_tokenizer/) or a tokenizer folder -> the tokenizer folder."""
    path = Path(path)
    return find_tokenizer_folder(path, lambda neither: FeatureSourceError(f"{path} is {neither}"))


def _load_teacher(path: str | Path, device):
    """The vision tokenizer at `path` (model or tokenizer folder), checked to have a teacher."""
    from tokenizer_vision import DualCodebookTokenizer

    tokenizer = DualCodebookTokenizer.from_pretrained(_teacher_folder(path), device=device)
    if tokenizer.teacher is None:
        raise FeatureSourceError(
            f"the vision tokenizer in {path} is pixel-only and has no semantic teacher; pass "
            "--option inception=PATH (local FID Inception weights) instead"
        )
    return tokenizer


def teacher_feature_module(tokenizer):
    """An nn.Module for torchmetrics' FID: uint8 (B, 3, S, S) -> (B, C) mean-pooled teacher features.

    S must be the tokenizer's image size (the images are resized before they get here); the module
    normalises them as the tokenizer's processor does, and exposes `num_features` as torchmetrics asks.
    """
    import torch
    from torch import nn

    class TeacherFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = tokenizer
            mean = torch.tensor(tokenizer.config.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(tokenizer.config.image_std, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer("mean", mean.to(tokenizer.device), persistent=False)
            self.register_buffer("std", std.to(tokenizer.device), persistent=False)
            size = tokenizer.image_size
            probe = torch.full((1, 3, size, size), 255, dtype=torch.uint8, device=tokenizer.device)
            self.num_features = int(self.forward(probe).shape[-1])

        @torch.no_grad()
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            if images.dtype != torch.uint8:
                raise TypeError(f"expected uint8 images, got {images.dtype}")
            pixels = (images.to(self.mean.device).float() / 255.0 - self.mean) / self.std  # (B, 3, S, S)
            features = self.tokenizer.teacher_features(pixels.to(self.tokenizer.dtype))  # (B, C, h, w)
            return features.float().mean(dim=(2, 3))  # (B, C)

    return TeacherFeatures().eval()


def inception_fid(weights: str | Path):
    """torchmetrics' FID with Inception weights read from a local file (never downloaded)."""
    import inspect

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    weights = Path(weights)
    if not weights.is_file():
        raise FeatureSourceError(f"--option inception={weights}: no such file (FID Inception weights, .pth)")
    if (
        "feature_extractor_weights_path"
        not in inspect.signature(FrechetInceptionDistance.__init__).parameters
    ):
        raise FeatureSourceError(
            "this torchmetrics' FrechetInceptionDistance cannot read Inception weights from a local file "
            "(no feature_extractor_weights_path); upgrade torchmetrics, or drop --option inception to use "
            "the shapes teacher's features"
        )
    if not _TORCH_FIDELITY_AVAILABLE:
        raise FeatureSourceError(
            "torchmetrics' Inception FID needs the torch-fidelity package (pip install torch-fidelity); or "
            "drop --option inception to use the shapes teacher's features"
        )
    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))


def load_local_clip(path: str | Path):
    """(CLIPModel, processor) from a local folder, for `CLIPScore(model_name_or_path=callable)`.

    The model is wrapped so that its feature methods return tensors whatever the transformers version.
    The processor pairs the folder's own tokenizer (AutoTokenizer: the shapes teacher has a word-level
    one, not CLIPTokenizer) with its image processor, truncating text to the model's positions.
    """
    from torchmetrics.utilities import checks

    if getattr(checks, "_SKIP_SLOW_DOCTEST", False):
        raise RuntimeError(
            "SKIP_SLOW_DOCTEST is set: with it torchmetrics downloads openai/clip-vit-large-patch14 when its "
            "CLIP score module is imported; unset it to compute CLIP score offline"
        )
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--option clip={path}: not a local CLIPModel folder (no config.json)")
    if not (path / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"--option clip={path}: no preprocessor_config.json (the image processor)")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError) as error:
        raise ValueError(f"--option clip={path}: cannot load a CLIPModel from it ({error})") from None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    max_length = int(model.config.text_config.max_position_embeddings)

    class LocalCLIPProcessor:
        def __call__(self, text=None, images=None, return_tensors="pt", padding=True, **_: Any):
            if text is not None:
                return dict(
                    tokenizer(
                        text,
                        padding=padding,
                        truncation=True,
                        max_length=max_length,
                        return_tensors=return_tensors,
                    )
                )
            return dict(image_processor(images=images, return_tensors=return_tensors))

    return _tensor_features(model), LocalCLIPProcessor()


def _tensor_features(model):
    """The CLIP model with `get_image_features` / `get_text_features` returning tensors.

    transformers 5 returns a model output whose `pooler_output` holds the projected embeddings, where
    torchmetrics (1.9) expects the tensor itself; this wrapper gives it the tensor either way.
    """
    from torch import nn

    def tensor(output):
        return output if not hasattr(output, "pooler_output") else output.pooler_output

    class CLIPFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = model
            self.config = model.config

        def get_image_features(self, *args, **kwargs):
            return tensor(self.clip.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return tensor(self.clip.get_text_features(*args, **kwargs))

    return CLIPFeatures().eval()


def _uint8(image):
    """PIL image -> uint8 tensor (3, H, W)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _uint8_batch(images, size: int):
    """PIL images -> uint8 tensor (B, 3, size, size), each resized and centre-cropped to a square (the
    tokenizer's own resize + crop)."""
    import torch

    from tokenizer_vision.image_processing import ImageProcessor

    square = ImageProcessor(size).resize_and_crop
    return torch.stack([_uint8(square(image.convert("RGB"))) for image in images])


def _read_reference_file(path: str | Path) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'--data {path}: not a file; fid takes a JSONL of {{"prompt", "image"}} rows')
    items = []
    rows = jsonl_objects(path, ("prompt", "image"), 'an object with string "prompt" and "image" (a path)',
                         f"--data {path}: no rows")
    for where, row in rows:
        image = Path(row["image"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise FileNotFoundError(f"{where}: reference image {image} does not exist")
        items.append(
            Item(
                id=str(row.get("id", f"{len(items):05d}")),
                prompt=row["prompt"],
                meta={"reference": str(image), "source": "data"},
            )
        )
    return items


class FIDSuite(Suite):
    """FID and CLIP score of drawn images (see the module docstring)."""

    kind = "draw"
    images_per_prompt = 1
    needs_data = False
    primary_metric = "fid"  # lower is better
    data_help = ('optional: a JSONL of {"prompt", "image"} (image paths relative to the JSONL); '
                 "default: held-out shapes scenes")
    option_names = ("inception", "features", "teacher", "clip", "batch_size", "device")

    def __init__(self) -> None:
        self.name = "fid"

    def configure(self, options: dict[str, Any] | None) -> None:
        """Nothing to set before drawing (one image per prompt); kept for a uniform runner."""

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        if data:
            items = _read_reference_file(data)
            return items[:limit] if limit is not None else items
        from mllm.data.shapes import iter_samples

        items = []
        for sample in iter_samples(DEFAULT_SHAPES_ITEMS if limit is None else limit, split="test"):
            items.append(
                Item(
                    id=sample["key"],
                    prompt=sample["prompt"],
                    meta={"scene": sample["scene"], "source": "shapes"},
                )
            )
        return items

    def _reference(self, item: Item):
        from PIL import Image

        if "scene" in item.meta:
            from mllm.data.shapes import Scene, render

            return render(Scene.from_dict(item.meta["scene"]))
        with Image.open(item.meta["reference"]) as image:
            return image.convert("RGB")

    def _fid_metric(self, items: list[Item], context: ScoreContext, device):
        """(metric, image size to feed it, note) for the configured feature source."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        options = context.options or {}
        if options.get("inception"):
            metric = inception_fid(options["inception"])
            return metric, INCEPTION_SIZE, "FID on Inception-v3 pool features (torchmetrics, local weights)"
        features = options.get("features", "")
        if features not in ("", "teacher"):
            raise FeatureSourceError(
                f"--option features={features!r}: expected 'teacher' (or pass inception=PATH)"
            )
        on_shapes = all(item.meta.get("source") == "shapes" for item in items)
        if not on_shapes and features != "teacher":
            raise FeatureSourceError(
                "fid on --data needs a feature extractor: pass --option inception=PATH (local FID Inception "
                "weights) or --option features=teacher to use the model's shapes teacher (not comparable to "
                "published FID)"
            )
        source = options.get("teacher") or context.model
        if not source:
            raise FeatureSourceError(
                "fid has no feature extractor: pass --model (a model folder whose vision tokenizer has a "
                "teacher), --option teacher=DIR (a tokenizer folder) or --option inception=PATH (local FID "
                "Inception weights); nothing is downloaded"
            )
        tokenizer = _load_teacher(source, device)
        module = teacher_feature_module(tokenizer)
        metric = FrechetInceptionDistance(feature=module)
        return metric, tokenizer.image_size, TEACHER_NOTE

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        from PIL import Image

        from mllm.runtime import resolve_device

        options = context.options or {}
        batch_size = int_option(options, "batch_size", DEFAULT_BATCH_SIZE)
        device = resolve_device(options.get("device") or "auto")

        pairs = []  # (item, generated image path)
        missing = []
        for item in items:
            paths = (predictions.get(item.id) or {}).get("images") or []
            if not paths:
                missing.append(item.id)
            for path in paths:
                pairs.append((item, resolve_image_path(context.out, path, item.id)))
        scored_items = list(dict.fromkeys(item.id for item, _ in pairs))
        if len(pairs) < 2:
            raise ValueError(
                f"FID needs at least 2 generated images, found {len(pairs)}; check the predictions file (and "
                "draw more items: FID is only meaningful over hundreds of images)"
            )

        metric, size, feature_note = self._fid_metric(items, context, device)
        metric = metric.to(device)
        clip, clip_reference = self._clip_metrics(options)
        if clip is not None:
            clip, clip_reference = clip.to(device), clip_reference.to(device)
        seen_references: set[str] = set()
        for begin in range(0, len(pairs), batch_size):
            batch = pairs[begin : begin + batch_size]
            generated = []
            for _, path in batch:
                with Image.open(path) as image:
                    generated.append(image.convert("RGB"))
            references = []
            reference_prompts = []
            for item, _ in batch:  # each reference once, however many images its prompt got
                if item.id not in seen_references:
                    seen_references.add(item.id)
                    references.append(self._reference(item))
                    reference_prompts.append(item.prompt)
            metric.update(_uint8_batch(generated, size).to(device), real=False)
            if references:
                metric.update(_uint8_batch(references, size).to(device), real=True)
            if clip is not None:  # CLIP's own processor resizes; images go in as they are
                clip.update(
                    [_uint8(image).to(device) for image in generated], [item.prompt for item, _ in batch]
                )
                if references:
                    clip_reference.update(
                        [_uint8(image).to(device) for image in references], reference_prompts
                    )
        if len(seen_references) < 2:
            raise ValueError("FID needs at least 2 reference images; score more items")
        fid = max(float(metric.compute()), 0.0)  # rounding can leave -1e-14 for identical sets

        metrics: dict[str, Any] = {"fid": fid, "images": len(pairs), "references": len(seen_references)}
        notes = [
            feature_note,
            "fid: lower is better; biased upwards at small sample counts (compare at equal --limit)",
        ]
        if clip is not None:
            metrics["clip_score"] = float(clip.compute())
            metrics["clip_score_reference"] = float(clip_reference.compute())
            notes.append(
                f"clip_score from the local CLIP model {options['clip']} (reference images: the ceiling)"
            )
        else:
            notes.append(
                "CLIP score skipped: pass --option clip=PATH (a local CLIPModel folder, e.g. the shapes "
                "teacher from `mllm train-teacher`)"
            )
        if missing:
            notes.append(f"{len(missing)} of {len(items)} items had no images and were left out")
        return {"metrics": metrics, "breakdown": {}, "count": len(scored_items), "notes": notes}

    def _clip_metrics(self, options: dict[str, Any]):
        """(generated, reference) CLIPScore metrics sharing one local CLIP model, or (None, None)."""
        path = options.get("clip")
        if not path:
            return None, None
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"--option clip={path}: not a folder (a local CLIPModel folder is needed)"
            )
        model, processor = load_local_clip(path)  # checks first that importing CLIPScore downloads nothing
        from torchmetrics.multimodal.clip_score import CLIPScore

        return (
            CLIPScore(model_name_or_path=lambda: (model, processor)),
            CLIPScore(model_name_or_path=lambda: (model, processor)),
        )


SUITES = {"fid": FIDSuite}
