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
                             "own: 40 for shapes)")
    parser.add_argument("--size", choices=("shapes", "shapes-long", "shapes-cells", "shapes-cells-edit", "shapes-exact",
                                           "shapes-lean", "tiny"), default="shapes",
                        help="shapes (the demo: captions, VQA, drawing, editing and questions over two images, in the "
                             "varied world; about 40 minutes on 2 CPU cores), shapes-long (the same with twice the "
                             "model's steps: every figure higher, about an hour), shapes-cells (shapes-long with one code "
                             "a cell of the scene's grid: positioned drawing, and edits in chat too; about 115 minutes "
                             "measured without bf16), shapes-cells-edit (the same with every edit trained instruction "
                             "first and more edits and pairs: every quality bar, edits through the edit paths rather "
                             "than plain chat turns; about 80 minutes with bf16, 140 without), "
                             "shapes-exact (the same on exact renders: "
                             "edits better, reads other renderers badly; about 37 minutes), shapes-lean (no editing "
                             "or two-image training: about 20-25 minutes, the earlier bars only) or tiny (a plumbing "
                             "check: every stage on tiny models that cannot learn, no bars; 47 s on 2 CPU cores)")
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
