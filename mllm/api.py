"""The Python API: load a model folder and caption, answer, draw and chat.

    import mllm
    model = mllm.load("runs/demo/model")                     # device/dtype/adapter optional
    model.caption(image)                                      # -> "a red circle at the top left"
    model.answer(image, "What colour is the circle?")        # -> "red"
    model.draw("a blue square in the center", n=2, seed=0)   # -> [PIL.Image, PIL.Image]
    model.edit(image, "make the circle blue")                # -> [PIL.Image] (n=1)
    model.chat([{"role": "user", "content": "Draw: a green triangle"}])  # -> {"text": ..., "images": [...]}

Lists go in as one batch: `caption([img1, img2])` -> [str, str], `answer([img1, img2], [q1, q2])`
-> [str, str], `draw([p1, p2], n=3)` -> [[PIL x3], [PIL x3]], `edit([img1, img2], "...")` -> [[PIL], [PIL]].
Several images in ONE question go through `chat` (image parts in one message). Images may be PIL images, paths or
bytes (anything the processor accepts); images go in as image parts, and text is always text (a
`<|image|>` typed in a question or a message is not a placeholder). All generation goes through
`mllm.generation`; a chat reply's `max_new_tokens` counts the images it draws.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mllm.config import (
    DEFAULT_DECODING,
    DRAW_GUIDANCE_SCALE,
    DRAW_TEMPERATURE,
    EDIT_GUIDANCE,
    EDIT_TEMPERATURE,
)
from mllm.data.samples import image_part, text_part


def load(
    model_dir: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> MLLM:
    """Load a model folder (`mllm init` / `mllm train` output), optionally with a peft adapter.

    device: "cpu", "cuda", "cuda:1", ... (default: cuda when available). dtype: "bf16" | "fp16" |
    "fp32" (default: the dtype the weights were saved in).
    """
    from mllm.model import UnifiedMLLM

    return MLLM(UnifiedMLLM.from_pretrained(model_dir, adapter=adapter, device=device, dtype=dtype))


class MLLM:
    """A loaded unified model with one method per task. `model` is the underlying `UnifiedMLLM`."""

    def __init__(self, model) -> None:
        self.model = model.eval()

    @property
    def config(self):
        return self.model.config

    def __repr__(self) -> str:
        config = self.config
        return (
            f"MLLM({type(self.model.llm).__name__}, grid={config.grid_size[0]}x{config.grid_size[1]}, "
            f"K={config.codebook_size}, image_size={config.image_size}, device={self.model.device})"
        )

    # ------------------------------------------------------------------ understanding
    def caption(self, image, max_new_tokens: int = 64, **sampling: Any) -> str | list[str]:
        """A caption per image (the config's caption prompt). One image -> str; a list -> list[str]."""
        images, single = _as_list(image)
        prompt = self.config.caption_prompt
        replies = self._reply([_image_question(img, prompt) for img in images], max_new_tokens, sampling)
        return replies[0] if single else replies

    def answer(
        self, image, question: str | Sequence[str], max_new_tokens: int = 32, **sampling: Any
    ) -> str | list[str]:
        """Answer a question about an image (the config's vqa_template). A list of images and/or a list
        of questions -> a list of answers (a single image or question is paired with every item)."""
        images, single_image = _as_list(image)
        questions = [question] if isinstance(question, str) else list(question)
        single = single_image and isinstance(question, str)
        if len(images) == 1 and len(questions) > 1:
            images = images * len(questions)
        elif len(questions) == 1 and len(images) > 1:
            questions = questions * len(images)
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        template = self.config.vqa_template
        conversations = [
            _image_question(img, template.format(question=q)) for img, q in zip(images, questions)
        ]
        replies = self._reply(conversations, max_new_tokens, sampling)
        return replies[0] if single else replies

    # ------------------------------------------------------------------ generation
    def draw(
        self,
        prompt: str | Sequence[str],
        n: int = 1,
        guidance_scale: float = DRAW_GUIDANCE_SCALE,
        temperature: float = DRAW_TEMPERATURE,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int] | None = None,
        decoding: str = DEFAULT_DECODING,
    ):
        """`n` images for a prompt -> [PIL, ...]; a list of prompts -> [[PIL, ...], ...], one batch.

        Same prompt and seed -> the same images (image j uses seed + j), whatever else is in the batch.
        `decoding`: "jacobi" (speculative Jacobi decoding, several image codes per forward pass, each
        accepted by the speculative-sampling rule), "sequential" (one code per forward pass) or "auto" (the
        default: "jacobi" for up to JACOBI_AUTO_MAX_IMAGES images per call, the faster one on a CPU). They
        draw from the same distribution and greedy drawings (temperature 0) are identical; a sampled image
        with a given seed differs between "jacobi" and "sequential", so under "auto" it also depends on the
        number of images drawn at once. Another name is a ValueError.
        """
        from mllm.generation import generate_images

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        codes = generate_images(self.model, prompts, n, guidance_scale, temperature, top_k, top_p, seed,
                                decoding=decoding)
        flat = [c for per_prompt in codes for c in per_prompt]
        images = self._decode(flat)
        per_prompt = [images[i * n : (i + 1) * n] for i in range(len(prompts))]
        return per_prompt[0] if isinstance(prompt, str) else per_prompt

    def edit(
        self,
        image,
        instruction: str | Sequence[str],
        n: int = 1,
        seed: int | Sequence[int] | None = None,
        guidance_scale: float | None = None,
        guidance: str = EDIT_GUIDANCE,
        temperature: float = EDIT_TEMPERATURE,
        top_k: int | None = None,
        top_p: float | None = None,
        decoding: str = DEFAULT_DECODING,
        image_guidance_scale: float | None = None,
    ):
        """`n` edited versions of an image -> [PIL, ...]; a list of images -> [[PIL, ...], ...], one batch
        (one instruction for all, or one per image).

        The model reads the image and the instruction ("make the circle blue", "remove the square", "add a
        small red circle at the top left", ...) and draws the edited image. Same image, instruction and seed
        -> the same result (edit j uses seed + j). `guidance_scale` None: the model's own
        (`config.edit_guidance_scale`; 1 runs no guidance). `guidance` is what classifier-free guidance's
        unconditional branch drops ("instruction" or "both"; guidance_scale 1: none); `image_guidance_scale`
        (None: off) guides by the image and by the instruction at once, each with its own scale
        (`mllm.generation.edit_images`); `decoding` as in `draw`.
        """
        from mllm.generation import edit_images

        images, single = _as_list(image)
        codes = edit_images(self.model, images, instruction, n, guidance_scale, guidance, temperature, top_k,
                            top_p, seed, decoding=decoding, image_guidance_scale=image_guidance_scale)
        flat = self._decode([c for per_image in codes for c in per_image])
        per_image = [flat[i * n : (i + 1) * n] for i in range(len(images))]
        return per_image[0] if single else per_image

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        """The assistant's next turn for a conversation -> {"text": str, "images": [PIL, ...],
        "completion_tokens": int (the reply's tokens, each image's h*w + 2 included), "finish_reason": "stop"
        (the end of turn or a stop string) or "length" (the budget or the context)}.

        Options are those of `mllm.generation.chat` (max_new_tokens, temperature, top_k, top_p, stop,
        seed, guidance_scale, image_temperature, image_top_k, image_top_p, max_images, decoding).
        `decoding` is how the images of the reply are decoded, as in `draw`: "auto" (default; one image at a
        time, so "jacobi"), "jacobi" or "sequential", the same distribution either way.
        `max_new_tokens` (256) bounds the whole reply: its text and each image it draws (h*w + 2 tokens:
        <|boi|>, the codes, <|eoi|>); an image that would not fit the budget or the context is not
        started. Message text is read as text: a special token's string typed in it (`<|end|>`,
        `<|image|>`, ...) is ordinary text, never a turn marker or an image.
        """
        from mllm.generation import chat

        return chat(self.model, messages, **options)

    def generate_text(self, conversations, **options: Any) -> list[str]:
        """One text reply per conversation (see `mllm.generation.generate_text`)."""
        from mllm.generation import generate_text

        return generate_text(self.model, conversations, **options)

    # ------------------------------------------------------------------ helpers
    def _reply(self, conversations, max_new_tokens: int, sampling: dict[str, Any]) -> list[str]:
        from mllm.generation import generate_text

        return generate_text(self.model, conversations, max_new_tokens=max_new_tokens, **sampling)

    def _decode(self, codes):
        import torch

        if not codes:
            return []
        return self.model.vision_tokenizer.decode_images(torch.stack(codes))


def _as_list(image) -> tuple[list, bool]:
    if isinstance(image, (list, tuple)):
        return list(image), False
    return [image], True


def _image_question(image, text: str) -> list[dict[str, Any]]:
    # The order of the training samples (mllm.data.samples): image first, then the text.
    return [{"role": "user", "content": [image_part(image), text_part(text)]}]
