"""Drawing accuracy of a running `mllm serve` (either engine): the `shapes-t2i` suite's prompts sent to
/v1/images/generations with fixed seeds, the images judged by the suite's own scorer.

    .venv/bin/mllm serve --model runs/demo/model --port 8101                    # built-in engine
    .venv-vllm/bin/mllm serve --model runs/demo/model --port 8102 --engine vllm  # vLLM engine
    .venv/bin/python scripts/draw_through_server.py --url http://127.0.0.1:8101 --out /tmp/draw-builtin
    .venv/bin/python scripts/draw_through_server.py --url http://127.0.0.1:8102 --out /tmp/draw-vllm

Item i's image j is drawn with seed `--seed + j` (one request per image, n=1), as `mllm eval --suite
shapes-t2i` draws it in process; `--concurrency` requests are in flight at once, so the server batches them.
Writes OUT/predictions.jsonl, OUT/images/ and OUT/results.json (the scorer's table is printed); a rerun
into the same OUT draws only the items it lacks.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from load_test import loopback_url  # scripts/ is on sys.path when this runs as a script


def draw(client, url: str, prompt: str, seed: int, guidance_scale: float | None, decoding: str | None):
    from PIL import Image

    body = {"prompt": prompt, "n": 1, "seed": seed, "response_format": "b64_json"}
    if guidance_scale is not None:
        body["guidance_scale"] = guidance_scale
    if decoding is not None:
        body["decoding"] = decoding
    response = client.post(f"{url}/v1/images/generations", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{prompt!r} seed {seed}: HTTP {response.status_code}: {response.text[:300]}")
    data = response.json()["data"][0]["b64_json"]
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", type=loopback_url, required=True, help="the running server (127.0.0.1 or [::1])")
    parser.add_argument("--out", required=True, help="output folder (predictions.jsonl, images/, results.json)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts (default: all 180)")
    parser.add_argument("--seeds", type=int, default=1, help="images per prompt, seeds SEED..SEED+N-1 (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of each prompt's first image (default 0)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the server's")
    parser.add_argument("--decoding", choices=("auto", "jacobi", "sequential"), default=None,
                        help="built-in engine only (default: the server's)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    args = parser.parse_args(argv)

    import httpx
    from tqdm import tqdm

    from eval.runner import append_predictions, read_predictions, score_file, write_results
    from eval.suites import get_suite

    suite = get_suite("shapes-t2i")
    options = {"seeds": str(args.seeds)}
    suite.configure(options)
    items = suite.load_items(None, args.limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    predictions_path = out / "predictions.jsonl"
    done = read_predictions(predictions_path) if predictions_path.is_file() else {}
    todo = [item for item in items if item.id not in done]
    with httpx.Client(timeout=600) as client, ThreadPoolExecutor(args.concurrency) as pool:
        def one(item):
            images = [draw(client, args.url, item.prompt, args.seed + j, args.guidance_scale, args.decoding)
                      for j in range(args.seeds)]
            return {"id": item.id, "prompt": item.prompt, "images": suite.save_images(out, item, images)}

        for record in tqdm(pool.map(one, todo), total=len(todo), desc="drawing", unit="prompt"):
            append_predictions(predictions_path, [record])
    results = score_file("shapes-t2i", predictions_path, None, options)
    write_results(out, "shapes-t2i", results, {"url": args.url, "seeds": args.seeds, "seed": args.seed})
    print(json.dumps({"accuracy": results.get("accuracy"), "images": len(items) * args.seeds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
