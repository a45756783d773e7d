"""`mllm demo`: every stage on tiny sizes, resuming after an interrupted stage, and the report."""

import json

import pytest

from mllm import demo


def test_tiny_demo_runs_every_stage_resumes_after_an_interruption_and_reports(tmp_path, monkeypatch):
    import mllm.cli

    out = tmp_path / "demo"
    plan = demo.PLANS["tiny"]
    real_main, calls = mllm.cli.main, []

    def interrupted(argv):
        calls.append(argv[0] if argv[0] != "train" else argv[argv.index("--recipe") + 1])
        if argv[0] == "train" and "shapes-sft" in argv:
            raise KeyboardInterrupt  # killed during the sft stage
        return real_main(argv)

    monkeypatch.setattr(mllm.cli, "main", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, plan)
    assert (out / "pretrain" / "model" / "mllm_config.json").is_file() and not (out / "model").exists()
    timings = json.loads((out / "stages.json").read_text())
    assert "pretrain" in timings and "sft" not in timings

    calls.clear()
    monkeypatch.setattr(mllm.cli, "main", real_main)
    monkeypatch.setattr(mllm.cli, "main", lambda argv: calls.append(argv[0]) or real_main(argv))
    report = demo.run_demo(out, plan)
    # The rerun starts at the interrupted stage: nothing before it runs again.
    assert calls == ["train", "merge", "eval", "eval", "eval", "eval"]
    for name, marker, _ in demo.stages(out, plan):
        assert marker.is_file(), name
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
    names = [name for name, _, _ in demo.stages(demo.Path("out"), base)]
    assert "sft" not in names and "merge" not in names and "model" in names


def test_tiny_ablations_run_both_comparisons_and_write_the_table(tmp_path):
    out = tmp_path / "demo"
    plan = demo.PLANS["tiny"]
    table = demo.run_ablations(out, plan)
    for name, marker, _ in [*demo.stages(out, plan), *demo.ablation_stages(out, plan)]:
        assert marker.is_file(), name
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
    plan = demo.replace(plan, train_scenes=2000, test_scenes=100, vqa_items=100, caption_items=20, t2i_prompts=10)
    demo.run_demo(tmp_path / "demo", plan)
    assert (tmp_path / "demo" / "report.png").is_file()
