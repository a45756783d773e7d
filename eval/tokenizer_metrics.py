"""Tokenizer quality on held-out images: PSNR, SSIM, codebook use, semantic cosine, judge agreement.

    mllm eval-tokenizer --tokenizer runs/demo/tokenizer --data runs/demo/data/test [--out DIR]
    mllm eval-tokenizer --tokenizer DIR --data HELD_OUT_PHOTOS

`--data` is image shards or a plain folder of images (`mllm.data.image_folder`); every image is resized so
its shorter side is the tokenizer's image size and centre-cropped, as `encode` does. PSNR and SSIM come from torchmetrics and are computed on what a user gets back: the
reconstruction rounded to 8-bit RGB, against the 8-bit original, both on the [0, 1] scale.
PSNR is the mean of per-image PSNRs. Judge agreement is the fraction of images in which the
shapes-world judge finds exactly the same objects in the original and the reconstruction; it is
reported only when the data are shapes-world scenes (their JSON carries a `scene`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mllm.runtime import autocast, resolve_device, resolve_precision


def _to_unit(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div(255.0)


@torch.no_grad()
def evaluate_tokenizer(tokenizer, data: str, batch_size: int = 64, limit: int | None = None,
                       precision: str = "auto", judge: bool | None = None, progress: bool = True) -> dict:
    """Encode and decode every image of `data`; return the metrics as a flat dict."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from mllm.data.arrays import load_image_arrays, to_pixel_values
    from mllm.data.judge import parse_image

    device = next(tokenizer.parameters()).device
    precision = resolve_precision(precision, device)
    config = tokenizer.config
    arrays = load_image_arrays(data, config.image_size, limit=limit, progress=progress)
    if judge is None:
        judge = _has_scenes(data)
    tokenizer.eval()
    psnrs, ssims, cosines = [], [], []
    used = torch.zeros(tokenizer.codebook_size, dtype=torch.bool)
    agree = judged = 0
    examples = []
    started = time.time()
    for begin in tqdm(range(0, len(arrays.images), batch_size), desc="eval-tokenizer", disable=not progress):
        originals = arrays.images[begin : begin + batch_size]
        pixels = to_pixel_values(originals, config.image_mean, config.image_std).to(device)
        with autocast(precision, device):
            codes = tokenizer.encode(pixels)  # (B, h, w)
            reconstructed = tokenizer.decode(codes)  # (B, 3, H, W), normalised
            cosine = tokenizer.semantic_cosine(pixels, codes) if config.quantizer_mode != "pixel" else None
        used[codes.flatten().cpu()] = True
        recon_images = tokenizer.processor.postprocess(reconstructed.float())
        recon_uint8 = np.stack([np.asarray(img, dtype=np.uint8) for img in recon_images])
        target, preds = _to_unit(originals), _to_unit(recon_uint8)
        psnrs.append(peak_signal_noise_ratio(preds, target, data_range=1.0, dim=(1, 2, 3), reduction="none"))
        ssims.append(structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none"))
        if cosine is not None:
            cosines.append(cosine.float().cpu().reshape(-1))
        if judge:
            for original, recon in zip(originals, recon_uint8):
                judged += 1
                agree += int(parse_image(original) == parse_image(recon))
        if len(examples) < 16:
            examples.extend(zip(originals[: 16 - len(examples)], recon_uint8))
    seconds = time.time() - started
    psnr = torch.cat(psnrs)
    results = {
        "images": len(arrays.images),
        "psnr": float(psnr.clamp(max=100.0).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "codebook_usage": float(used.float().mean()),
        "codes_used": int(used.sum()),
        "codebook_size": int(tokenizer.codebook_size),
        "grid": list(tokenizer.grid_size),
        "quantizer": config.quantizer_mode,
        "images_per_s": len(arrays.images) / seconds,
    }
    if cosines:
        results["semantic_cosine"] = float(torch.cat(cosines).mean())
    if judge:
        results["judge_agreement"] = agree / max(judged, 1)
    if arrays.stats.total_skipped:
        results["skipped"] = dict(arrays.stats.skipped)
    results["_examples"] = examples
    return results


def _has_scenes(data: str) -> bool:
    from mllm.data.image_folder import is_image_folder
    from mllm.data.shards import read_records

    if is_image_folder(data):
        return False
    for record in read_records(data):
        return "scene" in record["json"]
    return False


def format_table(results: dict) -> str:
    rows = [("PSNR (dB)", f"{results['psnr']:.2f}"), ("SSIM", f"{results['ssim']:.4f}"),
            ("codebook usage", f"{100 * results['codebook_usage']:.1f}% ({results['codes_used']}/{results['codebook_size']})")]
    if "semantic_cosine" in results:
        rows.append(("semantic cosine to teacher", f"{results['semantic_cosine']:.4f}"))
    if "judge_agreement" in results:
        rows.append(("judge agreement", f"{100 * results['judge_agreement']:.1f}%"))
    rows.append(("images", str(results["images"])))
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def save_examples(examples, path: Path) -> None:
    """Originals (top row) over reconstructions (bottom row) as one PNG."""
    from PIL import Image

    if not examples:
        return
    size = examples[0][0].shape[0]
    sheet = Image.new("RGB", (size * len(examples), size * 2), "white")
    for i, (original, recon) in enumerate(examples):
        sheet.paste(Image.fromarray(original), (i * size, 0))
        sheet.paste(Image.fromarray(recon), (i * size, size))
    sheet.save(path)


def report_tokenizer(tokenizer_dir: str | Path, data: str, out: str | Path | None = None, batch_size: int = 64,
                     limit: int | None = None, device: str = "auto", precision: str = "auto") -> dict:
    """`mllm eval-tokenizer`: the metrics of a tokenizer folder on held-out shards or images, written to
    OUT/results.json with OUT/examples.png (OUT defaults to TOKENIZER/eval); prints the table."""
    from tokenizer_vision import DualCodebookTokenizer

    tokenizer = DualCodebookTokenizer.from_pretrained(tokenizer_dir, device=resolve_device(device))
    results = evaluate_tokenizer(tokenizer, data, batch_size, limit, precision)
    out = Path(out) if out else Path(tokenizer_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    save_examples(results.pop("_examples"), out / "examples.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"wrote {out / 'results.json'} and {out / 'examples.png'}")
    return results
