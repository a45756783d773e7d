"""How alike a tokenizer's codes are for different renderings of one scene.

    .venv/bin/python scripts/look_code_overlap.py --tokenizer runs/demo/tokenizer [--n 300]

For N held-out scenes (test-split seeds), each scene is rendered in every look of `mllm.data.shapes.render`
("exact", "varied", "other": the held-out rasteriser) and encoded; the codes of each look are compared code
by code, at the same grid position, with the codes of the exact render. A tokenizer trained to read every
rendering as the exact one (`paired_data`) reconstructs them alike, but may still pick other codes that
decode to the same pixels; how many it picks tells how predictable the codes are that a model must write
(docs/experiments.md, "The varied world read as the exact one"). Prints one line per look and a JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer folder")
    parser.add_argument("--n", type=int, default=300, help="held-out scenes (default 300)")
    args = parser.parse_args(argv)

    from mllm.data import shapes
    from tokenizer_vision import DualCodebookTokenizer

    tokenizer = DualCodebookTokenizer.from_pretrained(args.tokenizer).eval()
    scenes = [shapes.make_scene(shapes.scene_seed("test", index)) for index in range(args.n)]
    with torch.no_grad():
        codes = {look: tokenizer.encode([shapes.render(scene, tokenizer.image_size, look) for scene in scenes])
                 for look in shapes.LOOKS}
    result = {look: (codes[look] == codes["exact"]).float().mean().item() for look in shapes.LOOKS if look != "exact"}
    for look, share in result.items():
        print(f"{look:>8}: {100 * share:.1f}% of the codes equal to the exact render's")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
