"""Drawings by speculative Jacobi decoding against sequential decoding: shapes-t2i accuracy per category.

    .venv/bin/python scripts/compare_decoding.py --model runs/demo/model [--seeds 8] [--out runs/decoding]

Runs the `shapes-t2i` suite twice on the same model, prompts and seeds (`mllm eval --suite shapes-t2i
--option seeds=N --decoding jacobi|sequential`): 162 built-in prompts in five categories, N images each,
every image judged by the shapes judge. Both decodings sample the same distribution (the speculative
sampling rule; see mllm/generation.py), so the two accuracies should agree within sampling noise; they are
not image-for-image equal, because the two methods use the random numbers differently.

For each category and overall: accuracy with a 95% Wilson interval per method, the difference with a 95%
interval (Newcombe's hybrid score interval for a difference of two proportions) and the wall time of each
run. Images of one prompt are not independent draws of the category's accuracy, so the intervals are a
little narrower than the truth; the per-prompt spread is small next to the between-prompt one here.
Prints a markdown table and one JSON line (also in OUT/compare.json).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

Z = 1.959963984540054  # two-sided 95%


def wilson(successes: float, total: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, as fractions."""
    if total == 0:
        return (0.0, 1.0)
    p = successes / total
    centre = (p + Z * Z / (2 * total)) / (1 + Z * Z / total)
    half = Z * math.sqrt(p * (1 - p) / total + Z * Z / (4 * total * total)) / (1 + Z * Z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe(successes_a: float, total_a: int, successes_b: float, total_b: int) -> tuple[float, float]:
    """95% interval of p_a - p_b (Newcombe 1998, method 10: from the two Wilson intervals)."""
    p_a, p_b = successes_a / total_a, successes_b / total_b
    low_a, high_a = wilson(successes_a, total_a)
    low_b, high_b = wilson(successes_b, total_b)
    difference = p_a - p_b
    return (difference - math.sqrt((p_a - low_a) ** 2 + (high_b - p_b) ** 2),
            difference + math.sqrt((high_a - p_a) ** 2 + (p_b - low_b) ** 2))


def run_suite(model: str, out: Path, decoding: str, seeds: int, batch_size: int) -> tuple[dict, float]:
    from eval.runner import EvalSettings, evaluate

    started = time.time()
    results = evaluate(EvalSettings(suite="shapes-t2i", out=str(out / decoding), model=model,
                                    batch_size=batch_size, decoding=decoding, options={"seeds": str(seeds)},
                                    progress=False))
    return results, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder, e.g. runs/demo/model")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt (default 8)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/decoding"))
    args = parser.parse_args()

    runs = {decoding: run_suite(args.model, args.out, decoding, args.seeds, args.batch_size)
            for decoding in ("sequential", "jacobi")}
    categories = list(runs["sequential"][0]["breakdown"]["category"])
    rows = []
    for category in [*categories, "all images"]:
        cells = {}
        for decoding, (results, _) in runs.items():
            if category == "all images":
                accuracy, images = results["metrics"]["image_accuracy"], results["metrics"]["images"]
            else:
                row = results["breakdown"]["category"][category]
                accuracy, images = row["accuracy"], row["images"]
            cells[decoding] = (accuracy / 100 * images, images)
        low, high = newcombe(*cells["jacobi"], *cells["sequential"])
        rows.append({
            "category": category,
            **{f"{d}_accuracy": 100 * s / n for d, (s, n) in cells.items()},
            **{f"{d}_ci95": [round(100 * v, 1) for v in wilson(s, n)] for d, (s, n) in cells.items()},
            "images": cells["jacobi"][1],
            "difference": 100 * (cells["jacobi"][0] / cells["jacobi"][1] - cells["sequential"][0] / cells["sequential"][1]),
            "difference_ci95": [round(100 * low, 1), round(100 * high, 1)],
        })
    seconds = {d: round(s, 1) for d, (_, s) in runs.items()}
    print(f"shapes-t2i, {args.model}, {args.seeds} images per prompt; wall time of each run (drawing + judging): "
          f"sequential {seconds['sequential']} s, jacobi {seconds['jacobi']} s\n")
    print("| category | images | sequential (95% CI) | jacobi (95% CI) | jacobi - sequential (95% CI) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['category']} | {r['images']} | {r['sequential_accuracy']:.1f} "
              f"[{r['sequential_ci95'][0]}, {r['sequential_ci95'][1]}] | {r['jacobi_accuracy']:.1f} "
              f"[{r['jacobi_ci95'][0]}, {r['jacobi_ci95'][1]}] | {r['difference']:+.1f} "
              f"[{r['difference_ci95'][0]:+.1f}, {r['difference_ci95'][1]:+.1f}] |")
    summary = {"model": args.model, "seeds": args.seeds, "seconds": seconds, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
