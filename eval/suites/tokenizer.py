"""`tokenizer`: reconstruction quality of a model's vision tokenizer on held-out images (a custom suite).

    mllm eval --suite tokenizer --model runs/demo/model --data runs/demo/data/test --out runs/demo/eval/tok

--model is a model folder (its `vision_tokenizer/` is evaluated) or a tokenizer folder itself (the
output of `mllm train-tokenizer`). --data is required: image shards (`mllm.data.shards`), e.g. the
shapes test split, or a plain folder of images (`mllm.data.image_folder`). The work is `eval.tokenizer_metrics.evaluate_tokenizer` (same numbers as
`mllm eval-tokenizer`); this suite reports them in the common results format and writes
OUT/examples.png (originals over reconstructions).

Metrics: psnr (dB, mean of per-image PSNR on 8-bit images), ssim (0-1), codebook_usage (% of codes used
at least once), codes_used, codebook_size, semantic_cosine (semantic codes' cosine to the teacher, when
the tokenizer has a semantic branch), judge_agreement (% of images whose reconstruction the shapes judge
reads as the same objects; only on shapes-world shards), images, images_per_s. Primary metric: psnr.

Reads from the argparse namespace (all optional but model and data): model (or tokenizer), data,
batch_size (default 64), limit, device (default auto), precision (auto | bf16 | fp32), no_progress,
and the options (`options` as a dict or `option` as ["key=value"]): batch_size, device and precision
there (`--option precision=fp32`) win over the namespace's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval.suites.base import Item, ScoreContext, Suite, int_option

DEFAULT_BATCH_SIZE = 64


def find_tokenizer_folder(path: str | Path, error: Callable[[str], Exception]) -> Path:
    """A model folder (-> its vision_tokenizer/) or a tokenizer folder (-> itself); else raises
    `error("neither a model folder (with vision_tokenizer/) nor a vision tokenizer folder")`."""
    from mllm.config import VISION_TOKENIZER_DIR

    path = Path(path)
    if (path / VISION_TOKENIZER_DIR / "config.json").is_file():
        return path / VISION_TOKENIZER_DIR
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    raise error(f"neither a model folder (with {VISION_TOKENIZER_DIR}/) nor a vision tokenizer folder")


def tokenizer_folder(path: str | Path) -> Path:
    """A model folder (-> its vision_tokenizer/) or a tokenizer folder (-> itself)."""
    path = Path(path)
    return find_tokenizer_folder(path, lambda neither: FileNotFoundError(
        f"--model {path}: {neither} (config.json + model.safetensors, from `mllm train-tokenizer`)"))


def namespace_options(args) -> dict[str, str]:
    """Suite options from an argparse namespace: `options` (a dict) or `option` (["key=value", ...])."""
    options = getattr(args, "options", None)
    if isinstance(options, dict):
        return {str(key): value for key, value in options.items()}
    parsed = {}
    for entry in getattr(args, "option", None) or []:
        key, separator, value = str(entry).partition("=")
        if not separator or not key.strip():
            raise ValueError(f"--option {entry!r}: expected KEY=VALUE")
        parsed[key.strip()] = value
    return parsed


class TokenizerSuite(Suite):
    """Vision-tokenizer metrics (see the module docstring)."""

    kind = "custom"
    primary_metric = "psnr"
    option_names = ("batch_size", "device", "precision")

    def __init__(self) -> None:
        self.name = "tokenizer"

    def load_items(self, data: str | None, limit: int | None = None) -> list[Item]:
        return []  # custom: everything happens in `run`

    def score(self, predictions: dict[str, dict], items: list[Item], context: ScoreContext) -> dict[str, Any]:
        raise NotImplementedError("the tokenizer suite has no predictions to score; run it with `mllm eval`")

    def run(self, args, out: Path) -> dict[str, Any]:
        from eval.tokenizer_metrics import evaluate_tokenizer, save_examples
        from mllm.runtime import resolve_device
        from tokenizer_vision import DualCodebookTokenizer

        options = namespace_options(args)
        model = getattr(args, "model", None) or getattr(args, "tokenizer", None)
        data = getattr(args, "data", None)
        if not model:
            raise ValueError("the tokenizer suite needs --model: a model folder or a vision tokenizer folder")
        if not data:
            raise ValueError(
                "the tokenizer suite needs --data: held-out image shards, e.g. runs/demo/data/test "
                "(write some with `mllm data`), or a folder of images"
            )
        if not Path(data).exists():
            raise FileNotFoundError(f"--data {data}: no such file or folder (image shards or a folder of images expected)")
        batch_size = int_option(
            options, "batch_size", getattr(args, "batch_size", None) or DEFAULT_BATCH_SIZE
        )
        limit = getattr(args, "limit", None)
        device = resolve_device(options.get("device") or getattr(args, "device", None) or "auto")
        precision = options.get("precision") or getattr(args, "precision", None) or "auto"

        folder = tokenizer_folder(model)
        tokenizer = DualCodebookTokenizer.from_pretrained(folder, device=device)
        results = evaluate_tokenizer(
            tokenizer,
            str(data),
            batch_size=batch_size,
            limit=limit,
            precision=precision,
            progress=not getattr(args, "no_progress", False),
        )
        examples = results.pop("_examples", [])
        notes = [
            (
                f"vision tokenizer {folder}: {results['quantizer']} quantizer, "
                f"{results['grid'][0]}x{results['grid'][1]} codes, K={results['codebook_size']}"
            )
        ]
        if out is not None:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            save_examples(examples, out / "examples.png")
            notes.append("examples.png: originals (top) over reconstructions (bottom)")

        metrics: dict[str, Any] = {
            "psnr": results["psnr"],
            "ssim": results["ssim"],
            "codebook_usage": 100.0 * results["codebook_usage"],
            "codes_used": results["codes_used"],
            "codebook_size": results["codebook_size"],
        }
        if "semantic_cosine" in results:
            metrics["semantic_cosine"] = results["semantic_cosine"]
        if "judge_agreement" in results:
            metrics["judge_agreement"] = 100.0 * results["judge_agreement"]
        else:
            notes.append("judge_agreement skipped: the data are not shapes-world scenes")
        metrics["images"] = results["images"]
        metrics["images_per_s"] = results["images_per_s"]
        if results.get("skipped"):
            notes.append(f"skipped records: {results['skipped']}")
        return {"metrics": metrics, "breakdown": {}, "count": results["images"], "notes": notes}


SUITES = {"tokenizer": TokenizerSuite}
