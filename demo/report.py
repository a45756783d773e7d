"""The demo's report: DIR/report.md (what the plan is for, results against the quality bars where the
plan has them, sample answers, stage times, the environment, commands), DIR/environment.json,
DIR/report.png (held-out scenes with the model's captions and answers, drawings, tokenizer
reconstructions, loss against the step) and, after `--ablations`, the ablation table. An empty or whitespace-only reply is shown as "(empty)"."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from demo.plans import BARS, OTHER_LOOK_TOKENIZER, OTHER_SIZE_VQA, Plan, model_dir
from mllm.io import read_jsonl


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



def _results(out: Path, folder: str) -> dict[str, Any]:
    path = out / folder / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _encoder_tuning(out: Path, plan: Plan) -> dict[str, Any]:
    """The figures `mllm tune-encoder` wrote beside the model's tokenizer ({} without the stage)."""
    from training.tune_encoder import RESULT_NAME

    path = model_dir(out, plan) / "vision_tokenizer" / RESULT_NAME
    return json.loads(path.read_text()) if plan.encoder_tuning_steps and path.is_file() else {}


def _metric(results: dict[str, Any], name: str) -> float | None:
    value = results.get("metrics", results).get(name)
    return float(value) if isinstance(value, (int, float)) else None


# The packages whose versions can move a training run's numbers: two environments that differ in them (or in
# the CPU's floating-point kernels) are two training runs, whose figures differ as two seeds' would
# (docs/experiments.md, section 36). A fresh install resolves the newest release in each range.
ENVIRONMENT_PACKAGES = ("torch", "transformers", "accelerate", "peft", "tokenizers", "sentencepiece", "safetensors",
                        "numpy", "pillow")
ENVIRONMENT_NAME = "environment.json"


def environment() -> dict[str, str]:
    """What the run's numbers depend on besides the code and the plan: Python, the CPU (its model name and the
    kernels torch picks for it), torch's threads, and the versions of ENVIRONMENT_PACKAGES."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model in /proc/cpuinfo; elsewhere platform's answer stays
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    found = {"python": platform.python_version(), "cpu": cpu,
             "cpu kernels (torch)": torch.backends.cpu.get_cpu_capability(), "torch threads": str(torch.get_num_threads())}
    for package in ENVIRONMENT_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def write_report(out: Path, plan: Plan, timings: dict[str, float], commands: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """DIR/report.md (what the plan is for, the results against the bars, sample answers, stage times, how
    each stage ran) and DIR/report.png. Returns {"table", "summary" (what `mllm demo` prints: the plan's
    purpose, then the table), "passed" ({bar label: True | False, or None where the plan has no bars}),
    "seconds"}."""
    rows = ["| result | value | bar | |", "|---|---|---|---|"]
    passed: dict[str, bool | None] = {}
    for folder, metric, minimum, label in BARS:
        value = _metric(_results(out, folder), metric)
        figure = "n/a" if value is None else f"{value:.1f}%"
        if plan.bars:
            ok = value is not None and value >= minimum
            passed[label] = ok
            rows.append(f"| {label} | {figure} | >= {minimum:.0f}% | {'pass' if ok else 'MISS'} |")
        else:
            passed[label] = None
            rows.append(f"| {label} | {figure} | (>= {minimum:.0f}% at the shapes size) | not applicable at this size |")
    extra = [(f"VQA accuracy, the same scenes rendered at {plan.other_size} px (resized on the way in)",
              _metric(_results(out, f"eval/{OTHER_SIZE_VQA}"), "accuracy")),
             ("caption exact (sizes too)", _metric(_results(out, "eval/shapes-caption"), "exact")),
             ("caption CIDEr", _metric(_results(out, "eval/shapes-caption"), "cider")),
             ("drawing, all categories (GenEval-style mean)", _metric(_results(out, "eval/shapes-t2i"), "accuracy")),
             ("tokenizer PSNR (dB)", _metric(_results(out, "eval/tokenizer"), "psnr")),
             ("tokenizer PSNR on the held-out rasteriser's scenes (dB)",
              _metric(_results(out, f"eval/{OTHER_LOOK_TOKENIZER}"), "psnr")),
             ("editing: untouched objects kept (%)", _metric(_results(out, "eval/shapes-edit"), "kept")),
             ("editing: output is the unchanged source (%)", _metric(_results(out, "eval/shapes-edit"), "copied")),
             *((f"two images, {kind} questions (%)", _metric(_results(out, "eval/shapes-multi"), f"accuracy_{kind}"))
               for kind in ("count", "more", "change", "single")),
             *((label, _metric(_encoder_tuning(out, plan), metric)) for label, metric in (
                 ("tokenizer judge agreement, objects anywhere in their cell, before encoder tuning (%)",
                  "anywhere_judge_agreement_before"),
                 ("tokenizer judge agreement, objects anywhere in their cell, after encoder tuning (%)",
                  "anywhere_judge_agreement"),
                 ("encoder tuning: exact renders' codes kept (%)", "exact_codes_kept"))),
             *((label, _metric(_results(out, "eval/chat-threshold"), metric)) for label, metric in (
                 ("chat: edits sent image first that start an image, with the model's threshold (%)",
                  "edits_starting_an_image"),
                 ("chat: the same without a threshold (%)", "edits_starting_an_image_plain"),
                 ("chat: questions that start an image, with the threshold (%)", "questions_starting_an_image")))]
    for label, value in extra:
        if value is not None:
            rows.append(f"| {label} | {value:.2f} | | |")
    table = "\n".join(rows)
    total = sum(timings.values())
    samples = _samples(out)
    env = environment()
    (out / ENVIRONMENT_NAME).write_text(json.dumps(env, indent=2) + "\n")
    title = (f"# Demo report ({plan.llm} size: a plumbing check, not a model)" if not plan.bars
             else f"# Demo report ({plan.llm} model, {plan.minutes:g}-minute plan)")
    lines = [title, "", *([f"> {plan.purpose}", ""] if plan.purpose else []), "![report](report.png)", "",
             "## Results on held-out scenes", "", table, "",
             *([("Editing examples (source, instruction, output, target): "
                "[eval/shapes-edit/examples.png](eval/shapes-edit/examples.png)"), ""]
               if (out / "eval" / "shapes-edit" / "examples.png").is_file() else []),
             *_sample_tables(samples),
             "## Stages (wall time, seconds)", "",
             "| stage | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in timings.items()],
             f"| total | {total:.0f} |", "",
             "## Environment", "",
             ("The same code and plan give the same figures in the same environment; another CPU or other package "
              f"versions make another training run ({ENVIRONMENT_NAME})."), "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in env.items()], "",
             *(["## How each stage ran", "", "```bash", *commands.values(), "```", ""] if commands else []),
             "## Use the model", "", "```bash",
             f"mllm chat --model {model_dir(out, plan)}", f"mllm serve --model {model_dir(out, plan)}", "```", ""]
    (out / "report.md").write_text("\n".join(lines))
    write_report_image(out, samples)
    summary = f"{plan.purpose}\n\n{table}" if plan.purpose else table
    return {"table": table, "summary": summary, "passed": passed, "seconds": total}


def shown(text: str | None) -> str:
    """A reply as the report shows it: "(empty)" for an empty or whitespace-only one, else on one line."""
    text = " ".join(str(text or "").split())
    return text or EMPTY


EMPTY = "(empty)"
NOT_ASKED = "(not among this run's VQA items)"


def _samples(out: Path, count: int = 6) -> list[dict[str, Any]]:
    """The first `count` held-out scenes the caption suite ran on: {"key", "image", "caption" (the model's),
    "reference", "question", "answer" (the model's; None when the VQA run did not ask it), "truth"}. The
    question is the scene's first one the VQA run asked (the runs take items in order, up to --limit)."""
    captions = _predictions(out / "eval" / "shapes-caption")
    answers = _predictions(out / "eval" / "shapes-vqa")
    test = out / "data" / "test"
    if not captions or not test.is_dir():
        return []
    from mllm.data.shards import DataStats, read_records

    samples = []
    for record in read_records(str(test), stats=DataStats(), split=False):
        if record["key"] not in captions:
            continue
        meta = record.get("json") or {}
        qa = meta.get("qa") or []
        index = next((i for i in range(len(qa)) if f"{record['key']}-{i}" in answers), None)
        pair = qa[index] if index is not None else (qa[0] if qa else {})
        samples.append({"key": record["key"], "image": record["image"],
                        "caption": captions[record["key"]].get("answer"), "reference": meta.get("caption", ""),
                        "question": pair.get("question", ""), "truth": pair.get("answer", ""),
                        "answer": None if index is None else answers[f"{record['key']}-{index}"].get("answer")})
        if len(samples) == count:
            break
    return samples


def _sample_tables(samples: list[dict[str, Any]]) -> list[str]:
    """report.md's "Sample answers": each scene's caption and one answer next to the right ones."""
    if not samples:
        return []
    cell = lambda text: str(text).replace("|", "\\|")
    lines = ["## Sample answers (held-out scenes)", "", "| scene | the model's caption | reference caption |",
             "|---|---|---|"]
    lines += [f"| {s['key']} | {cell(shown(s['caption']))} | {cell(s['reference'])} |" for s in samples]
    asked = [s for s in samples if s["answer"] is not None]
    if asked:
        lines += ["", "| scene | question | the model's answer | right answer |", "|---|---|---|---|"]
        lines += [f"| {s['key']} | {cell(s['question'])} | {cell(shown(s['answer']))} | {cell(s['truth'])} |"
                  for s in asked]
    return [*lines, ""]


def _scene_lines(sample: dict[str, Any], width: int = 26) -> list[str]:
    """The text under a scene in report.png: the model's caption, a question, its answer and the right one."""
    lines = _clipped(f"caption: {shown(sample['caption'])}", width, 3) + _clipped(f"Q: {sample['question']}", width, 2)
    if sample["answer"] is None:
        return [*lines, *_wrap(f"A: {NOT_ASKED}", width)]
    return [*lines, *_clipped(f"A: {shown(sample['answer'])}", width, 2), *_clipped(f"right: {sample['truth']}", width, 1)]


def _clipped(text: str, width: int, count: int) -> list[str]:
    """`text` wrapped to `width`, at most `count` lines; "..." ends the last line when some was left out."""
    lines = _wrap(text, width)
    if len(lines) <= count:
        return lines
    return [*lines[: count - 1], lines[count - 1][: width - 3] + "..."]


def write_report_image(out: Path, samples: list[dict[str, Any]] | None = None) -> None:
    """DIR/report.png: held-out scenes with the model's caption and one VQA answer (and the right one);
    drawings with their prompts; the tokenizer's originals over their reconstructions; the training loss
    against the step."""
    from PIL import Image, ImageDraw

    width, tile = 960, 128
    panels: list[Image.Image] = []
    samples = _samples(out) if samples is None else samples

    # 1. held-out scenes with the model's caption and an answer
    if samples:
        texts = ["\n".join(_scene_lines(sample)) for sample in samples]
        panel = Image.new("RGB", (width, tile + 16 + _text_height(texts)), "white")
        draw = ImageDraw.Draw(panel)
        for column, (sample, text) in enumerate(zip(samples, texts)):
            x = column * (width // 6)
            panel.paste(sample["image"].resize((tile, tile), Image.Resampling.NEAREST), (x + 8, 4))
            draw.rectangle((x + 7, 3, x + 8 + tile, 4 + tile), outline=(160, 160, 160))
            draw.multiline_text((x + 4, tile + 10), text, fill="black", spacing=2)
        panels.append(_titled(panel, "held-out scenes: the model's caption, its answer (A) to a question (Q), and "
                                     "the right answer"))

    # 2. drawings
    drawings = list(_predictions(out / "eval" / "shapes-t2i").values())[:6]
    if drawings:
        texts = ["\n".join(_wrap(record.get("prompt", ""), 24)) for record in drawings]
        panel = Image.new("RGB", (width, tile + 16 + _text_height(texts)), "white")
        draw = ImageDraw.Draw(panel)
        for column, (record, text) in enumerate(zip(drawings, texts)):
            x = column * (width // 6)
            path = out / "eval" / "shapes-t2i" / record["images"][0]
            if path.is_file():
                panel.paste(Image.open(path).convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x + 8, 4))
            draw.rectangle((x + 7, 3, x + 8 + tile, 4 + tile), outline=(160, 160, 160))
            draw.multiline_text((x + 4, tile + 10), text, fill="black", spacing=2)
        panels.append(_titled(panel, "drawings for held-out prompts (the prompt under each)"))

    # 3. tokenizer reconstructions (eval-tokenizer's examples)
    examples = out / "eval" / "tokenizer" / "examples.png"
    if examples.is_file():
        image = Image.open(examples).convert("RGB")
        columns = max(1, round(image.width / max(image.height / 2, 1)))  # two rows of square images
        image = image.resize((width, max(2, round(image.height * width / image.width))), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(image)
        for column in range(columns):  # a frame per image: a white scene's edge shows, and pairs line up
            x0, x1 = round(column * width / columns), round((column + 1) * width / columns) - 1
            for y0, y1 in ((0, image.height // 2 - 1), (image.height // 2, image.height - 1)):
                draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
        panels.append(_titled(image, "tokenizer: originals (top row) over their reconstructions (bottom row)"))

    # 4. loss curves
    curves = {name: _losses(out / name / "metrics.jsonl") for name in ("pretrain", "sft")}
    if any(curves.values()):
        stages_run = ", then ".join(name for name, losses in curves.items() if losses)
        panels.append(_titled(_plot(curves, width, 260), f"training loss against the step ({stages_run})"))

    height = sum(p.height for p in panels) or 1
    sheet = Image.new("RGB", (width, height), "white")
    y = 0
    for panel in panels:
        sheet.paste(panel, (0, y))
        y += panel.height
    sheet.save(out / "report.png")


def _text_height(texts: list[str]) -> int:
    """Pixel height of the tallest of `texts` drawn with the default font (spacing 2)."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return max((draw.multiline_textbbox((0, 0), text, spacing=2)[3] for text in texts), default=0) + 4


def _predictions(folder: Path) -> dict[str, dict]:
    path = folder / "predictions.jsonl"
    if not path.is_file():
        return {}
    return {str(r["id"]): r for r in read_jsonl(path)}


def _losses(path: Path) -> list[tuple[float, float]]:
    """(step, loss) of each logged step of a training log (a record without a step counts as the next)."""
    if not path.is_file():
        return []
    points = []
    for record in read_jsonl(path):
        if isinstance(record.get("loss"), (int, float)):
            step = record.get("step")
            points.append((float(step) if isinstance(step, (int, float)) else len(points) + 1.0,
                           float(record["loss"])))
    return points


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _titled(panel, title: str):
    from PIL import Image, ImageDraw

    framed = Image.new("RGB", (panel.width, panel.height + 22), "white")
    ImageDraw.Draw(framed).text((8, 4), title, fill="black")
    framed.paste(panel, (0, 22))
    return framed


def ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """About `count` round tick values (multiples of 1, 2, 2.5 or 5 times a power of ten) inside [low, high];
    whole numbers only when `integer`."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * 0.999)
    if integer:
        step = max(1.0, round(step)) if step != 2.5 else 2.0
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + k * step, 10) for k in range(int((high - first) / step + 1e-9) + 1)]


def _tick_label(value: float, values: list[float]) -> str:
    """A tick's label with the fewest decimals that write every tick of `values` exactly."""
    decimals = next((d for d in range(7) if all(abs(round(v, d) - v) < 1e-9 for v in values)), 6)
    return f"{value:.{decimals}f}"


def _plot(curves: dict[str, list[tuple[float, float]]], width: int, height: int):
    """The stages' losses one after the other against the training step (a later stage's steps continue from
    the earlier one's last), with step and loss axes: ticks, tick labels and axis names (PIL: no plotting
    dependency)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    colours = {"pretrain": (30, 90, 200), "sft": (200, 60, 30)}
    placed, offset = {}, 0.0
    for name, points in curves.items():
        if points:
            placed[name] = [(offset + step, loss) for step, loss in points]
            offset = placed[name][-1][0]
    steps = [x for points in placed.values() for x, _ in points]
    losses = [y for points in placed.values() for _, y in points]
    x_low, x_high = min(0.0, min(steps)), max(max(steps), 1.0)
    y_low, y_high = min(losses), max(losses)
    pad = (y_high - y_low) * 0.08 or max(abs(y_high) * 0.05, 0.05)
    y_low, y_high = y_low - pad, y_high + pad
    left, right, top, bottom = 70, width - 20, 12, height - 42
    to_x = lambda x: left + (right - left) * (x - x_low) / (x_high - x_low)
    to_y = lambda y: bottom - (bottom - top) * (y - y_low) / (y_high - y_low)
    x_ticks = ticks(x_low, x_high, 8, integer=True)
    for value in x_ticks:
        x = to_x(value)
        draw.line((x, bottom, x, bottom + 4), fill="black")
        label = _tick_label(value, x_ticks)
        draw.text((x - 3 * len(label), bottom + 6), label, fill="black")
    y_ticks = ticks(y_low, y_high, 5)
    for value in y_ticks:
        y = to_y(value)
        draw.line((left - 4, y, left, y), fill="black")
        draw.line((left + 1, y, right - 1, y), fill=(235, 235, 235))
        label = _tick_label(value, y_ticks)
        draw.text((left - 8 - 6 * len(label), y - 6), label, fill="black")
    x_name = "training step" + (f" ({', then '.join(placed)}, one after the other)" if len(placed) > 1 else "")
    draw.text(((left + right) // 2 - 3 * len(x_name), bottom + 22), x_name, fill="black")
    draw.rectangle((left, top, right, bottom), outline="gray")  # over the grid lines
    draw.text((6, top), "loss", fill="black")
    legend_y = top + 6
    for name, points in placed.items():
        colour = colours.get(name, "black")
        xy = [(to_x(x), to_y(y)) for x, y in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy if len(xy) <= 50 else ():  # a few logged steps: each one visible
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.line((right - 120, legend_y + 6, right - 100, legend_y + 6), fill=colour, width=2)
        draw.text((right - 94, legend_y), name, fill=colour)
        legend_y += 16
    return image


__all__ = ["EMPTY", "ablation_table", "shown", "ticks", "write_report", "write_report_image"]
