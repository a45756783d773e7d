"""Our shapes suites' items -> the local files of the lmms-eval tasks `shapes_vqa` and `shapes_caption`.

    python -m eval.lmms_eval_plugin export [--out DIR] [--data SHARDS] [--limit N] [--suite shapes-vqa ...]

Each suite's items, exactly those `mllm eval --suite NAME [--data SHARDS] [--limit N]` evaluates and in the
same order, become one parquet file `<task>.parquet` (HF datasets' format, the image embedded as PNG with
the `Image` feature, so lmms-eval's docs carry a PIL image; nothing refers to a path):

    shapes_vqa.parquet      id, question, answer, type, image
    shapes_caption.parquet  id, prompt, caption, scene (the scene as JSON), image

Without --out they go to eval/lmms_eval_plugin/tasks/data/, where the shipped task YAMLs read them
(`--include_path eval/lmms_eval_plugin/tasks`). With --out DIR, DIR also gets a copy of each task's YAML that
reads the file beside it (`--include_path DIR`). `export.json` records what was exported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_OUT = TASKS_DIR / "data"
TASKS = {"shapes-vqa": "shapes_vqa", "shapes-caption": "shapes_caption"}  # our suite -> lmms-eval task
MANIFEST_NAME = "export.json"


def _image(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:  # a path (shards may name files)
        return opened.convert("RGB")


def _rows(suite_name: str, items: list) -> tuple[dict[str, list], list[str]]:
    if suite_name == "shapes-vqa":
        columns = ["id", "question", "answer", "type"]
        values = [[item.id, item.prompt, str(item.meta["answer"]), str(item.meta.get("type", "all"))]
                  for item in items]
    else:
        columns = ["id", "prompt", "caption", "scene"]
        values = [[item.id, item.prompt, item.meta["caption"], json.dumps(item.meta["scene"], sort_keys=True)]
                  for item in items]
    rows = {column: [row[k] for row in values] for k, column in enumerate(columns)}
    rows["image"] = [_image(item.image) for item in items]
    return rows, columns


def export_suite(suite_name: str, out: str | Path, data: str | None = None, limit: int | None = None) -> Path:
    """Write `<out>/<task>.parquet` for one suite (see the module docstring); returns its path."""
    import datasets

    from eval.suites import get_suite

    if suite_name not in TASKS:
        from tokenizer_vision.schema import unknown_name

        raise unknown_name("suite", suite_name, tuple(TASKS))
    items = get_suite(suite_name).load_items(data, limit)
    if not items:
        raise ValueError(f"{suite_name}: no items to export (data {data!r}, limit {limit})")
    rows, columns = _rows(suite_name, items)
    features = datasets.Features({**{column: datasets.Value("string") for column in columns},
                                  "image": datasets.Image()})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{TASKS[suite_name]}.parquet"
    tmp = path.with_name(f".{path.name}.tmp")
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp))
    tmp.replace(path)
    return path


def task_yaml(task: str, data_file: str) -> str:
    """The shipped YAML of `task`, reading `data_file` (relative to the YAML's folder, or absolute)."""
    text = (TASKS_DIR / f"{task}.yaml").read_text()
    shipped = f"data/{task}.parquet"
    if shipped not in text:
        raise ValueError(f"{TASKS_DIR / f'{task}.yaml'} does not read {shipped}; cannot point it elsewhere")
    note = (f"# Written by `python -m eval.lmms_eval_plugin export` from eval/lmms_eval_plugin/tasks/{task}.yaml:\n"
            f"# the same task, reading {data_file} (pass this folder as --include_path).\n")
    return note + text.replace(shipped, data_file)


def export_tasks(out: str | Path | None = None, data: str | None = None, limit: int | None = None,
                 suites: tuple[str, ...] | list[str] = tuple(TASKS)) -> dict[str, Path]:
    """Export `suites` (default both) into `out` (default eval/lmms_eval_plugin/tasks/data/, which the shipped
    YAMLs read); another `out` also gets the task YAMLs. Returns {task: parquet path}."""
    out = Path(out) if out is not None else DEFAULT_OUT
    written: dict[str, Path] = {}
    counts: dict[str, int] = {}
    for suite_name in suites:
        path = export_suite(suite_name, out, data=data, limit=limit)
        task = TASKS[suite_name]
        written[task] = path
        import pyarrow.parquet as pq

        counts[task] = pq.ParquetFile(path).metadata.num_rows
        if out.resolve() != DEFAULT_OUT.resolve():
            (out / f"{task}.yaml").write_text(task_yaml(task, path.name))
    manifest = {"suites": {suite: TASKS[suite] for suite in suites}, "data": data, "limit": limit,
                "counts": counts}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return written


# ---------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.lmms_eval_plugin",
                                     description="lmms-eval support of mllm (docs/lmms-eval.md)")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the shapes suites' items as the lmms-eval tasks' local files")
    export.add_argument("--out", help=f"folder (default {DEFAULT_OUT}, which the shipped task YAMLs read; another "
                                      "folder also gets the task YAMLs: pass it as --include_path)")
    export.add_argument("--data", help="shards from `mllm data shapes --split test` (default: held-out scenes "
                                       "rendered on the fly, as `mllm eval` does)")
    export.add_argument("--limit", type=int, help="only the first N items of each suite (as `mllm eval --limit`)")
    export.add_argument("--suite", nargs="+", default=list(TASKS), choices=list(TASKS),
                        help="suites to export (default: both)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive integer, got {args.limit}")
    try:
        written = export_tasks(args.out, data=args.data, limit=args.limit, suites=args.suite)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        print(f"{parser.prog} export: error: {error}", file=sys.stderr)
        return 2
    for task, path in written.items():
        print(f"{task}: {path}")
    folder = Path(args.out) if args.out else TASKS_DIR
    print(f"lmms-eval ... --tasks {','.join(written)} --include_path {folder}")
    return 0
