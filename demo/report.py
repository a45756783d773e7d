"""The demo's report: DIR/report.md (results against the quality bars, stage times, commands),
DIR/report.png (held-out scenes with the model's answers, drawings, tokenizer reconstructions, loss
curves) and, after `--ablations`, the ablation table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from demo.plans import BARS, OTHER_SIZE_VQA, Plan, model_dir
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


def _metric(results: dict[str, Any], name: str) -> float | None:
    value = results.get("metrics", results).get(name)
    return float(value) if isinstance(value, (int, float)) else None


def write_report(out: Path, plan: Plan, timings: dict[str, float], commands: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """DIR/report.md (the results against the bars, stage times, how each stage ran) and DIR/report.png."""
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
             f"| total | {total:.0f} |", "",
             *(["## How each stage ran", "", "```bash", *commands.values(), "```", ""] if commands else []),
             "## Use the model", "", "```bash",
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
    return {str(r["id"]): r for r in read_jsonl(path)}


def _losses(path: Path) -> list[float]:
    if not path.is_file():
        return []
    return [record["loss"] for record in read_jsonl(path) if "loss" in record]


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


__all__ = ["ablation_table", "write_report", "write_report_image"]
