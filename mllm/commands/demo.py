"""`mllm demo --out DIR [--minutes M] [--size shapes|tiny] [--ablations]`: the whole pipeline on the shapes
world (the `demo` package), resumable: rerun the same command to continue after an interruption."""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm.commands.types import positive_float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); rerun to resume")
    parser.add_argument("--minutes", type=positive_float,
                        help="scale the training stages to about this many minutes in all (default: the plan's "
                             "own: 75 for shapes)")
    parser.add_argument("--size", choices=("shapes", "shapes-half", "shapes-cells-edit", "shapes-cells", "shapes-6x6", "shapes-long",
                                           "shapes-exact", "shapes-lean", "tiny"), default="shapes",
                        help="shapes (the demo: captions, VQA, drawing, editing and questions over two images in one "
                             "decoder, one code a cell of the scene's grid, every edit trained instruction first, a "
                             "focus stage for the question \"what changed\" and the encoder tuned; about 75 minutes "
                             "on 2 CPU cores with bf16), shapes-half (the same with half the pretraining: on the edge "
                             "of the editing bars, met in one run and missed in another; 45-60 minutes), "
                             "shapes-cells-edit (the demo without its focus stage and encoder tuning: every "
                             "quality bar with a margin, about 80 minutes with bf16, 140 without), "
                             "shapes-cells (one code a cell, a share of the edits trained image first: edits in plain chat turns without a threshold; "
                             "about 115 minutes measured without bf16), shapes-6x6 (the previous demo: 6x6 codes an "
                             "image, edits 30%%, about 40 minutes), shapes-long (shapes-6x6 with twice the model's "
                             "steps, about an hour), shapes-exact (shapes-6x6 on exact renders: reads other "
                             "renderers badly; about 37 minutes), shapes-lean (no editing or two-image training: "
                             "about 20-25 minutes, the earlier bars only) or tiny (a plumbing check: every stage on "
                             "tiny models that cannot learn, no bars; about 15 s on 2 CPU cores)")
    parser.add_argument("--ablations", action="store_true",
                        help="after the demo, the paper claims in miniature: dual vs pixel-only codebook, and ETT vs "
                             "a frozen tokenizer (about 40 more minutes on 2 CPU cores); writes DIR/ablations.md")


def run(args: argparse.Namespace) -> int:
    from demo import get_plan, run_ablations, run_demo, scaled

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder (choose another --out)")
    plan = scaled(get_plan(args.size), args.minutes)
    if args.ablations:
        run_ablations(out, plan)
    else:
        run_demo(out, plan)
    return 0
