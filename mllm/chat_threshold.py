"""Measuring a model's chat image threshold (`config.chat_image_threshold`) on the shapes world.

Chat decides whether a reply starts with an image from the reply's first token. Chat clients send an edit as
the image, then the instruction; a model trained on instruction-first edits only (`edit_image_first: 0`,
the plans that edit best) mostly answers that order in words, yet gives `<|boi|>` a small but clear chance
there, and a question about an image almost none (docs/experiments.md, section 30: above 1e-3 for 86% of
edits and no question). The threshold turns that gap into the decision (`mllm.generation.chat`).

`measure` sends, for each of N scenes the model never trained on (train-split seeds from index
FIRST_SCENE: past any demo's data, and never a test scene), one edit instruction (`make_edit`) and one
question (a VQA question, or for every fourth scene the caption request), each after the image, and takes
the chance of `<|boi|>` as the reply's first token (`image_start_chances`). The threshold is `margin` times
the largest chance any question got, so no measured question would start an image; none (the plain
decision) when that is 0.5 or more, where `<|boi|>` would be the likeliest token anyway, or when no edit
reaches it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

FIRST_SCENE = 1_000_000  # train-split scene index of the first calibration scene
DEFAULT_SCENES = 200
DEFAULT_MARGIN = 3.0


def calibration_turns(scenes: int = DEFAULT_SCENES, size: int = 48, look: str = "varied",
                      caption_prompt: str = "Describe the image.",
                      encode: Callable[[list], Any] | None = None) -> Iterator[tuple[str, list[dict]]]:
    """("edit" | "question", a one-turn conversation: the scene's image, then text), two per scene.
    `encode` (images -> (N, h, w) codes, e.g. a vision tokenizer's `encode`): the turns carry the codes
    instead of the images, encoded in one batch."""
    from mllm.data import shapes, shapes_tasks

    scene_list = [shapes.make_scene(shapes.scene_seed("train", FIRST_SCENE + i)) for i in range(scenes)]
    renders = [shapes.render(scene, size, look=look) for scene in scene_list]
    parts = ([{"type": "image", "codes": codes} for codes in encode(renders)] if encode is not None
             else [{"type": "image", "image": render} for render in renders])
    for index, (scene, image) in enumerate(zip(scene_list, parts)):
        edit = shapes_tasks.make_edit(scene)
        yield "edit", [{"role": "user", "content": [image, {"type": "text", "text": edit.instruction}]}]
        if index % 4 == 3:
            question = caption_prompt
        else:
            pairs = shapes.vqa_pairs(scene)
            question = pairs[index % len(pairs)]["question"]
        yield "question", [{"role": "user", "content": [image, {"type": "text", "text": question}]}]


def choose_threshold(edits: list[float], questions: list[float], margin: float = DEFAULT_MARGIN) -> float | None:
    """`margin` x the largest question chance; None where that cannot change a decision or helps no edit."""
    if not edits or not questions:
        raise ValueError("choosing a threshold needs the chances of some edits and some questions")
    threshold = margin * max(questions)
    if threshold >= 0.5 or not any(chance >= threshold for chance in edits):
        return None
    return threshold


def measure(model, scenes: int = DEFAULT_SCENES, look: str = "varied", margin: float = DEFAULT_MARGIN,
            progress: bool = True) -> dict[str, Any]:
    """The chances of `<|boi|>` on the calibration turns of `model` (an `MLLM` or a `UnifiedMLLM`), the
    threshold they give and what it buys: the percentage of edits and of questions whose greedy reply starts
    with an image without it (`*_plain`: `<|boi|>` the likeliest first token) and with it."""
    from mllm.generation import image_start_decisions

    inner = getattr(model, "model", model)
    config = inner.config
    turns = list(calibration_turns(scenes, config.image_size, look, config.caption_prompt,
                                   encode=inner.vision_tokenizer.encode))
    found: dict[str, list[tuple[float, bool]]] = {"edit": [], "question": []}
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        progress = False
    iterator = tqdm(turns, desc="chat threshold", unit="turn") if progress else turns
    for kind, conversation in iterator:
        found[kind] += image_start_decisions(inner, [conversation])
    edits, questions = ([chance for chance, _ in found[kind]] for kind in ("edit", "question"))
    threshold = choose_threshold(edits, questions, margin)

    def share(decisions: list[bool]) -> float:
        return round(100.0 * sum(decisions) / len(decisions), 1)

    def starts(kind: str, with_threshold: bool) -> float:
        return share([likeliest or (with_threshold and threshold is not None and chance >= threshold)
                      for chance, likeliest in found[kind]])

    return {
        "scenes": scenes, "look": look, "margin": margin, "threshold": threshold,
        "edits_starting_an_image_plain": starts("edit", False),
        "questions_starting_an_image_plain": starts("question", False),
        "edits_starting_an_image": starts("edit", True),
        "questions_starting_an_image": starts("question", True),
        "edit_chance_median": sorted(edits)[len(edits) // 2], "question_chance_max": max(questions),
    }


def calibrate(model_dir, scenes: int = DEFAULT_SCENES, look: str = "varied", margin: float = DEFAULT_MARGIN,
              out=None, write: bool = True, device: str | None = None) -> dict[str, Any]:
    """`mllm chat-threshold`: load the model folder, `measure` it, write the figures to `out` (a JSON file;
    None: not) and, with `write`, the threshold into the folder's mllm_config.json. Returns the figures."""
    import json
    from pathlib import Path

    import mllm
    from mllm.config import MLLMConfig

    model_dir = Path(model_dir)
    config = MLLMConfig.load(model_dir)  # a clear error before loading weights when it is no model folder
    if out is not None and Path(out).is_dir():
        raise ValueError(f"--out {out} is a folder: give a file name, e.g. {Path(out) / 'chat-threshold.json'}")
    figures = measure(mllm.load(model_dir, device=device), scenes=scenes, look=look, margin=margin)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(figures, indent=2) + "\n")
    if write:
        config.chat_image_threshold = figures["threshold"]
        config.save(model_dir)
    return figures


__all__ = ["DEFAULT_MARGIN", "DEFAULT_SCENES", "FIRST_SCENE", "calibrate", "calibration_turns", "choose_threshold",
           "measure"]
