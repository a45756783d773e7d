"""`mllm eval` (run a model over a suite) and `mllm eval-score` (score a predictions file without a model).

    mllm eval --model DIR --suite NAME [--data PATH] --out DIR [--batch-size B] [--limit N] [--adapter DIR]
        [--option KEY=VALUE ...]
    mllm eval-score --suite NAME --predictions FILE [--data PATH] [--option KEY=VALUE ...]

`mllm eval`: items from the suite's reader (eval/suites/); every image they name is checked before the
model loads (the missing ones are named in one error), then they run in batches: "answer" suites send each
image (or each item's images, in order, in one user turn) with the suite's prompt and decode greedily; "draw"
suites draw `images_per_prompt` images per prompt (seeds 0..n-1) and save them under OUT; "edit" suites edit
each item's image by its instruction (`MLLM.edit`, `images_per_prompt` seeds, the suite's guidance) and save
the edits the same way. Each finished batch is appended to OUT/predictions.jsonl at once (one
`write` per line, O_APPEND), so a killed run loses at most the batch in flight: on restart the ids already
in the file are skipped (a line cut short by the kill is dropped first), and every id ends up predicted
exactly once. Launched with `torchrun --nproc_per_node N -m mllm.cli eval ...` (or `accelerate launch`), each
process takes every N-th item and appends to the same file; process 0 scores. The scores go to
OUT/results.json and OUT/results.md, and the table is printed.

`mllm eval-score` reads predictions in the suite's format (vqav2 also takes the official results list,
`[{"question_id", "answer"}]`) and prints the table, then `<primary metric> <value>` as the last line.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm.config import DEFAULT_DECODING, DRAW_GUIDANCE_SCALE, DRAW_TEMPERATURE

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
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides
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
    """`["seeds=3", "circular=true"]` -> `{"seeds": "3", "circular": "true"}` (values stay strings)."""
    options = {}
    for item in items or []:
        key, separator, value = str(item).partition("=")
        if not separator or not key.strip():
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = value
    return options


@dataclass
class EvalSettings:
    """One `mllm eval` run: which model, which suite, where the data and the outputs are, and how to decode."""

    suite: str
    out: str | Path
    model: str | Path | None = None  # a model folder (the tokenizer suite also takes a vision tokenizer folder)
    data: str | None = None  # the benchmark's files; shapes suites render held-out scenes without it
    batch_size: int = 16
    limit: int | None = None  # only the first N items
    adapter: str | None = None
    max_new_tokens: int | None = None  # answer suites: overrides the suite's answer length
    guidance_scale: float = DRAW_GUIDANCE_SCALE  # draw suites
    temperature: float = DRAW_TEMPERATURE  # draw suites: of image codes (0: greedy)
    top_k: int | None = None  # draw suites
    seed: int = 0  # draw suites: seed of the first image per prompt
    decoding: str = DEFAULT_DECODING  # draw suites: "jacobi" or "sequential" (the same distribution)
    options: dict[str, str] = field(default_factory=dict)  # suite options (`--option KEY=VALUE`)
    progress: bool = True


# ---------------------------------------------------------------------------------------- mllm eval
def evaluate(args: EvalSettings) -> dict[str, Any]:
    """Run `args.model` over a suite (resuming from OUT/predictions.jsonl), score, write OUT/results.*."""
    from tqdm.auto import tqdm

    from eval.suites import ScoreContext, get_suite
    from eval.suites.base import model_edit_guidance_scale

    suite = get_suite(args.suite)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(args.options)
    suite.check_options(options)
    suite.configure(options)
    started = time.time()
    if suite.kind == "custom":
        results = suite.run(args, out)
        table = write_results(out, args.suite, results, {"model": args.model, "data": args.data,
                                                         "options": options})
        print(table)
        return results
    if args.data is None and suite.needs_data:
        raise ValueError(f"suite {args.suite} needs --data (its benchmark files)")
    if args.model is None:
        raise ValueError("--model is required (a model folder)")
    suite.use_model(args.model)  # e.g. the model's image size, for suites that render their own images
    items = suite.load_items(args.data, args.limit)
    if suite.kind == "answer" and any(not item.prompt for item in items):
        raise ValueError(f"some {args.suite} items have no question text (is the questions file "
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
    # Every image a model will open is checked now, before the model loads: on every process alike (each
    # checks all items still to predict), so they all stop with the same one-line error.
    check_images(suite, [item for item in items if item.id not in done])
    if rank == 0 and done:
        print(f"{len(done)} predictions already in {predictions_path}; {len(items) - len(done)} to go")

    if todo:
        import mllm

        device = "cuda" if _cuda() else "cpu"
        model = mllm.load(args.model, adapter=args.adapter, device=device)
        bar = tqdm(total=len(todo), desc=f"{args.suite} [{rank}]" if world > 1 else args.suite,
                   disable=rank != 0 or not args.progress, unit="item")
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
        "predictions": str(predictions_path), "options": options, "seconds": round(time.time() - started, 1),
        **({"guidance_scale": args.guidance_scale, "temperature": args.temperature, "top_k": args.top_k,
            "seed": args.seed, "decoding": args.decoding} if suite.kind == "draw" else {}),
        **({"guidance": suite.guidance, "guidance_scale": suite.guidance_scale if suite.guidance_scale is not None
            else model_edit_guidance_scale(args.model),
            "image_guidance_scale": suite.image_guidance_scale, "temperature": suite.temperature,
            "top_k": args.top_k, "seed": args.seed, "decoding": args.decoding} if suite.kind == "edit" else {})})
    print(table)
    print(primary_line(suite, results))
    return results


MISSING_SHOWN = 3  # missing images named in the error


def check_images(suite, items: list) -> None:
    """A FileNotFoundError naming the first missing images when any image of `items` is not on disk:
    `3 of 120 images are missing under DIR: a.jpg, b.jpg, c.jpg, ... (expected names: ...)`."""
    from eval.suites.base import MissingImage, missing_images

    total, missing = missing_images(items)
    if not missing:
        return
    first = missing[0]
    root = first.root if isinstance(first, MissingImage) else first.parent
    names = [image.names[0] if isinstance(image, MissingImage) else image.name for image in missing[:MISSING_SHOWN]]
    more = ", ..." if len(missing) > MISSING_SHOWN else ""
    expected = f"expected names: {suite.image_names}, as .jpg, .jpeg or .png; " if suite.image_names else ""
    raise FileNotFoundError(
        f"{len(missing)} of {total} images are missing under {root}: {', '.join(names)}{more} ({expected}put the "
        "benchmark's images there, or pass the folder that holds them as --data)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _images(item) -> list:
    """An answer item's images: its one image, or every image of a list (several images, one question)."""
    return list(item.image) if isinstance(item.image, (list, tuple)) else [item.image]


def _predict(suite, model, batch, out: Path, args) -> list[dict]:
    if suite.kind == "answer":
        conversations = [[{"role": "user", "content": [
            *({"type": "image", "image": image} for image in _images(item)),
            {"type": "text", "text": item.prompt},
        ]}] for item in batch]
        max_new_tokens = args.max_new_tokens or suite.max_new_tokens
        answers = model.generate_text(conversations, max_new_tokens=max_new_tokens)
        return [{"id": item.id, "answer": answer} for item, answer in zip(batch, answers)]
    if suite.kind == "draw":
        images = model.draw([item.prompt for item in batch], n=suite.images_per_prompt, seed=args.seed,
                            guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                            decoding=args.decoding)
        return [{"id": item.id, "prompt": item.prompt, "images": suite.save_images(out, item, drawn)}
                for item, drawn in zip(batch, images)]
    if suite.kind == "edit":
        # The CLI's --guidance-scale and --temperature are the draw defaults; an edit suite's are its own options'.
        edited = model.edit([item.image for item in batch], [item.prompt for item in batch],
                            n=suite.images_per_prompt, seed=args.seed, guidance_scale=suite.guidance_scale,
                            guidance=suite.guidance, temperature=suite.temperature, top_k=args.top_k,
                            decoding=args.decoding, image_guidance_scale=suite.image_guidance_scale)
        return [{"id": item.id, "instruction": item.prompt, "images": suite.save_images(out, item, images)}
                for item, images in zip(batch, edited)]
    raise ValueError(f"suite kind {suite.kind!r} has no predictions")


# ---------------------------------------------------------------------------------------- mllm eval-score
def score_file(suite_name: str, predictions: str | Path, data: str | None = None,
               options: dict[str, str] | None = None) -> dict[str, Any]:
    """Score a predictions file with a suite's official rules, without a model; prints the table."""
    from eval.suites import ScoreContext, get_suite

    suite = get_suite(suite_name)
    suite.check_options(options or {})
    if suite.kind == "custom":
        raise ValueError(f"suite {suite_name} has no predictions file; run `mllm eval`")
    if data is None and suite.needs_data:
        raise ValueError(f"suite {suite_name} needs --data (the benchmark's annotation files)")
    path = Path(predictions)
    if not path.is_file():
        raise FileNotFoundError(f"no predictions file {path}")
    options = dict(options or {})
    suite.configure(options)
    items = suite.load_items(data, None)
    records: dict[str, dict] = {}
    for record in suite.read_predictions(path):
        records.setdefault(str(record["id"]), record)
    known = {item.id for item in items}
    unknown = len(set(records) - known)
    results = suite.score({k: v for k, v in records.items() if k in known}, items,
                          ScoreContext(out=path.parent, data=data, options=options))
    if unknown:
        results.setdefault("notes", []).append(f"{unknown} predictions have ids not in the data; ignored")
    print(format_table(suite_name, results))
    print(primary_line(suite, results))
    return results
