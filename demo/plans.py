"""What the demo trains and evaluates: the quality bars and the named plans.

The shapes plans render 48 px scenes, whose 3x3 cells are 16 px. The demo's tokenizer gives each cell one
code (16 px codes: 9 codes an image, and an object is one code); the `shapes-6x6` plans use 8 px codes, 2x2
a cell (36 codes an image). Either way every object lands on the code grid the same way in every cell.
Scenes of other sizes are resized on the way in. The unified model trains in full fine-tunes on captions,
VQA (several questions per image), drawing, editing and questions over two images (a pretrain stage and,
in the demo, a finish stage with another mixture); the LoRA sft stage + merge run instead of a plain copy
when a plan gives sft steps (the tiny plan does, to keep that path tested). The quality bars apply to the
shapes plans only: the tiny plan is a plumbing check whose models cannot learn. How the plans' numbers
were chosen is in docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from mllm.data.shapes_tasks import EDIT_OPERATIONS

OTHER_SIZE_VQA = "shapes-vqa-other-size"  # shapes-vqa on data/test-<other_size>px, results in eval/<this name>
# The held-out rasteriser (`render(..., look="other")`: PIL's, other sizes and offsets, never trained on): the
# test scenes drawn by it (data/test-other-look), through the tokenizer and as VQA, results in eval/<these>.
OTHER_LOOK_TOKENIZER = "tokenizer-other-look"
OTHER_LOOK_VQA = "shapes-vqa-other-look"

# The quality bars of the demo (held-out scenes): (results folder, metric, minimum, label).
BARS = (
    ("eval/shapes-vqa", "accuracy", 90.0, "VQA accuracy (shapes-vqa)"),
    ("eval/shapes-caption", "objects_right", 70.0, "caption: every object's colour, shape and position right"),
    ("eval/shapes-t2i", "accuracy_single_object", 80.0, "drawing 'a {colour} {shape}' judged correct"),
    ("eval/shapes-t2i", "accuracy_position", 60.0, "drawing '... at the <position>' judged correct"),
    ("eval/tokenizer", "judge_agreement", 95.0, "tokenizer: judge agreement original vs reconstruction"),
    ("eval/shapes-edit", "accuracy", 70.0, "editing: the output is exactly the target scene (shapes-edit)"),
    *(("eval/shapes-edit", f"accuracy_{operation}", 50.0, f"editing, {operation}") for operation in EDIT_OPERATIONS),
    ("eval/shapes-multi", "accuracy", 85.0, "questions over two images (shapes-multi)"),
    (f"eval/{OTHER_LOOK_TOKENIZER}", "judge_agreement", 95.0,
     "held-out rasteriser: tokenizer judge agreement"),
    (f"eval/{OTHER_LOOK_VQA}", "accuracy", 85.0, "held-out rasteriser: VQA accuracy"),
)


@dataclass(frozen=True)
class Plan:
    """What the demo trains and evaluates; `minutes` is the wall time (2 CPU cores) the plan is sized for."""

    llm: str = "shapes"  # a named size of `mllm init --llm`
    tokenizer: str = "shapes"  # a named tokenizer size
    image_size: int = 48
    # The look of every training and test scene the model sees (`mllm.data.shapes.render`): "exact" (fixed
    # sizes, centred, no noise) or "varied" (sizes from ranges, jittered positions, anti-aliasing on half,
    # slight noise: no two renders of an object alike). The held-out rasteriser ("other") is only evaluated on.
    # A tokenizer trained on varied scenes alone cannot hold them at 6x6 codes in this budget (77.5% judge
    # agreement, VQA 76%); with `tokenizer_look` below it learns to read them (docs/experiments.md, section 19).
    look: str = "exact"
    # The look the tokenizer reconstructs ("": `look`). When it differs from `look`, the training scenes are
    # also rendered in it (data/train-<it>, the same scenes); the teacher and the tokenizer train on those,
    # with the `look` renders (data/train) as paired inputs (`paired_data` of train-tokenizer; `paired_share`
    # in tokenizer_overrides): every rendering of a scene gets the codes of its render in this look, and the
    # tokenizer draws in this look.
    tokenizer_look: str = ""
    train_scenes: int = 20000
    # With `tasks`, each training scene also gives an edit record (the scene, one edit, the questions over the
    # two) and a pair record (the scene and an unrelated one, with their questions) to the LLM's data (`mllm
    # data shapes --tasks`), and the LLM trains with `shapes-pretrain-tasks` (editing and questions over two
    # images too) in the same steps. On in the shapes plan; with whole-image codes the new tasks cost VQA and
    # drawing with a position their bars while edits stayed rarely right (docs/experiments.md, section 15).
    tasks: bool = False
    # shapes-edit items, one edit each (100 per operation: with 50, an operation's accuracy moved by about 7
    # points from one sample of scenes to another; docs/experiments.md, section 32)
    edit_items: int = 600
    multi_items: int = 550  # shapes-multi questions (100 pairs)
    # Share of the LLM's training scenes rendered at other sizes and resized to image_size (`mllm data
    # shapes --resized-share`; the LLM then trains on data/train-mixed, the teacher and the tokenizer on
    # the exact renders of data/train). Off in the shapes plan: the tokenizer's rescale_share below
    # teaches reading resized scenes without taking training steps from the 48 px renders.
    resized_share: float = 0.0
    other_size: int = 64  # the VQA suite also runs on the test scenes rendered at this size (0: not)
    test_scenes: int = 1000
    teacher_steps: int = 250
    tokenizer_steps: int = 1000
    pretrain_steps: int = 2000
    # A second full-model stage ("finish"): the pretrained model trains `finish_steps` more steps of the same
    # recipe with `finish_overrides` instead of `llm_overrides` (another mixture, learning rate, data seed);
    # 0: none. Runs before sft, which then starts from the finished model.
    finish_steps: int = 0
    finish_overrides: tuple[str, ...] = ()
    # A full-model stage between pretraining and finish ("focus"): the same recipe with `focus_overrides` for
    # `focus_steps` steps, on one thing alone (0: none). The demo drills "What changed between the two images?"
    # there: a question learned only from many of it in a row (docs/experiments.md, section 35).
    focus_steps: int = 0
    focus_overrides: tuple[str, ...] = ()
    sft_steps: int = 0  # 0: no sft stage; the pretrain model is the demo's model
    ett_steps: int = 1000  # `--ablations`: each of the two shapes-ett runs (tokenizer tuned / frozen)
    vqa_items: int = 1000
    caption_items: int = 300
    t2i_prompts: int = 162
    t2i_seeds: int = 6  # drawings a prompt: fewer make the drawing figures noisy
    minutes: float = 20.0
    teacher_overrides: tuple[str, ...] = ("image_size=48",)
    # rescale_share: half of each tokenizer batch goes in after a round trip through another size, against
    # the clean image as the target, so the codes of a resized scene match the codes of a native render.
    tokenizer_overrides: tuple[str, ...] = ("tokenizer.image_size=48", "rescale_share=0.5")
    llm_overrides: tuple[str, ...] = ()
    # The demo model's edit guidance scale when a request names none (`edit_guidance_scale` in its
    # mllm_config.json): the best measured for the plan; None keeps the library's default (EDIT_GUIDANCE_SCALE).
    edit_guidance_scale: float | None = None
    # Whether the demo measures its model's chat image threshold (`mllm chat-threshold`, a stage after the
    # model is copied; `chat_image_threshold` in its mllm_config.json): for plans that train every edit
    # instruction first, whose models otherwise answer most edits sent image first (as chat clients send
    # them) in words (docs/editing.md, "Edits in chat").
    chat_threshold: bool = False
    # Steps of `mllm tune-encoder` on the finished model's tokenizer (0: none): its encoder alone learns to read
    # objects anywhere in their cell, codebooks and decoder unchanged, so the model's codes keep their meaning
    # (training/tune_encoder.py; docs/experiments.md, section 34).
    encoder_tuning_steps: int = 0
    # Whether the quality bars (BARS) apply: a plan whose models are too small to learn reports its figures
    # without judging them, so that a 0% reads as expected rather than as a failure.
    bars: bool = True
    # What the plan is for, said first in the report and in what `mllm demo` prints (empty: nothing to say).
    purpose: str = ""


TINY_PURPOSE = (
    "The tiny size is a plumbing check, not a model: it runs every stage of the demo (data, teacher, "
    "tokenizer, init, pretokenize, pretraining and its finish, LoRA sft and merge, the chat threshold, every "
    "evaluation) on tiny models for a few steps, to show that the whole pipeline runs on this machine. Its models are far too small and too briefly "
    "trained to learn anything: empty captions and answers and noise drawings are expected, and the quality "
    "bars are not applicable at this size. For a model that meets them, run the shapes size: "
    "`mllm demo --out runs/demo` (about 75 minutes on 2 CPU cores)."
)

# The focus stage's mixture: "What changed between the two images?" alone, one question an example
# (`multi_types`), at the pretraining's learning rate.
CHANGE_FOCUS = ("edit_image_first=0", "tasks.caption=0", "tasks.vqa=0", "tasks.t2i=0", "tasks.edit=0", "tasks.multi=0",
                "multi_types.change=1", "learning_rate=4e-4", "warmup_steps=20", "seed=2")

PLANS = {
    # Six by six codes: captions, VQA, drawing, editing and questions over two images in one decoder, in the
    # varied world (the demo until the one-code-a-cell plans edited better; editing 30.3%, two images 80.0%).
    # The tokenizer has local codes (`tokenizer.local_context`: each code is chosen from its own 8 px
    # patch and a 4 px margin, so what an edit leaves alone keeps its codes) and learns to give every
    # rendering of a scene the codes of its exact render (`tokenizer_look="exact"`, half of each batch in the
    # varied look): it reads scenes of a rasteriser it never saw (98% judge agreement against 46% for one
    # trained on exact renders alone). Among near-equal codes it prefers the common ones
    # (`tokenizer.code_preference_margin`), so a varied render gets its exact render's very codes (94% of them
    # against 18% by distance alone) and what the model writes is as predictable as in the exact world.
    # About 40 minutes on 2 cores (docs/demo.md, "Six by six codes").
    "shapes-6x6": Plan(tasks=True, look="varied", tokenizer_look="exact", minutes=40.0, tokenizer_overrides=(
        "tokenizer.image_size=48", "rescale_share=0.5", "tokenizer.local_context=4", "paired_share=0.5",
        "tokenizer.code_preference_margin=0.0005")),
    # `shapes-6x6` with twice the model's steps (4000): every figure rises (editing 42.0%, two images 84.5%, VQA
    # 97.7%), and the plan takes about an hour on 2 cores (docs/demo.md, "Twice the steps").
    "shapes-long": Plan(tasks=True, look="varied", tokenizer_look="exact", minutes=63.0, pretrain_steps=4000,
                        tokenizer_overrides=(
        "tokenizer.image_size=48", "rescale_share=0.5", "tokenizer.local_context=4", "paired_share=0.5",
        "tokenizer.code_preference_margin=0.0005")),
    # One code a cell: `shapes-long` (4000 model steps) with a 16x tokenizer (3 x 3 codes at 48 px, each code
    # the whole 16 px cell of the scene's grid, `local_context=0`), K = 128, 2400 tokenizer steps (it separates
    # the 37 cell contents only after about 1100). Every object is one code: the best edits of any plan that
    # edits in chat too (52.3% at its default edit guidance scale 1, no guidance; 49.0% at the library's 1.5;
    # 41.3% at 2000 model steps, where VQA sat on its bar), drawing with a position 97%, both tokenizer
    # agreements 100%, VQA 94.2%, captions and two-image questions below `shapes-long`'s (docs/experiments.md,
    # sections 24-27). Measured on a machine without bf16: about 115 minutes there.
    "shapes-cells": Plan(tasks=True, look="varied", tokenizer_look="exact", minutes=115.0, tokenizer_steps=2400,
                         pretrain_steps=4000, edit_guidance_scale=1.0, tokenizer_overrides=(
        "tokenizer.image_size=48", "rescale_share=0.5", "tokenizer.local_context=0", "paired_share=0.5",
        "tokenizer.code_preference_margin=0.0005", "tokenizer.channel_mult=[1,2,2,4,4]",
        "tokenizer.codebook_size=128", "tokenizer.ema_decay=0.95")),
    # The same in the exact world (every scene the exact render, a tokenizer of exact renders): it edits best
    # (41.7% against 30.3%) but reads the held-out rasteriser's scenes badly (docs/demo.md, "The exact world").
    "shapes-exact": Plan(tasks=True, minutes=37.0, tokenizer_overrides=(
        "tokenizer.image_size=48", "rescale_share=0.5", "tokenizer.local_context=4")),
    # The previous demo: no editing or two-image training, whole-image codes; about 20-25 minutes on 2 cores.
    # It meets the earlier bars (VQA, captions, drawing, tokenizer) only (docs/demo.md, "The plan").
    "shapes-lean": Plan(),
    # A plumbing check, not a model: every stage for real, on tiny models and a few scenes (about 15 s on 2 cores,
    # docs/demo.md). Its quality figures are meaningless: no bars.
    "tiny": Plan(llm="tiny", tokenizer="tiny", image_size=32, train_scenes=96, test_scenes=12, teacher_steps=4,
                 resized_share=0.5, tokenizer_steps=4, pretrain_steps=4, sft_steps=3, ett_steps=2, vqa_items=12,
                 caption_items=6, t2i_prompts=5, t2i_seeds=1, tasks=True, edit_items=6, multi_items=8, minutes=1.0,
                 look="varied", tokenizer_look="exact", chat_threshold=True, encoder_tuning_steps=2,
                 teacher_overrides=("image_size=32", "vision_hidden_size=32", "vision_layers=1", "vision_heads=2",
                                    "text_hidden_size=32", "text_layers=1", "text_heads=2", "projection_dim=32",
                                    "batch_size=16", "warmup_steps=1", "log_every=1"),
                 tokenizer_overrides=("size=tiny", "batch_size=8", "warmup_steps=1", "log_every=1", "save_every=2",
                                      "paired_share=0.5", "tokenizer.code_preference_margin=0.0005"),
                 llm_overrides=("per_device_batch_size=4", "logging_steps=1", "save_steps=2", "max_length=256"),
                 finish_steps=2, finish_overrides=("per_device_batch_size=4", "logging_steps=1", "save_steps=2",
                                                   "max_length=256", "learning_rate=1e-4", "seed=1",
                                                   "multi_types.change=0.75"),
                 focus_steps=2, focus_overrides=(*CHANGE_FOCUS, "per_device_batch_size=4", "logging_steps=1",
                                                 "save_steps=2", "max_length=256"),
                 bars=False, purpose=TINY_PURPOSE),
}

# `shapes-cells` with every edit trained instruction first (`edit_image_first: 0`) and a mixture that gives
# editing and the two-image questions a larger share (edit 1.5, multi 0.75; captions and drawing, far over
# their bars, 0.75 each), then 1000 more steps with the pairs' weight doubled, a lower learning rate and
# another data seed (the "finish" stage): edits 82.0% at its scale 1, every operation at 68% or more; two
# images 87.3%, VQA 96.2%, captions 84.0% in fp32; end to end with bf16 edits 85.7% and two images 87.6%:
# every quality bar met (docs/experiments.md, sections 26-30). A
# chat turn of an image, then an instruction, is mostly answered in words: edits go through the edit paths
# (`model.edit`, `mllm edit`, /v1/images/edits, the web page's draw mode, /edit in `mllm chat`), which send
# the instruction first. About 80 minutes on 2 cores with bf16 (one end-to-end run), 140 without.
def _cells_edit_training(multi: float) -> tuple[str, ...]:
    return ("edit_image_first=0", "tasks.edit=1.5", f"tasks.multi={multi}", "tasks.t2i=0.75", "tasks.caption=0.75")


PLANS["shapes-cells-edit"] = replace(
    PLANS["shapes-cells"], minutes=140.0, llm_overrides=_cells_edit_training(0.75), finish_steps=1000, chat_threshold=True,
    finish_overrides=(*_cells_edit_training(1.5), "learning_rate=1e-4", "warmup_steps=50", "seed=1"))

# `shapes-cells-edit` with 2000 model steps instead of 4000, then 600 steps of "What changed between the two
# images?" alone (the `focus` stage), then its 1000-step `finish`, which draws moves three times as often among
# its edits and the change questions alone too, and then 300 steps of `mllm tune-encoder` on the model's
# tokenizer (objects anywhere in their cell read right: 82% -> 97% judge agreement, codes unchanged); 45-60
# minutes on 2 cores with bf16. It sits on the edge of the editing bars: one environment met every quality bar
# (edits 76.2% of 600, move 53%; two images 89.8%, what changed 66% where it was 18% without the focus), the
# next fresh clone edits 56.2% (recolour, move and remove under 50%; two images 87.1%); the other bars hold in
# both (docs/experiments.md, sections 31-36).
PLANS["shapes-half"] = replace(PLANS["shapes-cells-edit"], minutes=55.0, pretrain_steps=2000, encoder_tuning_steps=300,
                               focus_steps=600, focus_overrides=CHANGE_FOCUS,
                               finish_overrides=(*PLANS["shapes-cells-edit"].finish_overrides,
                                                 "edit_operations.move=3", "multi_types.change=0.75"))

# The demo: `shapes-half` with the 4000 pretraining steps of `shapes-cells-edit`. At 2000 the model binds an
# instruction to its object loosely (wrong edits change a second object too, or leave the named one alone:
# docs/experiments.md, section 37), and editing depends on the run; at 4000, on a fresh clone, every quality
# bar with a margin (edits 79.7% of 600, every operation at 58% or more; two images 92.4%, VQA 97.5%), in
# about 75 minutes on 2 cores with bf16. The time bar (20 minutes with the install) is out of reach of any
# plan that edits on 2 cores: the tokenizer alone takes 11 minutes, and edits need about 3000 model steps.
PLANS["shapes"] = replace(PLANS["shapes-half"], minutes=75.0, pretrain_steps=4000)


def model_dir(out: Path, plan: Plan) -> Path:
    """The demo's trained model folder: the merged sft model, or a copy of the pretrain model without sft."""
    return out / "model"


def get_plan(name: str) -> Plan:
    if name not in PLANS:
        from tokenizer_vision.schema import unknown_name

        raise unknown_name("demo size", name, PLANS)
    return PLANS[name]


def scaled(plan: Plan, minutes: float | None) -> Plan:
    """The plan with its training steps scaled by minutes / plan.minutes (at least 1 step each)."""
    if minutes is None or minutes == plan.minutes:
        return plan
    if not minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    factor = minutes / plan.minutes
    return replace(plan, teacher_steps=max(1, round(plan.teacher_steps * factor)),
                   tokenizer_steps=max(1, round(plan.tokenizer_steps * factor)),
                   pretrain_steps=max(1, round(plan.pretrain_steps * factor)),
                   sft_steps=plan.sft_steps and max(1, round(plan.sft_steps * factor)),
                   finish_steps=plan.finish_steps and max(1, round(plan.finish_steps * factor)),
                   focus_steps=plan.focus_steps and max(1, round(plan.focus_steps * factor)),
                   ett_steps=max(1, round(plan.ett_steps * factor)),
                   encoder_tuning_steps=plan.encoder_tuning_steps and max(1, round(plan.encoder_tuning_steps * factor)),
                   minutes=minutes)


__all__ = ["BARS", "OTHER_LOOK_TOKENIZER", "OTHER_LOOK_VQA", "OTHER_SIZE_VQA", "PLANS", "TINY_PURPOSE", "Plan", "get_plan", "model_dir", "scaled"]
