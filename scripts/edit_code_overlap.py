"""How local a tokenizer's codes are: the share of an edited scene's codes equal to its source's.

    .venv/bin/python scripts/edit_code_overlap.py --tokenizer runs/demo/tokenizer [--n 200] [--look exact]

For N held-out scenes (test-split seeds) and one edit each (`mllm.data.shapes_tasks.make_edit`), both
scenes are rendered, encoded, and compared code by code at the same grid position. An edit changes one
or two cells of the 3x3 grid (a few percent of the pixels), so a tokenizer whose codes depend on their
own neighbourhood keeps most codes and a model can learn to copy them; with whole-image features most
codes change and every edit is a redrawing (docs/experiments.md, "The varied world and editing").

Prints, overall and per operation: the share of equal codes, the share of codes whose 16 x 16 px cell
(a code's own patch and the cell around it) is pixel-identical in the two renders, and the share of
those unchanged codes that the tokenizer kept; and the share of changed pixels. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer folder")
    parser.add_argument("--n", type=int, default=200, help="held-out scenes, one edit each (default 200)")
    parser.add_argument("--look", default="exact", help="exact | varied | other (default exact)")
    args = parser.parse_args(argv)

    from mllm.data import shapes
    from mllm.data.shapes_tasks import make_edit
    from tokenizer_vision import DualCodebookTokenizer

    tokenizer = DualCodebookTokenizer.from_pretrained(args.tokenizer).eval()
    size = tokenizer.image_size
    factor = tokenizer.config.downsample_factor
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0.0])  # equal, n, still, kept, pixels
    for index in range(args.n):
        scene = shapes.make_scene(shapes.scene_seed("test", index))
        edit = make_edit(scene)
        images = [shapes.render(s, size, look=args.look) for s in (scene, edit.target)]
        with torch.no_grad():
            codes = tokenizer.encode(images)  # (2, h, w)
        equal = (codes[0] == codes[1]).numpy()
        a, b = (np.asarray(image, dtype=np.int16) for image in images)
        changed = np.abs(a - b).max(axis=-1) > 0  # (H, W)
        # A code counts as untouched when its patch and `factor // 2` px around it are unchanged.
        padded = np.pad(changed, factor // 2)
        still = np.array([[not padded[r * factor:(r + 2) * factor, c * factor:(c + 2) * factor].any()
                           for c in range(equal.shape[1])] for r in range(equal.shape[0])])
        for key in ("all", edit.operation):
            row = totals[key]
            row[0] += equal.sum()
            row[1] += equal.size
            row[2] += still.sum()
            row[3] += (equal & still).sum()
            row[4] += changed.mean()
    result = {}
    print(f"{'edits':>10}  equal codes  untouched codes  untouched kept  changed pixels")
    for key, (equal, n, still, kept, pixels) in sorted(totals.items(), key=lambda item: item[0] != "all"):
        count = n / (tokenizer.grid_size[0] * tokenizer.grid_size[1])
        result[key] = {"equal": equal / n, "untouched": still / n, "untouched_kept": kept / max(still, 1),
                       "changed_pixels": pixels / count}
        print(f"{key:>10}  {100 * equal / n:10.1f}%  {100 * still / n:14.1f}%  {100 * kept / max(still, 1):13.1f}%"
              f"  {100 * pixels / count:13.1f}%")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
