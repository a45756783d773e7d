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
    assert calls == ["train", "merge", "eval", "eval", "eval"]
    for name, marker, _ in demo.stages(out, plan):
        assert marker.is_file(), name
    text = (out / "report.md").read_text()
    for _, _, minimum, label in demo.BARS:
        assert label in text and f">= {minimum:.0f}%" in text
    from PIL import Image

    sheet = Image.open(out / "report.png")
    assert sheet.width == 960 and sheet.height > 400  # four panels: scenes, drawings, tokenizer, loss curves
    assert set(report["passed"]) == {label for *_, label in demo.BARS}


def test_minutes_scale_the_training_stages():
    plan = demo.scaled(demo.PLANS["shapes"], 10)
    assert (plan.teacher_steps, plan.tokenizer_steps, plan.pretrain_steps, plan.sft_steps) == (200, 650, 750, 250)
    assert demo.scaled(demo.PLANS["tiny"], 0.01).pretrain_steps == 1


@pytest.mark.slow
def test_shapes_demo_end_to_end_at_a_small_budget(tmp_path):
    """The real shapes plan with every training stage cut to a few percent (about 5 minutes on 2 cores)."""
    plan = demo.scaled(demo.PLANS["shapes"], 1.0)
    plan = demo.replace(plan, train_scenes=2000, test_scenes=100, vqa_items=100, caption_items=20, t2i_prompts=10)
    demo.run_demo(tmp_path / "demo", plan)
    assert (tmp_path / "demo" / "report.png").is_file()
