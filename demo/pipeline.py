"""The demo's stages: data -> teacher -> tokenizer -> init -> pretokenize -> training -> evaluation.

Each stage calls one library function (the same one its `mllm` command calls; the equivalent command
line is printed and kept in the report so any stage can be rerun by hand) and writes under DIR. A stage
whose marker file exists is complete and skipped; training stages resume from their last checkpoint; so
a killed demo continues where it stopped when the same `mllm demo` command runs again.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from demo.plans import OTHER_LOOK_TOKENIZER, OTHER_LOOK_VQA, OTHER_SIZE_VQA, Plan, model_dir
from demo.report import ablation_table, write_report
from eval import runner
from eval.runner import EvalSettings
from mllm import init as model_init
from mllm import merge
from mllm.chat_threshold import DEFAULT_SCENES as DEFAULT_THRESHOLD_SCENES
from mllm.config import MLLMConfig
from mllm.data import pretokenize, shapes
from mllm.data.shapes_tasks import EDIT_OPERATIONS
from training import recipes


@dataclass(frozen=True)
class Stage:
    name: str
    marker: Path  # the file whose presence marks the stage complete
    command: str  # the equivalent `mllm` command line (printed, and reproducible by hand)
    action: Callable[[], Any]


def llm_data(out: Path, plan: Plan) -> Path:
    """The LLM's training data: data/train-llm (the scenes, some resized with `resized_share`, plus the edit
    and pair records with `tasks`) or, with neither, data/train (the teacher's and tokenizer's scenes)."""
    return out / "data" / ("train-llm" if plan.resized_share > 0 or plan.tasks else "train")


def other_size_test(out: Path, plan: Plan) -> Path:
    return out / "data" / f"test-{plan.other_size}px"


def tokenizer_train(out: Path, plan: Plan) -> Path:
    """The teacher's and the tokenizer's training scenes: data/train, or the same scenes drawn in the
    tokenizer's own look (`Plan.tokenizer_look`), data/train-<look>."""
    if not plan.tokenizer_look or plan.tokenizer_look == plan.look:
        return out / "data" / "train"
    return out / "data" / f"train-{plan.tokenizer_look}"


def other_look_test(out: Path) -> Path:
    """The test scenes drawn by the held-out rasteriser."""
    return out / "data" / "test-other-look"


def _sets(overrides: tuple[str, ...] | list[str]) -> str:
    return f" --set {' '.join(overrides)}" if overrides else ""


# ---------------------------------------------------------------------------------------- stage builders
def _data(name: str, out: Path, n: int, size: int, split: str = "train", resized_share: float = 0.0,
          look: str = "exact", tasks: bool = False) -> Stage:
    share = f" --resized-share {resized_share}" if resized_share else ""
    extra = (f" --look {look}" if look != "exact" else "") + (" --tasks" if tasks else "")
    command = f"mllm data shapes --out {out} --n {n} --size {size} --split {split}{share}{extra} --overwrite"
    return Stage(name, out / "index.json", command,
                 lambda: shapes.write_shapes_data(out, n, size=size, split=split, resized_share=resized_share,
                                                  overwrite=True, look=look, tasks=tasks))


def _train(name: str, marker: Path, command: str, recipe: str, paths: dict[str, Path | str], max_steps: int,
           overrides: tuple[str, ...] = (), resume: bool = True) -> Stage:
    """A training stage: `recipe` with the command's path options (`--data D` is the override `data=D`),
    `key=value` overrides, `max_steps` steps, resuming by default."""
    options = " ".join(f"--{key} {value}" for key, value in paths.items())
    settings = [f"{key}={value}" for key, value in paths.items()] + list(overrides)
    return Stage(name, marker, f"mllm {command} --recipe {recipe} {options} --max-steps {max_steps}"
                 f"{' --resume' if resume else ''}{_sets(overrides)}",
                 lambda: recipes.run_recipe(recipe, settings, resume=resume, max_steps=max_steps))


def _init(name: str, plan: Plan, tokenizer: Path, out: Path, embedding: str = "learned") -> Stage:
    def action() -> None:
        model_init.init_model(plan.llm, str(tokenizer), str(out), embedding=embedding, overwrite=True)
        print(model_init.describe_model(out))

    return Stage(name, out / "mllm_config.json",
                 f"mllm init --llm {plan.llm} --vision-tokenizer {tokenizer} --out {out} --embedding {embedding} "
                 "--overwrite", action)


def _eval(name: str, suite: str, model: Path, out: Path, data: Path | None = None, limit: int | None = None,
          options: dict[str, str] | None = None) -> Stage:
    settings = EvalSettings(suite=suite, out=str(out), model=str(model), data=None if data is None else str(data),
                            limit=limit, options=dict(options or {}))
    command = (f"mllm eval --model {model} --suite {suite} --out {out}"
               + (f" --data {data}" if data is not None else "") + (f" --limit {limit}" if limit else "")
               + (f" --option {' '.join(f'{k}={v}' for k, v in settings.options.items())}" if options else ""))
    return Stage(name, out / "results.json", command, lambda: runner.evaluate(settings))


def _set_edit_guidance(model_folder: Path, scale: float | None) -> None:
    """A model folder's default edit guidance scale (`edit_guidance_scale` in its mllm_config.json); None
    leaves it."""
    if scale is not None:
        config = MLLMConfig.load(model_folder)
        config.edit_guidance_scale = scale
        config.save(model_folder)


def _chat_threshold(model_folder: Path, out: Path, plan: Plan) -> Stage:
    """`mllm chat-threshold`: the model's chat image threshold, measured on scenes it never trained on and
    written into its mllm_config.json; the figures in out/results.json (the marker)."""
    results = out / "results.json"
    scenes = min(DEFAULT_THRESHOLD_SCENES, plan.test_scenes)

    def measure() -> None:
        from mllm.chat_threshold import calibrate

        figures = calibrate(model_folder, scenes=scenes, look=plan.look, out=results)
        print(f"chat_image_threshold = {figures['threshold']}: edits sent image first that start an image "
              f"{figures['edits_starting_an_image_plain']}% -> {figures['edits_starting_an_image']}%, questions "
              f"{figures['questions_starting_an_image_plain']}% -> {figures['questions_starting_an_image']}%")

    return Stage("chat threshold", results, f"mllm chat-threshold --model {model_folder} --look {plan.look} "
                 f"--scenes {scenes} --out {results}", measure)


def _copy_model(name: str, source: Path, target: Path, edit_guidance_scale: float | None = None) -> Stage:
    """Copy a finished model folder to `target` through a temp folder, so a killed copy leaves no half
    folder that looks complete; `edit_guidance_scale` (if given) becomes the copy's default for edits."""

    def copy() -> None:
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        _set_edit_guidance(partial, edit_guidance_scale)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        print(f"copied {source} -> {target}")

    return Stage(name, target / "mllm_config.json", f"cp -r {source} {target}", copy)


def _encoder_tuning(model: Path, plan: Plan) -> Stage:
    """The finished model's tokenizer encoder taught to read objects anywhere in their cell (in place; the
    figures file it writes last marks the stage done), on at most the plan's numbers of scenes."""
    from training.tune_encoder import RESULT_NAME, EncoderTuneConfig, MarginTooWide, tune_encoder

    defaults = EncoderTuneConfig()
    steps = plan.encoder_tuning_steps
    cfg = EncoderTuneConfig(steps=steps, scenes=min(defaults.scenes, plan.train_scenes),
                            check_scenes=min(defaults.check_scenes, plan.test_scenes))

    def tune() -> None:
        try:
            figures = tune_encoder(model, cfg)
        except MarginTooWide as exn:  # a plan cut to a few minutes: its tokenizer holds the contents close
            print(f"note: {exn}; tuning with the tokenizer's own margin (--preference-margin 0)")
            figures = tune_encoder(model, replace(cfg, preference_margin=None))
        print(f"tokenizer judge agreement, objects anywhere in the cell: {figures['anywhere_judge_agreement_before']}%"
              f" -> {figures['anywhere_judge_agreement']}%; exact renders' codes kept: {figures['exact_codes_kept']}%")

    return Stage("encoder tuning", model / "vision_tokenizer" / RESULT_NAME,
                 f"mllm tune-encoder --model {model} --steps {steps} --scenes {cfg.scenes} --check-scenes {cfg.check_scenes}",
                 tune)


def _pretrain_recipe(plan: Plan) -> str:
    """The full-model recipe of the pretrain and finish stages: with editing and two-image tasks or without."""
    return "shapes-pretrain-tasks" if plan.tasks else "shapes-pretrain"


def _model_chain(prefix: str, root: Path, out: Path, plan: Plan, codes: Path,
                 tokenizer_options: dict[str, Path | str]) -> list[Stage]:
    """tokenizer -> its metrics -> init -> pretokenize -> shapes-pretrain, under `root` (stage names prefixed)."""
    data, test = tokenizer_train(out, plan), out / "data" / "test"
    tokenizer = root / "tokenizer"
    source = llm_data(out, plan)
    paired = (f"paired_data={out / 'data' / 'train'}",) if data != out / "data" / "train" else ()
    return [
        _train(f"{prefix}tokenizer", tokenizer / "model.safetensors", "train-tokenizer", "tokenizer-shapes",
               {"data": data, "out": tokenizer, **tokenizer_options}, plan.tokenizer_steps,
               (*plan.tokenizer_overrides, *paired)),
        _eval(f"{prefix}tokenizer metrics", "tokenizer", tokenizer, root / "eval" / "tokenizer", data=test),
        _init(f"{prefix}init", plan, tokenizer, root / "init"),
        Stage(f"{prefix}pretokenize", codes / "index.json",
              f"mllm pretokenize --data {source} --vision-tokenizer {tokenizer} --out {codes}",
              lambda: pretokenize.pretokenize(source, tokenizer, codes)),
        _train(f"{prefix}pretrain", root / "pretrain" / "model" / "mllm_config.json", "train", _pretrain_recipe(plan),
               {"model": root / "init", "data": codes, "out": root / "pretrain"}, plan.pretrain_steps,
               plan.llm_overrides),
    ]


def _evals(prefix: str, model: Path, root: Path, out: Path, plan: Plan, suites: tuple[str, ...]) -> list[Stage]:
    """One stage per evaluation suite of `model`, results under root/eval/<suite>."""
    test = out / "data" / "test"
    look = {"look": plan.look}
    edit_per_operation = max(1, math.ceil(plan.edit_items / len(EDIT_OPERATIONS)))
    evals = {
        "shapes-edit": lambda name, folder: _eval(name, "shapes-edit", model, folder, limit=plan.edit_items,
                                                  options={**look, "per_operation": str(edit_per_operation)}),
        "shapes-multi": lambda name, folder: _eval(name, "shapes-multi", model, folder, limit=plan.multi_items,
                                                   options=look),
        OTHER_LOOK_VQA: lambda name, folder: _eval(name, "shapes-vqa", model, folder, other_look_test(out),
                                                   plan.vqa_items),
        "shapes-vqa": lambda name, folder: _eval(name, "shapes-vqa", model, folder, test, plan.vqa_items),
        "shapes-caption": lambda name, folder: _eval(name, "shapes-caption", model, folder, test, plan.caption_items),
        "shapes-t2i": lambda name, folder: _eval(name, "shapes-t2i", model, folder, limit=plan.t2i_prompts,
                                                 options={"seeds": str(plan.t2i_seeds)}),
    }
    if plan.other_size:  # the VQA questions again, on the same scenes rendered at the other size
        evals[OTHER_SIZE_VQA] = lambda name, folder: _eval(name, "shapes-vqa", model, folder,
                                                           other_size_test(out, plan), plan.vqa_items)
    return [evals[suite](f"{prefix}eval {suite}", root / "eval" / suite) for suite in suites if suite in evals]


def stages(out: Path, plan: Plan) -> list[Stage]:
    """The demo's stages, in order."""
    data, test, codes = out / "data" / "train", out / "data" / "test", out / "data" / "train-codes"
    pretrained = out / "pretrain" / "model"
    continued = []  # the stages that train the pretrained model further
    if plan.focus_steps:
        continued.append(_train("focus", out / "focus" / "model" / "mllm_config.json", "train", _pretrain_recipe(plan),
                                {"model": pretrained, "data": codes, "out": out / "focus"}, plan.focus_steps,
                                plan.focus_overrides))
        pretrained = out / "focus" / "model"
    if plan.finish_steps:
        continued.append(_train("finish", out / "finish" / "model" / "mllm_config.json", "train", _pretrain_recipe(plan),
                                  {"model": pretrained, "data": codes, "out": out / "finish"}, plan.finish_steps,
                                  plan.finish_overrides))
        pretrained = out / "finish" / "model"
    if plan.sft_steps:
        model = [
            _train("sft", out / "sft" / "adapter" / "adapter_config.json", "train", "shapes-sft",
                   {"model": pretrained, "data": codes, "out": out / "sft"}, plan.sft_steps, plan.llm_overrides),
            Stage("merge", out / "model" / "mllm_config.json",
                  f"mllm merge --base {pretrained} --adapter {out / 'sft' / 'adapter'} --out {out / 'model'}",
                  lambda: (merge.merge_adapter(pretrained, out / "sft" / "adapter", out / "model", dtype="auto"),
                           _set_edit_guidance(out / "model", plan.edit_guidance_scale))),
        ]
    else:
        model = [_copy_model("model", pretrained, out / "model", plan.edit_guidance_scale)]
    mixed = ([_data("LLM data", llm_data(out, plan), plan.train_scenes, plan.image_size,
                    resized_share=plan.resized_share, look=plan.look, tasks=plan.tasks)]
             if plan.resized_share > 0 or plan.tasks else [])
    other_test = ([_data("test data, other size", other_size_test(out, plan), plan.test_scenes, plan.other_size,
                         split="test", look=plan.look)] if plan.other_size else [])
    tokenizer_data = tokenizer_train(out, plan)
    paired = ([_data(f"data, {plan.tokenizer_look} look", tokenizer_data, plan.train_scenes, plan.image_size,
                     look=plan.tokenizer_look)] if tokenizer_data != data else [])
    teacher = out / "teacher"
    return [
        _data("data", data, plan.train_scenes, plan.image_size, look=plan.look),
        *paired,
        *mixed,
        _data("test data", test, plan.test_scenes, plan.image_size, split="test", look=plan.look),
        *other_test,
        _data("test data, held-out rasteriser", other_look_test(out), plan.test_scenes, plan.image_size,
              split="test", look="other"),
        _train("teacher", teacher / "model.safetensors", "train-teacher", "teacher-shapes",
               {"data": tokenizer_data, "out": teacher}, plan.teacher_steps, plan.teacher_overrides, resume=False),
        *_model_chain("", out, out, plan, codes, {"teacher": teacher}),
        _eval("tokenizer metrics, held-out rasteriser", "tokenizer", out / "tokenizer",
              out / "eval" / OTHER_LOOK_TOKENIZER, data=other_look_test(out)),
        *continued,
        *model,
        *([_encoder_tuning(model_dir(out, plan), plan)] if plan.encoder_tuning_steps else []),
        *([_chat_threshold(model_dir(out, plan), out / "eval" / "chat-threshold", plan)] if plan.chat_threshold else []),
        *_evals("", model_dir(out, plan), out, out, plan,
                ("shapes-vqa", "shapes-caption", "shapes-t2i", OTHER_SIZE_VQA, "shapes-edit", "shapes-multi",
                 OTHER_LOOK_VQA)),
    ]


def ablation_stages(out: Path, plan: Plan) -> list[Stage]:
    """The paper claims in miniature, after the demo (reusing its data, teacher and dual tokenizer):

    (a) TokenFlow: a pixel-only tokenizer (one codebook, the same K and code grid, the same steps) and a
        model trained on its codes with the demo's recipe and steps (its finish stage too), against the demo's
        dual-codebook model.
    (b) ETT: from one codebook-mode init of the dual tokenizer, `shapes-ett` for `ett_steps` with the
        tokenizer tuned end to end, and the same with it frozen (`ett.train_tokenizer=false`).
    """
    data, test = out / "data" / "train", out / "data" / "test"
    ab = out / "ablations"
    pixel, init = ab / "pixel", ab / "codebook-init"

    def ett(name: str, folder: Path, overrides: tuple[str, ...] = ()) -> Stage:
        return _train(name, folder / "model" / "mllm_config.json", "train", "shapes-ett",
                      {"model": init, "data": data, "out": folder}, plan.ett_steps, (*overrides, *plan.llm_overrides))

    pixel_model, finish = pixel / "pretrain" / "model", []
    if plan.finish_steps:  # the demo's model had its finish stage: so does the pixel-only one
        finish = [_train("pixel-only finish", pixel / "finish" / "model" / "mllm_config.json", "train",
                         _pretrain_recipe(plan), {"model": pixel_model, "data": pixel / "train-codes",
                                                  "out": pixel / "finish"}, plan.finish_steps, plan.finish_overrides)]
        pixel_model = pixel / "finish" / "model"
    return [
        *_model_chain("pixel-only ", pixel, out, plan, pixel / "train-codes", {"quantizer": "pixel"}),
        *finish,
        *_evals("pixel-only ", pixel_model, pixel, out, plan, ("shapes-vqa", "shapes-t2i")),
        _init("codebook-mode init", plan, out / "tokenizer", init, embedding="codebook"),
        ett("ETT", ab / "ett"),
        ett("frozen tokenizer", ab / "frozen", ("ett.train_tokenizer=false",)),
        *_evals("ETT ", ab / "ett" / "model", ab / "ett", out, plan, ("shapes-vqa", "shapes-caption")),
        _eval("ETT tokenizer metrics", "tokenizer", ab / "ett" / "model" / "vision_tokenizer",
              ab / "ett" / "eval" / "tokenizer", data=test),
        *_evals("frozen ", ab / "frozen" / "model", ab / "frozen", out, plan, ("shapes-vqa", "shapes-caption")),
    ]


# ---------------------------------------------------------------------------------------- running
def run_stages(out: Path, todo: list[Stage]) -> dict[str, float]:
    """Run the stages whose marker file is missing, in order; wall times go to DIR/stages.json."""
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "stages.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    for index, stage in enumerate(todo, 1):
        if stage.marker.is_file():
            print(f"== [{index}/{len(todo)}] {stage.name}: done ({stage.marker.relative_to(out)})", flush=True)
            continue
        print(f"== [{index}/{len(todo)}] {stage.name}: {stage.command}", flush=True)
        stage_start = time.time()
        stage.action()
        if not stage.marker.is_file():
            raise RuntimeError(f"stage {stage.name!r} finished without writing {stage.marker}")
        timings[stage.name] = round(time.time() - stage_start, 1)
        timings_file.write_text(json.dumps(timings, indent=2) + "\n")
    return timings


def run_demo(out: Path, plan: Plan) -> dict[str, Any]:
    started = time.time()
    if plan.purpose:
        print(f"{plan.purpose}\n", flush=True)
    todo = stages(out, plan)
    timings = run_stages(out, todo)
    report = write_report(out, plan, timings, {stage.name: stage.command for stage in todo})
    print(f"\ndemo finished in {time.time() - started:.0f} s (this run); report: {out / 'report.md'}\n")
    print(report["summary"])
    print(f"chat with it:   mllm chat --model {model_dir(out, plan)}")
    print(f"serve it:       mllm serve --model {model_dir(out, plan)}   (web chat at http://127.0.0.1:8000/)")
    return report


def run_ablations(out: Path, plan: Plan) -> str:
    """The demo (if not complete), then the ablation stages; writes DIR/ablations.md and returns its table."""
    run_demo(out, plan)
    started = time.time()
    todo = ablation_stages(out, plan)
    timings = run_stages(out, todo)
    table = ablation_table(out, plan)
    ablation_seconds = sum(timings.get(stage.name, 0.0) for stage in todo)
    text = (f"# Ablations ({plan.llm} model)\n\n{table}\n\nAblation stages: {ablation_seconds / 60:.1f} minutes "
            f"of wall time on top of the demo (stage times in stages.json).\n")
    (out / "ablations.md").write_text(text)
    print(f"\nablations finished in {time.time() - started:.0f} s (this run); {out / 'ablations.md'}\n")
    print(table)
    return table


__all__ = ["Stage", "ablation_stages", "llm_data", "other_look_test", "other_size_test", "run_ablations", "run_demo", "run_stages",
           "stages"]
