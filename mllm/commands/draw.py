"""`mllm draw --model DIR "PROMPT" --out FILE.png [--n N --guidance S --seed S --temperature T --top-k K]`.

Writes FILE.png, or FILE-0.png, FILE-1.png, ... for --n > 1, and prints the paths. The images have
the visual tokenizer's size. Same prompt and --seed: the same images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm.commands._common import (
    add_model_arguments,
    check_model_folder,
    error,
    load_model,
    non_negative_float,
    positive_int,
    unit_float,
)
from mllm.config import DRAW_GUIDANCE_SCALE, DRAW_TEMPERATURE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", metavar="PROMPT", help='what to draw, e.g. "a red circle at the top left"')
    parser.add_argument(
        "--out", required=True, type=Path, help="output image file (.png unless another suffix)"
    )
    parser.add_argument("--n", type=positive_int, default=1, help="images to draw (default: 1)")
    parser.add_argument(
        "--guidance",
        type=float,
        default=DRAW_GUIDANCE_SCALE,
        help=f"classifier-free guidance scale; 1 turns guidance off (default: {DRAW_GUIDANCE_SCALE})",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=DRAW_TEMPERATURE,
        help=f"sampling temperature of the image codes; 0 is greedy (default: {DRAW_TEMPERATURE})",
    )
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample among the k likeliest codes")
    parser.add_argument("--top-p", type=unit_float, default=None, help="nucleus sampling mass")
    add_model_arguments(parser)


def output_paths(out: Path, n: int) -> list[Path]:
    if not out.suffix:
        out = out.with_suffix(".png")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def run(args: argparse.Namespace) -> int:
    problem = check_model_folder(args.model)
    if problem:
        return error("draw", problem)
    if not args.prompt.strip():
        return error("draw", "the prompt is empty")
    paths = output_paths(args.out, args.n)
    if paths[0].parent.exists() and not paths[0].parent.is_dir():
        return error("draw", f"{paths[0].parent} is not a folder")
    try:
        model = load_model(args)
        images = model.draw(
            args.prompt,
            n=args.n,
            guidance_scale=args.guidance,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as exn:
        return error("draw", str(exn))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):
        try:
            image.save(path)
        except (OSError, ValueError) as exn:
            return error("draw", f"cannot write {path}: {exn}")
        print(path)
    return 0
