"""`mllm demo --out DIR [--minutes M] [--size shapes|tiny]`: the whole pipeline on the shapes world.

    data (train + held-out test scenes) -> teacher -> dual-codebook tokenizer -> tokenizer metrics
    -> mllm init -> pretokenize -> shapes-pretrain [-> shapes-sft (LoRA) -> merge] -> DIR/model
    -> shapes-vqa, shapes-caption, shapes-t2i -> DIR/report.md + DIR/report.png

The shapes plan renders 48 px scenes: with 8 px codes the 3x3 cells of 16 px are 2x2 codes each, so every
object lands on the code grid the same way in every cell (36 codes an image instead of 64 at 64 px, and
far fewer distinct patches to learn). Scenes of other sizes are resized on the way in (the judge reads
48 px renders exactly). It trains the unified model in one full fine-tune on captions, VQA (several
questions per image) and drawing, and copies that model to DIR/model; the LoRA sft stage + merge (into
DIR/model) run instead when the plan gives sft steps (the tiny plan does, to keep that path tested).

Every stage runs the project's own command (`mllm data`, `mllm train-teacher`, ... in this process) and
writes under DIR; a stage whose output is complete is skipped, training stages resume from their last
checkpoint, so a killed demo continues where it stopped. `--minutes` scales the four training stages'
step counts from the plan of `--size` (the plan is sized for 2 CPU cores); `tiny` is a minute-sized run
for tests. Stage wall times go to DIR/stages.json; the report shows the results next to the quality bars.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# The quality bars of the demo (held-out scenes): (results file, metric, minimum, label).
BARS = (
    ("eval/shapes-vqa", "accuracy", 90.0, "VQA accuracy (shapes-vqa)"),
    ("eval/shapes-caption", "objects_right", 70.0, "caption: every object's colour, shape and position right"),
    ("eval/shapes-t2i", "accuracy_single_object", 80.0, "drawing 'a {colour} {shape}' judged correct"),
    ("eval/shapes-t2i", "accuracy_position", 60.0, "drawing '... at the <position>' judged correct"),
    ("eval/tokenizer", "judge_agreement", 95.0, "tokenizer: judge agreement original vs reconstruction"),
)


@dataclass(frozen=True)
class Plan:
    """What the demo trains and evaluates; `minutes` is the wall time the plan is sized for."""

    llm: str = "shapes"
    tokenizer: str = "shapes"
    image_size: int = 48
    train_scenes: int = 20000
    # Share of the LLM's training scenes rendered at other sizes and resized to image_size (`mllm data
    # shapes --resized-share`; the LLM then trains on data/train-mixed, the teacher and the tokenizer on
    # the exact renders of data/train). Off in the shapes plan: at its budget, half the scenes resized cost
    # 5 points of VQA on 48 px scenes for 1.7 more on 64 px ones (README, "Scenes of other sizes").
    resized_share: float = 0.0
    other_size: int = 64  # the VQA suite also runs on the test scenes rendered at this size (0: not)
    test_scenes: int = 1000
    teacher_steps: int = 250
    tokenizer_steps: int = 1000
    pretrain_steps: int = 2000
    sft_steps: int = 0  # 0: no sft stage; the pretrain model is the demo's model
    ett_steps: int = 1000  # `--ablations`: each of the two shapes-ett runs (tokenizer tuned / frozen)
    vqa_items: int = 1000
    caption_items: int = 300
    t2i_prompts: int = 162
    t2i_seeds: int = 6
    minutes: float = 20.0
    teacher_overrides: tuple[str, ...] = ("image_size=48",)
    # rescale_share: half of each tokenizer batch round-trips through another size against the clean image
    # (README, "Scenes of other sizes"): VQA 96.5% on 48 px and 90.6% on 64 px scenes, against 92.4 / 86.0.
    tokenizer_overrides: tuple[str, ...] = ("tokenizer.image_size=48", "rescale_share=0.5")
    llm_overrides: tuple[str, ...] = ()


PLANS = {
    "shapes": Plan(),
    # Tests: every stage for real, on tiny models and a few scenes (about a minute on 2 cores).
    "tiny": Plan(llm="tiny", tokenizer="tiny", image_size=32, train_scenes=96, test_scenes=12, teacher_steps=4,
                 resized_share=0.5,
                 tokenizer_steps=4, pretrain_steps=4, sft_steps=3, ett_steps=2, vqa_items=12, caption_items=6, t2i_prompts=5,
                 t2i_seeds=1, minutes=1.0,
                 teacher_overrides=("image_size=32", "vision_hidden_size=32", "vision_layers=1", "vision_heads=2",
                                    "text_hidden_size=32", "text_layers=1", "text_heads=2", "projection_dim=32",
                                    "batch_size=16", "warmup_steps=1", "log_every=1"),
                 tokenizer_overrides=("size=tiny", "batch_size=8", "warmup_steps=1", "log_every=1", "save_every=2"),
                 llm_overrides=("per_device_batch_size=4", "logging_steps=1", "save_steps=2", "max_length=256")),
}


def scaled(plan: Plan, minutes: float | None) -> Plan:
    """The plan with its training steps scaled by minutes / plan.minutes (at least 1 step each)."""
    if minutes is None or minutes == plan.minutes:
        return plan
    factor = minutes / plan.minutes
    return replace(plan, teacher_steps=max(1, round(plan.teacher_steps * factor)),
                   tokenizer_steps=max(1, round(plan.tokenizer_steps * factor)),
                   pretrain_steps=max(1, round(plan.pretrain_steps * factor)),
                   sft_steps=plan.sft_steps and max(1, round(plan.sft_steps * factor)),
                   ett_steps=max(1, round(plan.ett_steps * factor)), minutes=minutes)


# (name, the file whose presence marks the stage complete, the `mllm` command line or a callable action)
Stage = tuple[str, Path, Any]


def model_dir(out: Path, plan: Plan) -> Path:
    """The demo's trained model folder: the merged sft model, or a copy of the pretrain model without sft."""
    return out / "model"


def _copy_model(source: Path, target: Path):
    """A stage action: copy a finished model folder to `target` (through a temp folder, so a killed copy
    leaves no half folder that looks complete)."""
    import shutil

    def copy() -> int:
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        print(f"copied {source} -> {target}")
        return 0

    copy.describe = f"(copy {source} to {target})"
    return copy


def _sets(overrides: tuple[str, ...]) -> list[str]:
    return ["--set", *overrides] if overrides else []


def llm_data(out: Path, plan: Plan) -> Path:
    """The LLM's training scenes: data/train-mixed (exact and resized renders) or, without resizing, data/train."""
    return out / "data" / ("train-mixed" if plan.resized_share > 0 else "train")


def _model_chain(prefix: str, root: Path, out: Path, plan: Plan, codes: Path, tokenizer_args: list[str]) -> list[Stage]:
    """tokenizer -> its metrics -> init -> pretokenize -> shapes-pretrain, under `root` (stage names prefixed)."""
    data, test = out / "data" / "train", out / "data" / "test"
    tokenizer = root / "tokenizer"
    return [
        (f"{prefix}tokenizer", tokenizer / "model.safetensors",
         ["train-tokenizer", "--data", str(data), "--out", str(tokenizer), *tokenizer_args,
          "--max-steps", str(plan.tokenizer_steps), "--resume", *_sets(plan.tokenizer_overrides)]),
        (f"{prefix}tokenizer metrics", root / "eval" / "tokenizer" / "results.json",
         ["eval", "--model", str(tokenizer), "--suite", "tokenizer", "--data", str(test), "--out",
          str(root / "eval" / "tokenizer")]),
        (f"{prefix}init", root / "init" / "mllm_config.json",
         ["init", "--llm", plan.llm, "--vision-tokenizer", str(tokenizer), "--out", str(root / "init"), "--overwrite"]),
        (f"{prefix}pretokenize", codes / "index.json",
         ["pretokenize", "--data", str(llm_data(out, plan)), "--vision-tokenizer", str(tokenizer), "--out",
          str(codes)]),
        (f"{prefix}pretrain", root / "pretrain" / "model" / "mllm_config.json",
         ["train", "--recipe", "shapes-pretrain", "--model", str(root / "init"), "--data", str(codes), "--out",
          str(root / "pretrain"), "--max-steps", str(plan.pretrain_steps), "--resume", *_sets(plan.llm_overrides)]),
    ]


def _evals(prefix: str, model: Path, root: Path, out: Path, plan: Plan, suites: tuple[str, ...]) -> list[Stage]:
    """One stage per evaluation suite of `model`, results under root/eval/<suite>."""
    test = out / "data" / "test"
    options = {"shapes-vqa": ["--data", str(test), "--limit", str(plan.vqa_items)],
               "shapes-caption": ["--data", str(test), "--limit", str(plan.caption_items)],
               "shapes-t2i": ["--limit", str(plan.t2i_prompts), "--option", f"seeds={plan.t2i_seeds}"]}
    if plan.other_size:  # the VQA questions again, on the same scenes rendered at the other size
        options[OTHER_SIZE_VQA] = ["--data", str(other_size_test(out, plan)), "--limit", str(plan.vqa_items)]
    return [(f"{prefix}eval {suite}", root / "eval" / suite / "results.json",
             ["eval", "--model", str(model), "--suite", "shapes-vqa" if suite == OTHER_SIZE_VQA else suite, "--out",
              str(root / "eval" / suite),
              *options[suite]])
            for suite in suites if suite in options]


OTHER_SIZE_VQA = "shapes-vqa-other-size"  # shapes-vqa on data/test-<other_size>px, results in eval/<this name>


def other_size_test(out: Path, plan: Plan) -> Path:
    return out / "data" / f"test-{plan.other_size}px"


def stages(out: Path, plan: Plan) -> list[Stage]:
    """The demo's stages, in order."""
    data, test, codes = out / "data" / "train", out / "data" / "test", out / "data" / "train-codes"
    sft = [
        ("sft", out / "sft" / "adapter" / "adapter_config.json",
         ["train", "--recipe", "shapes-sft", "--model", str(out / "pretrain" / "model"), "--data", str(codes),
          "--out", str(out / "sft"), "--max-steps", str(plan.sft_steps), "--resume", *_sets(plan.llm_overrides)]),
        ("merge", out / "model" / "mllm_config.json",
         ["merge", "--base", str(out / "pretrain" / "model"), "--adapter", str(out / "sft" / "adapter"), "--out",
          str(out / "model")]),
    ] if plan.sft_steps else [
        ("model", out / "model" / "mllm_config.json", _copy_model(out / "pretrain" / "model", out / "model")),
    ]
    mixed = [
        ("mixed data", llm_data(out, plan) / "index.json",
         ["data", "shapes", "--out", str(llm_data(out, plan)), "--n", str(plan.train_scenes), "--size",
          str(plan.image_size), "--resized-share", str(plan.resized_share), "--overwrite"]),
    ] if plan.resized_share > 0 else []
    other = other_size_test(out, plan)
    other_test = [
        ("test data, other size", other / "index.json",
         ["data", "shapes", "--out", str(other), "--n", str(plan.test_scenes), "--size", str(plan.other_size),
          "--split", "test", "--overwrite"]),
    ] if plan.other_size else []
    return [
        ("data", data / "index.json", ["data", "shapes", "--out", str(data), "--n", str(plan.train_scenes),
                                       "--size", str(plan.image_size), "--overwrite"]),
        *mixed,
        ("test data", test / "index.json", ["data", "shapes", "--out", str(test), "--n", str(plan.test_scenes),
                                            "--size", str(plan.image_size), "--split", "test", "--overwrite"]),
        *other_test,
        ("teacher", out / "teacher" / "model.safetensors",
         ["train-teacher", "--data", str(data), "--out", str(out / "teacher"), "--max-steps",
          str(plan.teacher_steps), *_sets(plan.teacher_overrides)]),
        *_model_chain("", out, out, plan, codes, ["--teacher", str(out / "teacher")]),
        *sft,
        *_evals("", model_dir(out, plan), out, out, plan,
                ("shapes-vqa", "shapes-caption", "shapes-t2i", OTHER_SIZE_VQA)),
    ]


def _run_stages(out: Path, todo: list[Stage]) -> dict[str, float]:
    """Run the stages whose marker file is missing, in order; wall times go to DIR/stages.json."""
    from mllm.cli import main as mllm

    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "stages.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    for index, (name, marker, argv) in enumerate(todo, 1):
        if marker.is_file():
            print(f"== [{index}/{len(todo)}] {name}: done ({marker.relative_to(out)})", flush=True)
            continue
        command = argv.describe if callable(argv) else f"mllm {' '.join(argv)}"
        print(f"== [{index}/{len(todo)}] {name}: {command}", flush=True)
        stage_start = time.time()
        code = argv() if callable(argv) else mllm(argv)
        if code != 0 or not marker.is_file():
            raise SystemExit(f"mllm demo: stage {name!r} failed (exit {code}); fix the cause and rerun "
                             f"the same `mllm demo` command to continue from this stage")
        timings[name] = round(time.time() - stage_start, 1)
        timings_file.write_text(json.dumps(timings, indent=2) + "\n")
    return timings


def run_demo(out: Path, plan: Plan) -> dict[str, Any]:
    started = time.time()
    timings = _run_stages(out, stages(out, plan))
    report = write_report(out, plan, timings)
    print(f"\ndemo finished in {time.time() - started:.0f} s (this run); report: {out / 'report.md'}\n")
    print(report["table"])
    print(f"chat with it:   mllm chat --model {model_dir(out, plan)}")
    print(f"serve it:       mllm serve --model {model_dir(out, plan)}   (web chat at http://127.0.0.1:8000/)")
    return report


# ---------------------------------------------------------------------------------------- ablations
def ablation_stages(out: Path, plan: Plan) -> list[Stage]:
    """The paper claims in miniature, after the demo (reusing its data, teacher and dual tokenizer):

    (a) TokenFlow: a pixel-only tokenizer (one codebook, the same K and code grid, the same steps) and a
        model trained on its codes with the demo's recipe and steps, against the demo's dual-codebook model.
    (b) ETT: from one codebook-mode init of the dual tokenizer, `shapes-ett` for `ett_steps` with the
        tokenizer tuned end to end, and the same with it frozen (`ett.train_tokenizer=false`).
    """
    data, test = out / "data" / "train", out / "data" / "test"
    ab = out / "ablations"
    pixel = ab / "pixel"
    ett_steps = str(plan.ett_steps)
    return [
        *_model_chain("pixel-only ", pixel, out, plan, pixel / "train-codes", ["--quantizer", "pixel"]),
        *_evals("pixel-only ", pixel / "pretrain" / "model", pixel, out, plan, ("shapes-vqa", "shapes-t2i")),
        ("codebook-mode init", ab / "codebook-init" / "mllm_config.json",
         ["init", "--llm", plan.llm, "--vision-tokenizer", str(out / "tokenizer"), "--out", str(ab / "codebook-init"),
          "--embedding", "codebook", "--overwrite"]),
        ("ETT", ab / "ett" / "model" / "mllm_config.json",
         ["train", "--recipe", "shapes-ett", "--model", str(ab / "codebook-init"), "--data", str(data), "--out",
          str(ab / "ett"), "--max-steps", ett_steps, "--resume", *_sets(plan.llm_overrides)]),
        ("frozen tokenizer", ab / "frozen" / "model" / "mllm_config.json",
         ["train", "--recipe", "shapes-ett", "--model", str(ab / "codebook-init"), "--data", str(data), "--out",
          str(ab / "frozen"), "--max-steps", ett_steps, "--resume", "--set", "ett.train_tokenizer=false",
          *plan.llm_overrides]),
        *_evals("ETT ", ab / "ett" / "model", ab / "ett", out, plan, ("shapes-vqa", "shapes-caption")),
        ("ETT tokenizer metrics", ab / "ett" / "eval" / "tokenizer" / "results.json",
         ["eval", "--model", str(ab / "ett" / "model" / "vision_tokenizer"), "--suite", "tokenizer", "--data",
          str(test), "--out", str(ab / "ett" / "eval" / "tokenizer")]),
        *_evals("frozen ", ab / "frozen" / "model", ab / "frozen", out, plan, ("shapes-vqa", "shapes-caption")),
    ]


def run_ablations(out: Path, plan: Plan) -> str:
    """The demo (if not complete), then the ablation stages; writes DIR/ablations.md and returns its table."""
    run_demo(out, plan)
    started = time.time()
    todo = ablation_stages(out, plan)
    timings = _run_stages(out, todo)
    table = ablation_table(out, plan)
    ablation_seconds = sum(timings.get(name, 0.0) for name, _, _ in todo)
    text = (f"# Ablations ({plan.llm} model)\n\n{table}\n\nAblation stages: {ablation_seconds / 60:.1f} minutes "
            f"of wall time on top of the demo (stage times in stages.json).\n")
    (out / "ablations.md").write_text(text)
    print(f"\nablations finished in {time.time() - started:.0f} s (this run); {out / 'ablations.md'}\n")
    print(table)
    return table


def ablation_table(out: Path, plan: Plan) -> str:
    ab = "ablations"
    value = lambda folder, metric: _metric(_results(out, folder), metric)
    shown = lambda v: "n/a" if v is None else f"{v:.1f}"
    header = ("| (a) tokenizer, same code count and budget | VQA accuracy | drawing: single object | "
              "drawing: position | drawing: all categories | tokenizer PSNR | judge agreement |")
    rows = [header, "|---|---|---|---|---|---|---|"]
    for label, root in (("dual codebook (the demo)", ""), ("pixel-only codebook", f"{ab}/pixel/")):
        rows.append(f"| {label} | {shown(value(root + 'eval/shapes-vqa', 'accuracy'))} | "
                    f"{shown(value(root + 'eval/shapes-t2i', 'accuracy_single_object'))} | "
                    f"{shown(value(root + 'eval/shapes-t2i', 'accuracy_position'))} | "
                    f"{shown(value(root + 'eval/shapes-t2i', 'accuracy'))} | "
                    f"{shown(value(root + 'eval/tokenizer', 'psnr'))} dB | "
                    f"{shown(value(root + 'eval/tokenizer', 'judge_agreement'))} |")
    header = (f"| (b) codebook-mode model, {plan.ett_steps} steps of shapes-ett | VQA accuracy | "
              "caption: every object right | tokenizer PSNR after | judge agreement after |")
    rows += ["", header, "|---|---|---|---|---|"]
    for label, root, tokenizer in (("ETT: tokenizer tuned end to end", f"{ab}/ett/", f"{ab}/ett/eval/tokenizer"),
                                   ("frozen tokenizer", f"{ab}/frozen/", "eval/tokenizer")):
        rows.append(f"| {label} | {shown(value(root + 'eval/shapes-vqa', 'accuracy'))} | "
                    f"{shown(value(root + 'eval/shapes-caption', 'objects_right'))} | "
                    f"{shown(value(tokenizer, 'psnr'))} dB | {shown(value(tokenizer, 'judge_agreement'))} |")
    before = (f"Reconstruction before tuning (the demo's tokenizer): {shown(value('eval/tokenizer', 'psnr'))} dB "
              f"PSNR, {shown(value('eval/tokenizer', 'judge_agreement'))}% judge agreement.")
    rows += ["", before]
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------- report
def _results(out: Path, folder: str) -> dict[str, Any]:
    path = out / folder / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _metric(results: dict[str, Any], name: str) -> float | None:
    value = results.get("metrics", results).get(name)
    return float(value) if isinstance(value, (int, float)) else None


def write_report(out: Path, plan: Plan, timings: dict[str, float]) -> dict[str, Any]:
    rows = ["| result | value | bar | |", "|---|---|---|---|"]
    passed = {}
    for folder, metric, minimum, label in BARS:
        value = _metric(_results(out, folder), metric)
        ok = value is not None and value >= minimum
        passed[label] = ok
        shown = "n/a" if value is None else f"{value:.1f}%"
        rows.append(f"| {label} | {shown} | >= {minimum:.0f}% | {'pass' if ok else 'MISS'} |")
    extra = [(f"VQA accuracy, the same scenes rendered at {plan.other_size} px (resized on the way in)",
              _metric(_results(out, f"eval/{OTHER_SIZE_VQA}"), "accuracy")),
             ("caption exact (sizes too)", _metric(_results(out, "eval/shapes-caption"), "exact")),
             ("caption CIDEr", _metric(_results(out, "eval/shapes-caption"), "cider")),
             ("drawing, all categories (GenEval-style mean)", _metric(_results(out, "eval/shapes-t2i"), "accuracy")),
             ("tokenizer PSNR (dB)", _metric(_results(out, "eval/tokenizer"), "psnr"))]
    for label, value in extra:
        if value is not None:
            rows.append(f"| {label} | {value:.2f} | | |")
    table = "\n".join(rows)
    total = sum(timings.values())
    lines = [f"# Demo report ({plan.llm} model, {plan.minutes:g}-minute plan)", "", "![report](report.png)", "",
             "## Results on held-out scenes", "", table, "", "## Stages (wall time, seconds)", "",
             "| stage | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in timings.items()],
             f"| total | {total:.0f} |", "", "## Use the model", "", "```bash",
             f"mllm chat --model {model_dir(out, plan)}", f"mllm serve --model {model_dir(out, plan)}", "```", ""]
    (out / "report.md").write_text("\n".join(lines))
    write_report_image(out)
    return {"table": table, "passed": passed, "seconds": total}


def write_report_image(out: Path) -> None:
    """DIR/report.png: held-out images with caption and one VQA answer; drawings; the tokenizer's
    originals next to reconstructions; training loss curves."""
    from PIL import Image, ImageDraw

    from mllm.data.shards import DataStats, read_records

    width, tile = 960, 128
    panels: list[Image.Image] = []

    # 1. held-out scenes with the model's caption and an answer
    captions = _predictions(out / "eval" / "shapes-caption")
    answers = _predictions(out / "eval" / "shapes-vqa")
    scenes = []
    for record in read_records(str(out / "data" / "test"), stats=DataStats(), split=False):
        if record["key"] in captions:
            scenes.append(record)
        if len(scenes) == 6:
            break
    if scenes:
        panel = Image.new("RGB", (width, tile + 90), "white")
        draw = ImageDraw.Draw(panel)
        for column, record in enumerate(scenes):
            x = column * (width // 6)
            panel.paste(record["image"].resize((tile, tile), Image.Resampling.NEAREST), (x + 8, 4))
            draw.rectangle((x + 7, 3, x + 8 + tile, 4 + tile), outline=(160, 160, 160))
            qa = (record.get("json") or {}).get("qa") or [{}]
            answer = answers.get(f"{record['key']}-0", {}).get("answer", "")
            text = (_wrap(captions[record["key"]].get("answer", ""), 26)[:3]
                    + _wrap(f"Q: {qa[0].get('question', '')}", 26)[:2] + [f"A: {answer}"[:26]])
            draw.multiline_text((x + 4, tile + 8), "\n".join(text), fill="black", spacing=1)
        panels.append(_titled(panel, "held-out scenes: the model's caption, and its answer to the first question"))

    # 2. drawings
    drawings = list(_predictions(out / "eval" / "shapes-t2i").values())[:6]
    if drawings:
        panel = Image.new("RGB", (width, tile + 40), "white")
        draw = ImageDraw.Draw(panel)
        for column, record in enumerate(drawings):
            x = column * (width // 6)
            path = out / "eval" / "shapes-t2i" / record["images"][0]
            if path.is_file():
                panel.paste(Image.open(path).convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x + 8, 4))
            draw.rectangle((x + 7, 3, x + 8 + tile, 4 + tile), outline=(160, 160, 160))
            draw.multiline_text((x + 4, tile + 8), "\n".join(_wrap(record.get("prompt", ""), 24)[:2]), fill="black")
        panels.append(_titled(panel, "drawings for held-out prompts"))

    # 3. tokenizer reconstructions (eval-tokenizer's examples)
    examples = out / "eval" / "tokenizer" / "examples.png"
    if examples.is_file():
        image = Image.open(examples).convert("RGB")
        image = image.resize((width, max(1, round(image.height * width / image.width))), Image.Resampling.NEAREST)
        panels.append(_titled(image, "tokenizer: originals and reconstructions"))

    # 4. loss curves
    curves = {name: _losses(out / name / "metrics.jsonl") for name in ("pretrain", "sft")}
    if any(curves.values()):
        stages_run = ", then ".join(name for name, losses in curves.items() if losses)
        panels.append(_titled(_plot(curves, width, 220), f"training loss ({stages_run})"))

    height = sum(p.height for p in panels) or 1
    sheet = Image.new("RGB", (width, height), "white")
    y = 0
    for panel in panels:
        sheet.paste(panel, (0, y))
        y += panel.height
    sheet.save(out / "report.png")


def _predictions(folder: Path) -> dict[str, dict]:
    path = folder / "predictions.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r["id"]): r for r in records}


def _losses(path: Path) -> list[float]:
    if not path.is_file():
        return []
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _titled(panel, title: str):
    from PIL import Image, ImageDraw

    framed = Image.new("RGB", (panel.width, panel.height + 22), "white")
    ImageDraw.Draw(framed).text((8, 4), title, fill="black")
    framed.paste(panel, (0, 22))
    return framed


def _plot(curves: dict[str, list[float]], width: int, height: int):
    """Losses of the stages one after the other on one axis (PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    values = [v for losses in curves.values() for v in losses]
    low, high = min(values), max(values)
    left, right, top, bottom = 50, width - 10, 10, height - 20
    draw.rectangle((left, top, right, bottom), outline="gray")
    draw.text((4, top), f"{high:.2f}", fill="black")
    draw.text((4, bottom - 10), f"{low:.2f}", fill="black")
    count = len(values)
    start, colours = 0, {"pretrain": (30, 90, 200), "sft": (200, 60, 30)}
    for name, losses in curves.items():
        points = [(left + (right - left) * (start + i) / max(count - 1, 1),
                   bottom - (bottom - top) * (v - low) / max(high - low, 1e-9)) for i, v in enumerate(losses)]
        if len(points) > 1:
            draw.line(points, fill=colours.get(name, "black"), width=2)
        if points:
            draw.text((points[0][0] + 4, top + 4), name, fill=colours.get(name, "black"))
        start += len(losses)
    return image


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); rerun to resume")
    parser.add_argument("--minutes", type=float, help="scale the training stages to about this many minutes "
                                                      "in all (default: the plan's own, 20 for shapes)")
    parser.add_argument("--size", choices=sorted(PLANS), default="shapes",
                        help="shapes (the demo) or tiny (a minute-sized smoke run)")
    parser.add_argument("--ablations", action="store_true",
                        help="after the demo, the paper claims in miniature: dual vs pixel-only codebook, and ETT vs "
                             "a frozen tokenizer (about 40 more minutes on 2 CPU cores); writes DIR/ablations.md")


def run(args: argparse.Namespace) -> int:
    plan = scaled(PLANS[args.size], args.minutes)
    if args.ablations:
        run_ablations(Path(args.out), plan)
    else:
        run_demo(Path(args.out), plan)
    return 0


__all__ = ["BARS", "PLANS", "Plan", "ablation_stages", "ablation_table", "model_dir", "run_ablations", "run_demo",
           "scaled", "stages", "write_report"]
