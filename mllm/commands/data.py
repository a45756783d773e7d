"""`mllm data ...`: make the shapes world, convert LLaVA JSON to shards.

    mllm data shapes --out DIR --n N --seed S [--size PX] [--split train|test] [--format wds|llava]
                     [--look exact|varied|other] [--tasks]
    mllm data convert-llava --json FILE --image-root DIR --out DIR

The data modules (webdataset, PIL, the shapes renderer) are imported when a subcommand runs, so
`mllm data --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mllm.commands._common import add_output_arguments
from mllm.commands.types import positive_int, share


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="{shapes,convert-llava}")

    shapes = commands.add_parser(
        "shapes",
        help="write the synthetic shapes world as webdataset shards or LLaVA JSON",
        description=(
            "Write N scenes of the shapes world (1-3 coloured shapes on white, with a caption, VQA "
            "pairs and a drawing prompt each). Same --seed, --split, --n and --size: same data."
        ),
    )
    shapes.add_argument("--out", required=True, type=Path, help="output directory (created if missing)")
    shapes.add_argument("--n", required=True, type=positive_int, help="number of scenes to write")
    shapes.add_argument("--seed", type=int, default=0, help="base seed of the scenes (default: 0)")
    shapes.add_argument("--size", type=positive_int, default=64, help="image side in pixels (default: 64)")
    shapes.add_argument(
        "--resized-share", type=share, default=0.0, metavar="P",
        help="share of scenes rendered at another size (40-256 px, half of them 64) and resized to --size "
        "the way a model's image processor resizes its input, so a model trained at --size also reads "
        "scenes of other sizes; those scenes get no drawing prompt (default: 0)",
    )  # fmt: skip
    shapes.add_argument(
        "--split", choices=("train", "test"), default="train",
        help="train or test scenes; the two never share a scene for the same seed (default: train)",
    )  # fmt: skip
    shapes.add_argument(
        "--format", choices=("wds", "llava"), default="wds",
        help="wds: shards with {key}.png + {key}.json (caption, qa, prompt, scene) for every task; "
        "llava: llava.json + images/, one multi-turn chat per scene (caption turn, then every QA pair; "
        "no drawing prompts) (default: wds)",
    )  # fmt: skip
    shapes.add_argument(
        "--look", choices=("exact", "varied", "other"), default="exact",
        help="how scenes are drawn: exact (fixed sizes, centred, palette colours on pure white), varied "
        "(the training world: sizes drawn from a range per size word, centres jittered in their cells, "
        "anti-aliasing on about half the images, slight background and colour noise) or other (a second "
        "rasteriser, PIL's anti-aliased drawing with other sizes and offsets, held out for evaluation); "
        "a non-exact look is recorded as \"look\" in each record's JSON (default: exact)",
    )  # fmt: skip
    shapes.add_argument(
        "--tasks", action="store_true",
        help="also write, after each scene, its two-image records (wds only): an edit (the scene, one of six "
        "edits with its instruction, and questions over the two images) and a pair (the scene and an "
        "unrelated one, with questions over the two); the LLM then learns editing and multi-image questions",
    )  # fmt: skip
    shapes.add_argument(
        "--maxcount", type=positive_int, default=1000, help="records per shard, wds only (default: 1000)"
    )
    add_output_arguments(shapes)

    convert = commands.add_parser(
        "convert-llava",
        help="convert LLaVA-format JSON + images to webdataset shards",
        description=(
            "Convert a LLaVA-format JSON file ([{id, image, conversations: [{from, value}]}]) into "
            "shards of {key}.jpg|png (original bytes) + {key}.json (messages). Bad records are "
            "skipped and reported by reason."
        ),
    )
    convert.add_argument("--json", required=True, type=Path, help="the LLaVA JSON file")
    convert.add_argument(
        "--image-root", required=True, type=Path, help="directory the records' `image` paths are relative to"
    )
    convert.add_argument(
        "--out", required=True, type=Path, help="output directory for the shards (created if missing)"
    )
    convert.add_argument(
        "--maxcount", type=positive_int, default=1000, help="records per shard (default: 1000)"
    )
    add_output_arguments(convert)


def run(args: argparse.Namespace) -> int:
    commands = {"shapes": _run_shapes, "convert-llava": _run_convert_llava}
    return commands[args.data_command](args)


def _run_shapes(args: argparse.Namespace) -> int:
    from mllm.data.shapes import write_shapes_data

    written = write_shapes_data(
        args.out, args.n, seed=args.seed, size=args.size, split=args.split, resized_share=args.resized_share,
        format=args.format, maxcount=args.maxcount, overwrite=args.overwrite, progress=not args.no_progress,
        look=args.look, tasks=args.tasks,
    )  # fmt: skip
    if args.format == "llava":
        print(f"wrote {args.n} records to {written} and {args.n} images to {args.out / 'images'}")
        print(f"to shard them: mllm data convert-llava --json {written} --image-root {args.out} --out DIR")
    else:
        _print_shards(args.out)
    return 0


def _run_convert_llava(args: argparse.Namespace) -> int:
    from mllm.data.llava import LlavaFormatError, convert_llava
    from mllm.data.shards import DataStats

    if not args.json.is_file():
        raise FileNotFoundError(f"--json {args.json} does not exist or is not a file")
    if not args.image_root.is_dir():
        raise NotADirectoryError(f"--image-root {args.image_root} does not exist or is not a directory")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a directory")
    stats = DataStats()
    try:
        convert_llava(args.json, args.image_root, args.out, maxcount=args.maxcount, stats=stats,
                      progress=not args.no_progress, overwrite=args.overwrite)
    except FileExistsError as exn:
        raise FileExistsError(f"{exn}; pass --overwrite to replace them") from None
    except LlavaFormatError as exn:
        raise ValueError(f"cannot read --json as LLaVA JSON: {exn}") from None
    _print_shards(args.out)
    print(stats.report())
    return 0


def _print_shards(out: Path) -> None:
    index = json.loads((out / "index.json").read_text())
    print(f"wrote {index['total']} records in {len(index['shards'])} shards to {out} (index: {out / 'index.json'})")
    for entry in index["shards"]:
        print(f"  {os.path.join(out, entry['file'])}  {entry['count']} records")
