"""`mllm eval` (run a model over a suite) and `mllm eval-score` (score a predictions file without a model).

    mllm eval --model DIR --suite NAME [--data PATH] --out DIR [--batch-size B] [--limit N] [--adapter DIR]
        [--option KEY=VALUE ...]
    mllm eval-score --suite NAME --predictions FILE [--data PATH] [--option KEY=VALUE ...]

`mllm eval`: items from the suite's reader (eval/suites/), in batches: "answer" suites send each image with
the suite's prompt and decode greedily; "draw" suites draw `images_per_prompt` images per prompt (seeds
0..n-1) and save them under OUT. Each finished batch is appended to OUT/predictions.jsonl at once (one
`write` per line, O_APPEND), so a killed run loses at most the batch in flight: on restart the ids already
in the file are skipped (a line cut short by the kill is dropped first), and every id ends up predicted
exactly once. Launched with `torchrun --nproc_per_node N -m eval.runner ...` (or `accelerate launch`), each
process takes every N-th item and appends to the same file; process 0 scores. The scores go to
OUT/results.json and OUT/results.md, and the table is printed.

`mllm eval-score` reads predictions in the suite's format (vqav2 also takes the official results list,
`[{"question_id", "answer"}]`) and prints the table, then `<primary metric> <value>` as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mllm.config import DRAW_GUIDANCE_SCALE, DRAW_TEMPERATURE

PREDICTIONS_NAME = "predictions.jsonl"
RESULTS_NAME = "results.json"
TABLE_NAME = "results.md"


# ---------------------------------------------------------------------------------------- predictions file
def repair_predictions(path: Path) -> None:
    """Drop a last line cut short by a kill (no trailing newline), so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def read_predictions(path: Path) -> dict[str, dict]:
    """{id: record} of a predictions.jsonl; the first record of an id wins."""
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not JSON ({error}); remove the line and rerun") from error
        records.setdefault(str(record["id"]), record)
    return records


def append_predictions(path: Path, records: list[dict]) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for record in records:
            os.write(descriptor, (json.dumps(record, ensure_ascii=False) + "\n").encode())
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------- results
def format_table(suite_name: str, results: dict[str, Any]) -> str:
    lines = [f"### {suite_name} ({results.get('count', 0)} items)", "", "| metric | value |", "|---|---|"]
    for name, value in results.get("metrics", {}).items():
        lines.append(f"| {name} | {_fmt(value)} |")
    for group, rows in results.get("breakdown", {}).items():
        if not rows:
            continue
        metrics = sorted({metric for row in rows.values() for metric in row})
        lines += ["", f"| {group} | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for key, row in rows.items():
            lines.append(f"| {key} | " + " | ".join(_fmt(row.get(metric, "")) for metric in metrics) + " |")
    for note in results.get("notes", []):
        lines += ["", f"- {note}"]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def write_results(out: Path, suite_name: str, results: dict[str, Any], extra: dict[str, Any]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"suite": suite_name, **extra, **results}
    tmp = out / f".{RESULTS_NAME}.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, out / RESULTS_NAME)
    table = format_table(suite_name, results)
    (out / TABLE_NAME).write_text(table)
    return table


def primary_line(suite, results: dict[str, Any]) -> str:
    metrics = results.get("metrics", {})
    name = getattr(suite, "primary_metric", None) or next(iter(metrics), None)
    value = metrics.get(name)
    return f"{name} {value:.2f}" if isinstance(value, (int, float)) else f"{name} n/a"


# ---------------------------------------------------------------------------------------- processes
def _distributed() -> tuple[int, int]:
    """(rank, world size); starts a process group when launched by torchrun / accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def parse_options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = value
    return options


# ---------------------------------------------------------------------------------------- mllm eval
def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from eval.suites import ScoreContext, get_suite

    suite = get_suite(args.suite)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = parse_options(args.option)
    suite.configure(options)
    started = time.time()
    if suite.kind == "custom":
        results = suite.run(args, out)
        table = write_results(out, args.suite, results, {"model": args.model, "data": args.data})
        print(table)
        return results
    if args.data is None and suite.needs_data:
        raise SystemExit(f"mllm eval: suite {args.suite} needs --data (its benchmark files)")
    if args.model is None:
        raise SystemExit("mllm eval: --model is required")
    items = suite.load_items(args.data, args.limit)
    if suite.kind == "answer" and any(not item.prompt for item in items):
        raise SystemExit(f"mllm eval: some {args.suite} items have no question text (is the questions file "
                         f"missing from {args.data}?); a model needs them, `mllm eval-score` does not")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"suite {args.suite}: item ids are not unique in {args.data}")

    rank, world = _distributed()
    predictions_path = out / PREDICTIONS_NAME
    if rank == 0:
        repair_predictions(predictions_path)
    _barrier(world)
    done = read_predictions(predictions_path)
    todo = [item for index, item in enumerate(items) if index % world == rank and item.id not in done]
    if rank == 0 and done:
        print(f"{len(done)} predictions already in {predictions_path}; {len(items) - len(done)} to go")

    if todo:
        import mllm

        device = "cuda" if _cuda() else "cpu"
        model = mllm.load(args.model, adapter=args.adapter, device=device)
        bar = tqdm(total=len(todo), desc=f"{args.suite} [{rank}]" if world > 1 else args.suite,
                   disable=rank != 0 or args.no_progress, unit="item")
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            append_predictions(predictions_path, _predict(suite, model, batch, out, args))
            bar.update(len(batch))
        bar.close()
    _barrier(world)
    if rank != 0:
        return {}
    predictions = read_predictions(predictions_path)
    known = {item.id for item in items}
    results = suite.score({k: v for k, v in predictions.items() if k in known}, items,
                          ScoreContext(out=out, data=args.data, model=args.model, options=options))
    table = write_results(out, args.suite, results, {
        "model": args.model, "adapter": args.adapter, "data": args.data, "limit": args.limit,
        "predictions": str(predictions_path), "seconds": round(time.time() - started, 1),
        **({"guidance_scale": args.guidance_scale, "temperature": args.temperature, "top_k": args.top_k,
            "seed": args.seed} if suite.kind == "draw" else {})})
    print(table)
    print(primary_line(suite, results))
    return results


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _predict(suite, model, batch, out: Path, args) -> list[dict]:
    if suite.kind == "answer":
        conversations = [[{"role": "user", "content": [{"type": "image", "image": item.image},
                                                       {"type": "text", "text": item.prompt}]}]
                         for item in batch]
        max_new_tokens = args.max_new_tokens or suite.max_new_tokens
        answers = model.generate_text(conversations, max_new_tokens=max_new_tokens)
        return [{"id": item.id, "answer": answer} for item, answer in zip(batch, answers)]
    if suite.kind == "draw":
        images = model.draw([item.prompt for item in batch], n=suite.images_per_prompt, seed=args.seed,
                            guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k)
        return [{"id": item.id, "prompt": item.prompt, "images": suite.save_images(out, item, drawn)}
                for item, drawn in zip(batch, images)]
    raise ValueError(f"suite kind {suite.kind!r} has no predictions")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from eval.suites import suite_names
    from mllm.commands._common import non_negative_float

    parser.add_argument("--model", help="model folder (`mllm init` / `mllm train` / `mllm merge` output)")
    parser.add_argument("--suite", required=True, help=f"one of: {', '.join(suite_names())}")
    parser.add_argument("--data", help="the benchmark's files in their official format (shapes suites: optional "
                                       "test shards; default: held-out scenes rendered on the fly)")
    parser.add_argument("--out", required=True, help="output folder: predictions.jsonl, results.json, results.md")
    parser.add_argument("--batch-size", type=_positive, default=16, help="items per generation batch (default 16)")
    parser.add_argument("--limit", type=_positive, help="only the first N items")
    parser.add_argument("--adapter", help="a peft adapter folder to load onto the model")
    parser.add_argument("--max-new-tokens", type=_positive, help="override the suite's answer length")
    parser.add_argument("--guidance-scale", type=float, default=DRAW_GUIDANCE_SCALE,
                        help=f"draw suites: CFG scale (default {DRAW_GUIDANCE_SCALE})")
    parser.add_argument("--temperature", type=non_negative_float, default=DRAW_TEMPERATURE,
                        help=f"draw suites: sampling temperature of image codes (0: greedy; default {DRAW_TEMPERATURE})")
    parser.add_argument("--top-k", type=_positive, help="draw suites: sample image codes from the k likeliest only")
    parser.add_argument("--seed", type=int, default=0, help="draw suites: seed of the first image per prompt")
    parser.add_argument("--option", nargs="*", default=[], metavar="KEY=VALUE",
                        help="suite options, e.g. circular=true (mmbench), clip=DIR (fid)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    evaluate(args)
    return 0


# ---------------------------------------------------------------------------------------- mllm eval-score
def score_file(args: argparse.Namespace) -> dict[str, Any]:
    from eval.suites import ScoreContext, get_suite

    suite = get_suite(args.suite)
    if suite.kind == "custom":
        raise SystemExit(f"mllm eval-score: suite {args.suite} has no predictions file; run `mllm eval`")
    if args.data is None and suite.needs_data:
        raise SystemExit(f"mllm eval-score: suite {args.suite} needs --data (the benchmark's annotation files)")
    path = Path(args.predictions)
    if not path.is_file():
        raise SystemExit(f"mllm eval-score: no predictions file {path}")
    options = parse_options(args.option)
    suite.configure(options)
    items = suite.load_items(args.data, None)
    predictions: dict[str, dict] = {}
    for record in suite.read_predictions(path):
        predictions.setdefault(str(record["id"]), record)
    known = {item.id for item in items}
    unknown = len(set(predictions) - known)
    results = suite.score({k: v for k, v in predictions.items() if k in known}, items,
                          ScoreContext(out=path.parent, data=args.data, options=options))
    if unknown:
        results.setdefault("notes", []).append(f"{unknown} predictions have ids not in the data; ignored")
    print(format_table(args.suite, results))
    print(primary_line(suite, results))
    return results


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    from eval.suites import suite_names

    parser.add_argument("--suite", required=True, help=f"one of: {', '.join(suite_names())}")
    parser.add_argument("--predictions", required=True,
                        help="predictions: JSONL of {id, answer} (or the suite's official results format)")
    parser.add_argument("--data", help="the benchmark's annotation files (e.g. a folder with the VQAv2 questions "
                                       "and annotations JSON)")
    parser.add_argument("--option", nargs="*", default=[], metavar="KEY=VALUE", help="suite options")


def run_score(args: argparse.Namespace) -> int:
    score_file(args)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


if __name__ == "__main__":  # torchrun --nproc_per_node N -m eval.runner --model ... --suite ... --out ...
    parser = argparse.ArgumentParser(prog="eval.runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
