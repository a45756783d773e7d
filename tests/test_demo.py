"""The demo pipeline: every stage on tiny sizes, resuming after an interrupted stage, and the report."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

import demo
from training import recipes


def _stages_run(output: str) -> list[str]:
    """Names of the stages a run executed (not skipped), from its `== [i/n] name: ...` lines."""
    names = []
    for line in output.splitlines():
        if line.startswith("== [") and not line.split("]", 1)[1].split(":", 1)[1].startswith(" done"):
            names.append(line.split("]", 1)[1].split(":", 1)[0].strip())
    return names


def test_tiny_demo_runs_every_stage_resumes_after_an_interruption_and_reports(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    plan = demo.PLANS["tiny"]
    real_run_recipe = recipes.run_recipe

    def interrupted(recipe, *args, **kwargs):
        if recipe == "shapes-sft":
            raise KeyboardInterrupt  # killed during the sft stage
        return real_run_recipe(recipe, *args, **kwargs)

    monkeypatch.setattr(recipes, "run_recipe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, plan)
    assert (out / "pretrain" / "model" / "mllm_config.json").is_file() and not (out / "model").exists()
    timings = json.loads((out / "stages.json").read_text())
    assert "pretrain" in timings and "sft" not in timings
    first = _stages_run(capsys.readouterr().out)
    assert first[0] == "data" and first[-1] == "sft"

    monkeypatch.setattr(recipes, "run_recipe", real_run_recipe)
    report = demo.run_demo(out, plan)
    # The rerun starts at the interrupted stage: nothing before it runs again.
    assert _stages_run(capsys.readouterr().out) == [
        "sft", "merge", "eval shapes-vqa", "eval shapes-caption", "eval shapes-t2i", "eval shapes-vqa-other-size"]
    for stage in demo.stages(out, plan):
        assert stage.marker.is_file(), stage.name
    # The tokenizer trained on exact renders, the LLM on the mixed set (some scenes rendered at other
    # sizes and resized), whose codes the pretrain stage read.
    import webdataset as wds

    mixed = [json.loads(r["json"]) for r in wds.WebDataset(str(out / "data" / "train-mixed" / "shard-000000.tar"),
                                                           shardshuffle=False)]
    exact = [json.loads(r["json"]) for r in wds.WebDataset(str(out / "data" / "train" / "shard-000000.tar"),
                                                           shardshuffle=False)]
    assert not any("rendered_size" in r for r in exact) and 0 < sum("rendered_size" in r for r in mixed) < len(mixed)
    codes = [json.loads(r["json"]) for r in wds.WebDataset(str(out / "data" / "train-codes" / "shard-000000.tar"),
                                                           shardshuffle=False)]
    assert [r.get("rendered_size") for r in codes] == [r.get("rendered_size") for r in mixed]
    # VQA also ran on the test scenes rendered at the other size, and the report shows it.
    other = json.loads((out / "eval" / demo.OTHER_SIZE_VQA / "results.json").read_text())
    assert other["data"].endswith(f"test-{plan.other_size}px") and other["count"] == plan.vqa_items
    text = (out / "report.md").read_text()
    assert f"rendered at {plan.other_size} px" in text
    # the report says how to rerun every stage by hand
    assert "mllm train --recipe shapes-sft" in text and "mllm eval --model" in text
    for _, _, minimum, label in demo.BARS:
        assert label in text and f">= {minimum:.0f}%" in text
    from PIL import Image

    sheet = Image.open(out / "report.png")
    assert sheet.width == 960 and sheet.height > 400  # four panels: scenes, drawings, tokenizer, loss curves
    assert set(report["passed"]) == {label for *_, label in demo.BARS}


def test_minutes_scale_the_training_stages():
    base = demo.PLANS["shapes"]
    plan = demo.scaled(base, base.minutes / 2)
    for name in ("teacher_steps", "tokenizer_steps", "pretrain_steps", "ett_steps"):
        assert getattr(plan, name) == round(getattr(base, name) / 2), name
    assert plan.sft_steps == base.sft_steps == 0  # no sft stage stays none
    assert demo.scaled(demo.PLANS["tiny"], 0.01).pretrain_steps == 1
    assert demo.scaled(demo.PLANS["tiny"], 0.01).sft_steps == 1
    # without sft the pretrain model is the demo's model, and no sft/merge stage runs
    names = [stage.name for stage in demo.stages(Path("out"), base)]
    assert "sft" not in names and "merge" not in names and "model" in names


def test_tiny_ablations_run_both_comparisons_and_write_the_table(tmp_path):
    out = tmp_path / "demo"
    plan = demo.PLANS["tiny"]
    table = demo.run_ablations(out, plan)
    for stage in [*demo.stages(out, plan), *demo.ablation_stages(out, plan)]:
        assert stage.marker.is_file(), stage.name
    from tokenizer_vision import DualCodebookTokenizer

    assert DualCodebookTokenizer.from_pretrained(out / "ablations/pixel/tokenizer").config.quantizer_mode == "pixel"
    text = (out / "ablations.md").read_text()
    assert table in text and "minutes" in text
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for label in ("dual codebook (the demo)", "pixel-only codebook", "ETT: tokenizer tuned end to end",
                  "frozen tokenizer"):
        assert label in rows and "n/a" not in rows[label], label
    # the frozen arm really kept the tokenizer, the ETT arm changed it
    import torch
    from safetensors.torch import load_file

    before = load_file(out / "tokenizer" / "model.safetensors")
    frozen = load_file(out / "ablations/frozen/model/vision_tokenizer/model.safetensors")
    tuned = load_file(out / "ablations/ett/model/vision_tokenizer/model.safetensors")
    name = next(key for key in before if "encoder" in key and key.endswith("weight"))
    assert torch.equal(before[name], frozen[name]) and not torch.equal(before[name], tuned[name])


@pytest.mark.slow
def test_shapes_demo_end_to_end_at_a_small_budget(tmp_path):
    """The real shapes plan with every training stage cut to a few percent (about 5 minutes on 2 cores)."""
    plan = demo.scaled(demo.PLANS["shapes"], 1.0)
    plan = replace(plan, train_scenes=2000, test_scenes=100, vqa_items=100, caption_items=20, t2i_prompts=10)
    demo.run_demo(tmp_path / "demo", plan)
    assert (tmp_path / "demo" / "report.png").is_file()
