"""The photo tokenizer on real photographs: train on some of scikit-image's sample photos, measure on others.

    .venv/bin/python scripts/bench_photo_tokenizer.py [--out runs/photo-bench] [--max-steps N] [--teacher DIR]

Real photographs that ship inside PyPI packages (`pip install -e '.[photos]'`): scikit-image's sample images
(`skimage/data`), scikit-learn's two sample photos and matplotlib's portrait of Grace Hopper. A fixed split,
chosen by content before any result was seen:

- train (`OUT/photos/train`): the photo files as they are, 9 colour (Hubble deep field, IHC micrograph,
  a motorcycle from the left and from the right, retina, rocket launch; scikit-learn's temple in China and
  flower; matplotlib's Grace Hopper) and 7 grey ones (camera man, coins, moon, brick, grass, gravel, clock);
  the recipe cuts random crops of them (`crop_max_side`);
- held out (`OUT/photos/held-out`): every 128 x 128 tile, at the photo's own resolution, of 3 colour
  photos that training never sees: astronaut (16 tiles), chelsea the cat (6), coffee (12): 34 crops.

Teacher: no pretrained weights can be downloaded here, so the script saves a small randomly initialised
`CLIPVisionModel` (2 layers of 64; 128 px in 8 px patches, so its 16 x 16 patch grid is the code grid;
seed 0) to `OUT/teacher` and passes it as `--teacher`, through exactly the code path a real CLIP/SigLIP
folder takes. A random tower gives the semantic codes no meaning; the reconstruction measured here still
uses the semantic branch (its codes feed the pixel decoder too).

Then it runs the documented commands, timing the first (wall time of the whole command, data loading
and model set-up included):

    mllm train-tokenizer --data OUT/photos/train --teacher OUT/teacher --recipe tokenizer-photo --out OUT/tokenizer
    mllm eval-tokenizer --tokenizer OUT/tokenizer --data OUT/photos/held-out --out OUT/eval

and prints PSNR, SSIM, codebook use and the training wall time (also in OUT/bench.json). An existing
OUT/tokenizer is trained already: delete it to retrain.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

TRAIN_PHOTOS = (
    "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
    "camera.png", "coins.png", "moon.png", "brick.png", "grass.png", "gravel.png", "clock_motion.png",
)  # fmt: skip
# Colour photos from two other packages of the `photos` extra: (package, file inside it).
OTHER_TRAIN_PHOTOS = (
    ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)  # fmt: skip
HELD_OUT_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png")
TILE = 128  # the tokenizer-photo recipe's image size


def package_dir(package: str) -> Path:
    """The folder of an installed package of the `photos` extra; a one-line error naming the install."""
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError:
        raise SystemExit(f"{package} is not installed: pip install -e '.[photos]' (scikit-image, scikit-learn, "
                         "matplotlib: the packages whose sample photos the benchmark uses)")
    return Path(module.__file__).parent


def skimage_data_dir() -> Path:
    """scikit-image's folder of sample images."""
    return package_dir("skimage") / "data"


def other_train_photos() -> list[Path]:
    """The train photos that ship in scikit-learn and matplotlib."""
    return [package_dir(package) / relative for package, relative in OTHER_TRAIN_PHOTOS]


def tiles(image, size: int = TILE) -> list:
    """Every non-overlapping size x size crop of a PIL image, row by row from the top left."""
    width, height = image.size
    return [image.crop((left, top, left + size, top + size))
            for top in range(0, height - size + 1, size) for left in range(0, width - size + 1, size)]


def write_split(source: Path, out: Path, size: int = TILE) -> tuple[Path, Path]:
    """OUT/train (the train photos' files, copied: TRAIN_PHOTOS from `source`, scikit-image's folder, and
    `other_train_photos()`) and OUT/held-out (PNG tiles of the held-out photos); returns both folders.
    Rewrites them from scratch."""
    from PIL import Image

    train, held_out = out / "train", out / "held-out"
    for folder in (train, held_out):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for name in TRAIN_PHOTOS:
        shutil.copyfile(source / name, train / name)
    for path in other_train_photos():
        shutil.copyfile(path, train / path.name)
    for name in HELD_OUT_PHOTOS:
        with Image.open(source / name) as photo:
            for index, tile in enumerate(tiles(photo.convert("RGB"), size)):
                tile.save(held_out / f"{Path(name).stem}-{index:02d}.png")
    return train, held_out


def write_random_clip_tower(out: Path, seed: int = 0) -> Path:
    """A small randomly initialised CLIP vision tower saved with save_pretrained (the stand-in teacher)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TILE, patch_size=8)
    CLIPVisionModel(config).save_pretrained(out)
    return out


def mllm(*arguments: str) -> float:
    """Run one `mllm` command (this interpreter's); return its wall time in seconds."""
    print("$ mllm " + " ".join(arguments), flush=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", "mllm.cli", *arguments], check=True)
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/photo-bench"))
    parser.add_argument("--teacher", type=Path, help="a local CLIP/SigLIP/ViT folder (default: a random CLIP tower)")
    parser.add_argument("--recipe", default="tokenizer-photo")
    parser.add_argument("--max-steps", type=int, help="override the recipe's steps (a quick check)")
    args = parser.parse_args()

    train, held_out = write_split(skimage_data_dir(), args.out / "photos")
    teacher = args.teacher or write_random_clip_tower(args.out / "teacher")
    tokenizer = args.out / "tokenizer"
    command = ["train-tokenizer", "--data", str(train), "--teacher", str(teacher), "--recipe", args.recipe,
               "--out", str(tokenizer)]
    if args.max_steps:
        command += ["--max-steps", str(args.max_steps)]
    trained_before = (tokenizer / "model.safetensors").is_file()
    train_s = mllm(*command)
    mllm("eval-tokenizer", "--tokenizer", str(tokenizer), "--data", str(held_out), "--out", str(args.out / "eval"))
    results = json.loads((args.out / "eval" / "results.json").read_text())
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "recipe": args.recipe,
        "train_command": "mllm " + " ".join(command),
        "train_wall_s": None if trained_before else round(train_s, 1),
        "held_out_crops": results["images"],
        "psnr": round(results["psnr"], 2),
        "ssim": round(results["ssim"], 4),
        "codebook_usage": round(results["codebook_usage"], 4),
        "codes_used": results["codes_used"],
        "codebook_size": results["codebook_size"],
        "grid": results["grid"],
    }
    (args.out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    wall = "trained before this run" if trained_before else f"{train_s / 60:.1f} min"
    print(f"held-out photo crops: {summary['held_out_crops']} at {TILE} px, {summary['grid'][0]}x{summary['grid'][1]} "
          f"codes: PSNR {summary['psnr']:.2f} dB, SSIM {summary['ssim']:.4f}, codebook use "
          f"{100 * summary['codebook_usage']:.1f}% ({summary['codes_used']}/{summary['codebook_size']}); "
          f"train-tokenizer wall time {wall}")


if __name__ == "__main__":
    main()
