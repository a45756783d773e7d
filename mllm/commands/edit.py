"""`mllm edit --model DIR IMAGE "INSTRUCTION" --out FILE.png [--n N --seed S --guidance-scale G
--guidance instruction|both --image-guidance-scale I --temperature T --top-k K --top-p P --decoding auto|jacobi|sequential]`.

The model reads IMAGE and the instruction and draws the edited image (`MLLM.edit`). Writes FILE.png, or
FILE-0.png, FILE-1.png, ... for --n > 1 (as `mllm draw` does), and prints the paths. The images have the
visual tokenizer's size. Same image, instruction, --seed, --n and --decoding: the same images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm.commands import _common as common
from mllm.commands.draw import output_paths
from mllm.commands.types import non_negative_float, positive_float, positive_int, unit_float
from mllm.config import EDIT_GUIDANCE, EDIT_GUIDANCE_MODES, EDIT_GUIDANCE_SCALE, EDIT_TEMPERATURE

EPILOG = """\
instructions the shapes-world model is trained on:
  recolour   make the circle blue
  move       move the square to the top left      (an empty cell: top left, top, ..., center, ...)
  resize     make the triangle large          (small | large)
  remove     remove the circle
  add        add a small red square at the bottom right   (a size, a colour, a shape, where)
  replace    turn the circle into a triangle
When two objects share a shape, name the colour too: "make the red circle blue".

examples:
  mllm edit --model runs/model scene.png "make the circle blue" --out edited.png
  mllm edit --model runs/model scene.png "remove the square" --out variants.png --n 4 --seed 0
      (writes variants-0.png ... variants-3.png)
See docs/editing.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Edit an image with a model folder: the model reads IMAGE and INSTRUCTION and draws the edited\n"
        "image (the visual tokenizer's size). Writes --out, or FILE-0.png, FILE-1.png, ... with --n > 1,\n"
        "and prints the paths. The same image, instruction, --seed, --n and --decoding give the same images."
    )
    parser.epilog = EPILOG
    parser.add_argument("image", metavar="IMAGE", help="the image to edit (PNG, JPEG, WEBP, ...)")
    parser.add_argument("instruction", metavar="INSTRUCTION", help='what to change, e.g. "make the circle blue"')
    parser.add_argument(
        "--out", required=True, type=Path, help="output image file (.png unless another suffix)"
    )
    parser.add_argument("--n", type=positive_int, default=1, help="edited versions to draw (default: 1)")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale; 1 turns guidance off (default: the model's own, edit_guidance_scale "
             f"in its mllm_config.json: {EDIT_GUIDANCE_SCALE:g} unless its training measured another)",
    )
    parser.add_argument(
        "--guidance",
        choices=EDIT_GUIDANCE_MODES,
        default=EDIT_GUIDANCE,
        help="what guidance's unconditional branch drops: instruction (the image alone: guidance pushes towards "
             "what the instruction changes) or both (the unconditional draw request) "
             f"(default: {EDIT_GUIDANCE})",
    )
    parser.add_argument(
        "--image-guidance-scale",
        type=positive_float,
        default=None,
        help="guide by the image and by the instruction at once, each with its own scale (InstructPix2Pix's "
             "form; three rows per edit): this is the image's scale, --guidance-scale the instruction's, and "
             "--guidance is unused (default: off)",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=EDIT_TEMPERATURE,
        help=f"sampling temperature of the edited image's codes; 0 is greedy (default: {EDIT_TEMPERATURE:g})",
    )
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample among the k likeliest codes")
    parser.add_argument("--top-p", type=unit_float, default=None, help="nucleus sampling mass")
    common.add_decoding_argument(parser, what="how the edited images are decoded")
    common.add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    common.check_model_folder(args.model)
    common.check_text(args.instruction, "instruction")
    paths = output_paths(args.out, args.n)
    if paths[0].parent.exists() and not paths[0].parent.is_dir():
        raise NotADirectoryError(f"--out {args.out}: {paths[0].parent} is a file, not a folder (choose another --out)")
    from PIL import Image

    # Before the model loads: an extension PIL cannot write would otherwise fail after the edit.
    if paths[0].suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out}: unknown image file extension {paths[0].suffix!r} (use .png, .jpg or "
                         ".webp)")
    (image,) = common.read_images([args.image])  # a missing or corrupt image fails before the model loads
    model = common.load_model(args)
    images = model.edit(image, args.instruction, n=args.n, seed=args.seed, guidance_scale=args.guidance_scale,
                        guidance=args.guidance, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        decoding=args.decoding, image_guidance_scale=args.image_guidance_scale)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for edited, path in zip(images, paths):
        try:
            edited.save(path)
        except (OSError, ValueError) as exn:
            raise ValueError(f"cannot write {path}: {exn} (check --out and that its folder is writable)") from None
        print(path)
    return 0
