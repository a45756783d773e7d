"""`mllm draw --model DIR "PROMPT" --out FILE.png [--n N --guidance S --seed S --temperature T --top-k K
--decoding auto|jacobi|sequential]`.

Writes FILE.png, or FILE-0.png, FILE-1.png, ... for --n > 1, and prints the paths. The images have
the visual tokenizer's size. Same prompt, --seed, --n and --decoding: the same images. --decoding:
speculative Jacobi decoding (jacobi), one code per forward pass (sequential), or auto (the default: jacobi
for up to 3 images at a time, the faster one); the same distribution either way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm.commands import _common as common
from mllm.commands.types import positive_int, unit_float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", metavar="PROMPT", help='what to draw, e.g. "a red circle at the top left"')
    parser.add_argument(
        "--out", required=True, type=Path, help="output image file (.png unless another suffix)"
    )
    parser.add_argument("--n", type=positive_int, default=1, help="images to draw (default: 1)")
    common.add_draw_sampling_arguments(parser, guidance_flag="--guidance", temperature_flag="--temperature")
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample among the k likeliest codes")
    parser.add_argument("--top-p", type=unit_float, default=None, help="nucleus sampling mass")
    common.add_model_arguments(parser)


def output_paths(out: Path, n: int) -> list[Path]:
    if not out.suffix:
        out = out.with_suffix(".png")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def run(args: argparse.Namespace) -> int:
    common.check_model_folder(args.model)
    common.check_text(args.prompt, "prompt")
    paths = output_paths(args.out, args.n)
    if paths[0].parent.exists() and not paths[0].parent.is_dir():
        raise NotADirectoryError(f"--out {args.out}: {paths[0].parent} is a file, not a folder (choose another --out)")
    from PIL import Image

    # Before the model loads: an extension PIL cannot write would otherwise fail after the drawing.
    if paths[0].suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out}: unknown image file extension {paths[0].suffix!r} (use .png, .jpg or "
                         ".webp)")
    model = common.load_model(args)
    images = model.draw(args.prompt, n=args.n, guidance_scale=args.guidance, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, decoding=args.decoding)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):
        try:
            image.save(path)
        except (OSError, ValueError) as exn:
            raise ValueError(f"cannot write {path}: {exn} (check --out and that its folder is writable)") from None
        print(path)
    return 0
