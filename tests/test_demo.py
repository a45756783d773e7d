"""The demo pipeline: every stage on tiny sizes, resuming after an interrupted stage, and the report."""

import itertools
import json
import os
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


@pytest.fixture
def group_umask():
    """The process runs under umask 002 (a shared group's) inside the test."""
    previous = os.umask(0o002)
    yield 0o002
    os.umask(previous)


def modes(root: Path) -> dict[str, set[str]]:
    """{"dirs": {octal modes of the folders under root, root included}, "files": {... of the files}}."""
    found = {"dirs": {oct(root.stat().st_mode & 0o7777)}, "files": set()}
    for path in root.rglob("*"):
        if not path.is_symlink():
            found["dirs" if path.is_dir() else "files"].add(oct(path.stat().st_mode & 0o7777))
    return found


def test_tiny_demo_runs_every_stage_resumes_after_an_interruption_and_reports(tmp_path, monkeypatch, capsys,
                                                                            group_umask):
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
    printed = capsys.readouterr().out
    # The rerun starts at the interrupted stage: nothing before it runs again.
    assert _stages_run(printed) == [
        "sft", "merge", "encoder tuning", "chat threshold", "eval shapes-vqa", "eval shapes-caption", "eval shapes-t2i", "eval shapes-vqa-other-size",
        "eval shapes-edit", "eval shapes-multi", f"eval {demo.OTHER_LOOK_VQA}"]
    for stage in demo.stages(out, plan):
        assert stage.marker.is_file(), stage.name
    # The tokenizer trained on the scenes at their own size, the LLM on the mixed set (some scenes rendered at
    # other sizes and resized, each followed by its edit and pair records), whose codes the pretrain stage read.
    import webdataset as wds

    mixed = [json.loads(r["json"]) for r in wds.WebDataset(str(out / "data" / "train-llm" / "shard-000000.tar"),
                                                           shardshuffle=False)]
    exact = [json.loads(r["json"]) for r in wds.WebDataset(str(out / "data" / "train" / "shard-000000.tar"),
                                                           shardshuffle=False)]
    assert not any("rendered_size" in r for r in exact) and 0 < sum("rendered_size" in r for r in mixed) < len(mixed)
    assert all(r.get("look", "exact") == plan.look for r in exact + mixed)
    assert len(mixed) == 3 * len(exact) and sum("edit" in r for r in mixed) == len(exact)
    # The teacher and the tokenizer learned the exact renders of the same scenes, the tokenizer with the
    # plan's own (varied) renders as paired inputs.
    assert plan.look == "varied" and plan.tokenizer_look == "exact"
    targets = [json.loads(r["json"]) for r in wds.WebDataset(
        str(out / "data" / "train-exact" / "shard-000000.tar"), shardshuffle=False)]
    assert [r["scene"] for r in targets] == [r["scene"] for r in exact] and not any("look" in r for r in targets)
    import yaml

    recipe = yaml.safe_load((out / "tokenizer" / "train_recipe.yaml").read_text())
    assert recipe["data"] == str(out / "data" / "train-exact") and recipe["paired_data"] == str(out / "data" / "train")
    assert recipe["paired_share"] == 0.5
    codes = [json.loads(r["json"]) for r in wds.WebDataset(str(out / "data" / "train-codes" / "shard-000000.tar"),
                                                           shardshuffle=False)]
    assert [r.get("rendered_size") for r in codes] == [r.get("rendered_size") for r in mixed]
    # VQA also ran on the test scenes rendered at the other size, and the report shows it.
    other = json.loads((out / "eval" / demo.OTHER_SIZE_VQA / "results.json").read_text())
    assert other["data"].endswith(f"test-{plan.other_size}px") and other["count"] == plan.vqa_items
    # Editing, questions over two images and the held-out rasteriser's scenes were evaluated too.
    edit = json.loads((out / "eval" / "shapes-edit" / "results.json").read_text())
    assert edit["count"] == plan.edit_items and (out / "eval" / "shapes-edit" / "examples.png").is_file()
    # The model's tokenizer encoder was tuned to objects anywhere in their cell, on the plan's scenes, and the
    # report shows its figures.
    tuning = json.loads((out / "model" / "vision_tokenizer" / "encoder_tuning.json").read_text())
    assert tuning["config"]["steps"] == plan.encoder_tuning_steps and tuning["config"]["scenes"] == plan.train_scenes
    assert (f"| tokenizer judge agreement, objects anywhere in their cell, after encoder tuning (%) | "
            f"{tuning['anywhere_judge_agreement']:.2f} |") in (out / "report.md").read_text()
    multi = json.loads((out / "eval" / "shapes-multi" / "results.json").read_text())
    assert multi["count"] == plan.multi_items
    held_out = json.loads((out / "eval" / demo.OTHER_LOOK_VQA / "results.json").read_text())
    assert held_out["data"].endswith("test-other-look")
    assert (out / "eval" / demo.OTHER_LOOK_TOKENIZER / "results.json").is_file()
    # The chat image threshold was measured on the model and written into its config (the tiny model's
    # chances are whatever an untrained model gives: the value is the rule's, checked in test_chat_threshold).
    from mllm.config import MLLMConfig

    chat = json.loads((out / "eval" / "chat-threshold" / "results.json").read_text())
    assert chat["scenes"] == plan.test_scenes and chat["look"] == plan.look
    assert MLLMConfig.load(out / "model").chat_image_threshold == chat["threshold"]
    text = (out / "report.md").read_text()
    assert "chat: edits sent image first that start an image" in text
    assert f"rendered at {plan.other_size} px" in text and "eval/shapes-edit/examples.png" in text
    # the report says how to rerun every stage by hand
    assert "mllm train --recipe shapes-sft" in text and "mllm eval --model" in text
    for _, _, minimum, label in demo.BARS:
        assert label in text and f">= {minimum:.0f}%" in text
    from PIL import Image

    sheet = Image.open(out / "report.png")
    assert sheet.width == 960 and sheet.height > 400  # four panels: scenes, drawings, tokenizer, loss curves
    # the tiny size is a plumbing check: said first, in the report and in what the command prints; no bar
    # is judged
    assert set(report["passed"]) == {label for *_, label in demo.BARS}
    assert set(report["passed"].values()) == {None} and "MISS" not in text
    assert text.splitlines()[2] == f"> {plan.purpose}" and "plumbing check" in plan.purpose
    assert printed.startswith(plan.purpose) and report["summary"] in printed
    assert report["summary"].startswith(plan.purpose)
    # every folder and file of the run has the mode the umask (002) gives, the weights included
    assert modes(out) == {"dirs": {"0o775"}, "files": {"0o664"}}


def test_the_long_plan_is_the_six_by_six_plan_with_twice_the_models_steps():
    base, long = demo.PLANS["shapes-6x6"], demo.PLANS["shapes-long"]
    assert long.pretrain_steps == 2 * base.pretrain_steps
    assert replace(long, pretrain_steps=base.pretrain_steps, minutes=base.minutes) == base


def test_the_half_plan_is_the_cells_edit_plan_with_half_its_pretraining():
    """shapes-half: shapes-cells-edit's tokenizer, mixture, finish stage and chat threshold, with
    2000 pretraining steps instead of 4000, then 600 steps of "What changed" questions alone (the focus stage),
    and in the finish moves drawn three times as often and the change questions also alone
    (docs/experiments.md, sections 31-32 and 35)."""
    half, edit = demo.PLANS["shapes-half"], demo.PLANS["shapes-cells-edit"]
    # the demo's default is the same plan with shapes-cells-edit's 4000 pretraining steps
    assert replace(demo.PLANS["shapes"], pretrain_steps=2000, minutes=half.minutes) == half
    assert (half.pretrain_steps, half.finish_steps, edit.pretrain_steps) == (2000, 1000, 4000)
    assert half.finish_overrides == (*edit.finish_overrides, "edit_operations.move=3", "multi_types.change=0.75")
    assert half.encoder_tuning_steps == 300 and edit.encoder_tuning_steps == 0
    assert (half.focus_steps, edit.focus_steps) == (600, 0)
    assert replace(half, pretrain_steps=edit.pretrain_steps, minutes=edit.minutes, encoder_tuning_steps=0,
                   finish_overrides=edit.finish_overrides, focus_steps=0, focus_overrides=()) == edit
    # the focus stage trains the change questions alone, between pretraining and finish
    from training.components import mixture_weights
    from training.recipes import load_recipe

    _, focus = load_recipe("shapes-pretrain-tasks", ["data=d", "out=o", *half.focus_overrides])
    assert {pool: weight for pool, weight in mixture_weights(focus).items() if weight > 0} == {"multi/change": 1}
    assert focus.learning_rate == 4e-4
    names = [stage.name for stage in demo.stages(Path("out"), half)]
    assert names.index("pretrain") < names.index("focus") < names.index("finish") < names.index("model")
    stages = {stage.name: stage for stage in demo.stages(Path("out"), half)}
    assert "--model out/pretrain/model" in stages["focus"].command and "--max-steps 600" in stages["focus"].command
    assert "--model out/focus/model" in stages["finish"].command
    assert "focus" not in [stage.name for stage in demo.stages(Path("out"), edit)]
    assert demo.scaled(half, half.minutes / 2).focus_steps == 300
    assert half.chat_threshold and half.edit_guidance_scale == 1.0 and "edit_image_first=0" in half.llm_overrides
    import argparse

    from mllm.commands.demo import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).size == "shapes" and set(parser._option_string_actions["--size"].choices) == set(
        demo.PLANS)


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
    # the encoder is tuned after the model is whole and before anything measures it
    assert names.index("model") < names.index("encoder tuning") < names.index("chat threshold")
    assert plan.encoder_tuning_steps == round(base.encoder_tuning_steps / 2)


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


# ------------------------------------------------------------------------------ the report, without a run
def _finished_run(out: Path, caption: str, answer: str) -> list[dict]:
    """What a demo run leaves for its report: held-out scenes, predictions (`caption` for every scene,
    `answer` to the first scene's first question only, as a --limit cuts the VQA run), results, loss logs."""
    from mllm.data import shapes
    from mllm.data.shards import DataStats, read_records

    shapes.write_shapes_data(out / "data" / "test", 3, size=32, split="test", progress=False)
    records = list(read_records(str(out / "data" / "test"), stats=DataStats(), split=False))
    write = lambda path, rows: (path.parent.mkdir(parents=True, exist_ok=True),
                                path.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    write(out / "eval/shapes-caption/predictions.jsonl", [{"id": r["key"], "answer": caption} for r in records])
    write(out / "eval/shapes-vqa/predictions.jsonl", [{"id": f"{records[0]['key']}-0", "answer": answer}])
    values = {"eval/shapes-vqa": {"accuracy": 95.0}, "eval/shapes-caption": {"objects_right": 10.0},
              "eval/shapes-t2i": {"accuracy_single_object": 80.0, "accuracy_position": 59.9},
              "eval/tokenizer": {"judge_agreement": 100.0}}
    for folder, metrics in values.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / "results.json").write_text(json.dumps({"metrics": metrics}))
    write(out / "pretrain/metrics.jsonl", [{"step": s, "loss": 6.5 - 0.1 * s} for s in range(1, 5)])
    write(out / "sft/metrics.jsonl", [{"step": s, "loss": 6.0 - 0.05 * s} for s in range(1, 4)])
    return records


def test_the_tiny_report_says_it_is_a_plumbing_check_and_judges_no_bar(tmp_path):
    out, plan = tmp_path / "run", demo.PLANS["tiny"]
    records = _finished_run(out, caption="", answer="  ")
    report = demo.write_report(out, plan, {"data": 1.0})
    text = (out / "report.md").read_text()
    head = text.split("## Results")[0]
    assert "plumbing check" in head and "not applicable at this size" in head and report["summary"].startswith(
        plan.purpose)
    assert "MISS" not in text and "| pass |" not in text
    for _, _, minimum, label in demo.BARS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert row.endswith("| not applicable at this size |") and f">= {minimum:.0f}%" in row
    assert report["passed"] == {label: None for *_, label in demo.BARS}
    # empty and whitespace-only replies read "(empty)", next to the right ones
    first = records[0]["json"]
    assert f"| {records[0]['key']} | (empty) | {first['caption']} |" in text
    assert f"| {first['qa'][0]['question']} | (empty) | {first['qa'][0]['answer']} |" in text
    assert (out / "report.png").is_file()


def test_the_shapes_report_keeps_its_bars(tmp_path):
    out, plan = tmp_path / "run", demo.PLANS["shapes"]
    _finished_run(out, caption="a small red circle at the top", answer="2")
    report = demo.write_report(out, plan, {"data": 1.0})
    text = (out / "report.md").read_text()
    assert "plumbing check" not in text and "not applicable" not in text and not plan.purpose
    expected = {"VQA accuracy (shapes-vqa)": True, "caption: every object's colour, shape and position right": False,
                "drawing 'a {colour} {shape}' judged correct": True, "drawing '... at the <position>' judged correct":
                False, "tokenizer: judge agreement original vs reconstruction": True}
    # The bars of editing, questions over two images and the held-out rasteriser: this run has no results for
    # them, and a missing figure is a miss.
    expected |= {label: False for *_, label in demo.BARS[5:]}
    assert report["passed"] == expected and report["summary"] == report["table"]
    for _, _, minimum, label in demo.BARS:
        verdict = "pass" if expected[label] else "MISS"
        assert any(line.startswith(f"| {label} |") and line.endswith(f"| >= {minimum:.0f}% | {verdict} |")
                   for line in text.splitlines()), label
    assert "| a small red circle at the top |" in text and "| 2 |" in text
    # the environment the figures belong to: the CPU's kernels and the packages' versions, in the report and
    # in environment.json
    import torch
    import transformers

    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    assert env["cpu kernels (torch)"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]
    environment = text.split("## Environment")[1]
    assert f"| torch | {torch.__version__} |" in environment and f"| numpy | {env['numpy']} |" in environment


def test_the_report_picture_shows_empty_replies_and_what_was_not_asked():
    from demo.report import EMPTY, _scene_lines, shown

    assert shown("") == shown(" \n\t") == shown(None) == EMPTY and shown(" two  words\n") == "two words"
    sample = {"caption": "", "question": "How many objects are there?", "answer": " ", "truth": "2"}
    lines = _scene_lines(sample)
    assert lines[0] == "caption: (empty)" and "A: (empty)" in lines and lines[-1] == "right: 2"
    assert any(line.startswith("Q: How many") for line in lines)
    not_asked = _scene_lines({**sample, "caption": "a red circle", "answer": None})
    assert not_asked[0] == "caption: a red circle" and "right: 2" not in not_asked
    assert "(not among this" in " ".join(not_asked)
    rambling = _scene_lines({**sample, "answer": "and then " * 30})
    assert len(rambling) == len(lines) + 1 and any(line.startswith("A: and then") for line in rambling)
    assert any(line.endswith("...") for line in rambling)  # cut, and shown to be cut


def test_the_loss_plot_has_step_and_loss_axes():
    from demo.report import _plot, ticks

    for low, high, integer in ((6.12, 6.43, False), (0.0, 7.0, True), (0.0, 2000.0, True), (0.8, 9.3, False)):
        values = ticks(low, high, 6, integer=integer)
        gaps = {round(b - a, 9) for a, b in itertools.pairwise(values)}
        assert len(values) >= 3 and low <= values[0] and values[-1] <= high and len(gaps) == 1, values
        assert not integer or all(v == int(v) for v in values)
    image = _plot({"pretrain": [(1, 6.4), (2, 6.3), (3, 6.2)], "sft": [(1, 6.1), (2, 6.15)]}, 960, 260)
    dark = lambda box: any(sum(pixel) < 200 for pixel in image.crop(box).getdata())
    left, bottom = 70, 260 - 42
    assert dark((left, bottom + 6, 960, bottom + 18))  # step tick labels under the plot
    assert dark((0, 12, left - 8, bottom))  # loss tick labels left of it
    assert dark((0, bottom + 20, 960, 260))  # the step axis's name


def test_a_tokenizer_look_renders_the_training_scenes_again_for_the_teacher_and_the_tokenizer():
    base = replace(demo.PLANS["shapes"], look="varied", tokenizer_look="", tokenizer_overrides=("rescale_share=0.5",))
    paired = replace(base, tokenizer_look="exact", tokenizer_overrides=("rescale_share=0.5", "paired_share=0.5"))
    out = Path("out")
    before, after = ({stage.name: stage for stage in demo.stages(out, plan)} for plan in (base, paired))
    assert set(after) - set(before) == {"data, exact look"}
    exact, varied = out / "data" / "train-exact", out / "data" / "train"
    data = after["data, exact look"]
    assert data.marker == exact / "index.json" and "--look" not in data.command
    assert "--look varied" in after["data"].command
    # the teacher and the tokenizer learn the exact renders; the tokenizer takes the varied ones as inputs
    assert f"--data {varied} " in before["tokenizer"].command and "paired_data" not in before["tokenizer"].command
    assert f"--data {exact} " in after["teacher"].command and f"--data {exact} " in after["tokenizer"].command
    assert f"paired_data={varied}" in after["tokenizer"].command and "paired_share=0.5" in after["tokenizer"].command
    # the LLM and the evaluations stay in the varied world
    assert f"--data {out / 'data' / 'train-llm'}" in after["pretokenize"].command
    assert after["test data"].command == before["test data"].command and "--look varied" in after["test data"].command
    names = list(after)
    assert names.index("data, exact look") < names.index("teacher") < names.index("tokenizer")
    # the same look twice is no pairing at all
    assert [s.command for s in demo.stages(out, replace(base, tokenizer_look="varied"))] == [
        s.command for s in demo.stages(out, base)]


def test_the_cells_plan_is_the_long_demo_with_one_code_a_cell():
    base, cells = demo.PLANS["shapes-long"], demo.PLANS["shapes-cells"]
    assert replace(cells, tokenizer_steps=base.tokenizer_steps, tokenizer_overrides=base.tokenizer_overrides,
                   minutes=base.minutes, edit_guidance_scale=base.edit_guidance_scale) == base
    assert cells.edit_guidance_scale == 1.0  # it edits best without guidance (docs/editing.md, "Measured")
    # its editing variant differs only in its model's training: every edit instruction first, and a mixture
    # with more edits and pairs
    edit = demo.PLANS["shapes-cells-edit"]
    assert replace(edit, llm_overrides=cells.llm_overrides, minutes=cells.minutes, finish_steps=0,
                   finish_overrides=(), chat_threshold=False) == cells
    assert edit.chat_threshold  # its model answers image-first edits in words without one
    edit_stages = {stage.name: stage for stage in demo.stages(Path("out"), edit)}
    pretrain = edit_stages["pretrain"]
    assert all(setting in pretrain.command for setting in edit.llm_overrides)
    from training.recipes import load_recipe

    _, config = load_recipe("shapes-pretrain-tasks", ["data=d", "out=o", *edit.llm_overrides])
    assert config.edit_image_first == 0
    assert config.tasks == {"caption": 0.75, "vqa": 1.5, "t2i": 0.75, "edit": 1.5, "multi": 0.75}
    # then the finish stage: the pretrained model, 1000 more steps with twice the pairs, becomes the model
    names = list(edit_stages)
    assert names.index("pretrain") < names.index("finish") < names.index("model")
    finish = edit_stages["finish"]
    assert "--model out/pretrain/model" in finish.command and "--max-steps 1000" in finish.command
    assert all(setting in finish.command for setting in edit.finish_overrides)
    _, config = load_recipe("shapes-pretrain-tasks", ["data=d", "out=o", *edit.finish_overrides])
    assert config.tasks["multi"] == 1.5 and config.learning_rate == 1e-4 and config.edit_image_first == 0
    assert "finish" not in [stage.name for stage in demo.stages(Path("out"), cells)]
    assert demo.scaled(edit, 70.0).finish_steps == 500
    tokenizer = {stage.name: stage for stage in demo.stages(Path("out"), cells)}["tokenizer"]
    assert "--max-steps 2400" in tokenizer.command and "tokenizer.local_context=0" in tokenizer.command
    from tokenizer_vision.config import TokenizerConfig
    from training.config import parse_overrides

    config = TokenizerConfig.from_name("shapes").replace(**parse_overrides(cells.tokenizer_overrides)["tokenizer"])
    assert config.grid_size == (3, 3) and config.codebook_size == 128  # one code a 16 px cell of the 3x3 grid


def test_a_plan_sets_its_models_edit_guidance_scale(tmp_path):
    """Plan.edit_guidance_scale becomes the demo model's default for edits (its mllm_config.json); None keeps
    the library's."""
    from mllm.config import EDIT_GUIDANCE_SCALE, MLLMConfig

    source = tmp_path / "pretrain" / "model"
    source.mkdir(parents=True)
    MLLMConfig(image_offset=10, codebook_size=8, grid_size=(2, 2), image_size=16, boi_token_id=1, eoi_token_id=2,
               image_token_id=3, end_of_turn_token_id=4, pad_token_id=0, vocab_size=64).save(source)
    (source / "weights.bin").write_bytes(b"w")
    for scale, expected in ((1.0, 1.0), (None, EDIT_GUIDANCE_SCALE)):
        out = tmp_path / f"out-{scale}"
        (out / "pretrain").mkdir(parents=True)
        (out / "pretrain" / "model").symlink_to(source)
        plan = replace(demo.PLANS["shapes-cells"], edit_guidance_scale=scale)
        stage = {stage.name: stage for stage in demo.stages(out, plan)}["model"]
        stage.action()
        assert MLLMConfig.load(out / "model").edit_guidance_scale == expected
        assert (out / "model" / "weights.bin").read_bytes() == b"w"
    assert MLLMConfig.load(source).edit_guidance_scale == EDIT_GUIDANCE_SCALE  # the source is left alone
    with pytest.raises(ValueError, match="edit_guidance_scale must be positive"):
        MLLMConfig(image_offset=10, codebook_size=8, grid_size=(2, 2), image_size=16, boi_token_id=1,
                   eoi_token_id=2, image_token_id=3, end_of_turn_token_id=4, pad_token_id=0, vocab_size=64,
                   edit_guidance_scale=0.0)


def test_every_plan_is_a_size_of_mllm_demo():
    import argparse

    from mllm.commands import demo as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    sizes = next(action.choices for action in parser._actions if action.dest == "size")
    assert set(sizes) == set(demo.PLANS)
    assert parser.parse_args(["--size", "shapes-cells"]).size == "shapes-cells"
