"""The one sample type every reader yields, and the prompt templates of the four tasks.

A `Sample` is a conversation in the Hugging Face / OpenAI content-part style, so the
processor turns every task (caption, VQA, chat, drawing, editing, questions over several images) into a
token sequence the same way:

    {"role": "user" | "assistant" | "system",
     "content": [{"type": "text", "text": "..."}, {"type": "image", "image": PIL.Image}]}

An image part in an assistant turn is an image the model must draw (text-to-image).

JSON form (shards, LLaVA conversion): images are not stored inside the messages. An image part
is written as a bare `{"type": "image"}` placeholder and the images travel beside the JSON, in
order: the k-th image part of the conversation (counting user and assistant turns alike, first
message first) is the k-th image of the record. `messages_to_json` and `chat_sample` convert
between the two forms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

TASKS = ("caption", "vqa", "chat", "t2i", "edit", "multi")
ROLES = ("user", "assistant", "system")

CAPTION_PROMPT = "Describe the image."
DRAW_TEMPLATE = "Draw: {prompt}"


@dataclass
class Sample:
    """One training/eval example: a conversation with its images inside the image parts."""

    key: str
    task: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    # Edit samples: the record's edit operation ("recolour", "move", ...) where the record names one; training
    # can weight the operations (`edit_operations` of the LLM recipe).
    operation: str | None = None
    # Multi-image samples: the question's type ("count", "more", "change", "single" in the shapes world) where the
    # record names one; training can draw a type alone as extra examples (`multi_types` of the LLM recipe).
    question_type: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")

    @property
    def images(self) -> list[Image.Image | Any]:
        """What each image part carries, in conversation order: a PIL image, or for pre-tokenized
        data its code grid (LongTensor (h, w))."""
        return [
            part["image"] if "image" in part else part["codes"]
            for message in self.messages
            for part in message["content"]
            if part["type"] == "image"
        ]


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_part(image: Image.Image) -> dict[str, Any]:
    return {"type": "image", "image": image}


def caption_sample(key: str, image: Image.Image, caption: str) -> Sample:
    """user: image + "Describe the image." -> assistant: caption."""
    return Sample(
        key,
        "caption",
        [
            {"role": "user", "content": [image_part(image), text_part(CAPTION_PROMPT)]},
            {"role": "assistant", "content": [text_part(caption)]},
        ],
    )


def vqa_sample(key: str, image: Image.Image, question: str, answer: str) -> Sample:
    """user: image + question -> assistant: short answer."""
    return Sample(
        key,
        "vqa",
        [
            {"role": "user", "content": [image_part(image), text_part(question)]},
            {"role": "assistant", "content": [text_part(answer)]},
        ],
    )


def t2i_sample(key: str, prompt: str, image: Image.Image) -> Sample:
    """user: "Draw: {prompt}" -> assistant: the image (the generation target)."""
    return Sample(
        key,
        "t2i",
        [
            {"role": "user", "content": [text_part(DRAW_TEMPLATE.format(prompt=prompt))]},
            {"role": "assistant", "content": [image_part(image)]},
        ],
    )


def edit_sample(key: str, source: Image.Image, instruction: str, target: Image.Image,
                description: str | None = None, operation: str | None = None) -> Sample:
    """user: the instruction as it is ("make the circle blue") + the source image -> assistant: the edited
    image (the generation target). The instruction comes first so that every source code lies the same
    number of tokens before the target code at its grid position, whatever the instruction's length: the
    model learns to copy what the edit leaves alone with one fixed-offset attention pattern (with the image
    first it learned no copying in the same steps: docs/experiments.md). No template around the instruction.
    Training also turns a share of the edits round (`edit_image_first`), as a chat client sends them.
    `description` (the edited image in words, e.g. its caption): the reply says it before the image, so the
    model works the change out in text, then draws what it wrote."""
    reply = [text_part(description), image_part(target)] if description else [image_part(target)]
    return Sample(
        key,
        "edit",
        [
            {"role": "user", "content": [text_part(instruction), image_part(source)]},
            {"role": "assistant", "content": reply},
        ],
        operation,
    )


def multi_image_sample(key: str, images: list[Image.Image], question: str, answer: str,
                       question_type: str | None = None) -> Sample:
    """user: every image, in order, then the question ("Which image has more objects?") -> assistant: answer."""
    return Sample(
        key,
        "multi",
        [
            {"role": "user", "content": [*(image_part(image) for image in images), text_part(question)]},
            {"role": "assistant", "content": [text_part(answer)]},
        ],
        question_type=question_type,
    )


def caption_qa_chat(key: str, image: Image.Image, caption: str, qa: list[dict[str, Any]]) -> Sample:
    """One multi-turn chat about one image: the caption turn (image first), then one turn per QA pair."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [image_part(image), text_part(CAPTION_PROMPT)]},
        {"role": "assistant", "content": [text_part(caption)]},
    ]
    for pair in qa:
        messages.append({"role": "user", "content": [text_part(pair["question"])]})
        messages.append({"role": "assistant", "content": [text_part(pair["answer"])]})
    return Sample(key, "chat", messages)


def chat_sample(key: str, messages: list[dict[str, Any]], images: list[Image.Image]) -> Sample:
    """A conversation in JSON form (image parts are `{"type": "image"}` placeholders) bound to its images.

    The k-th image part receives `images[k]`. A message whose `content` is a plain string is read
    as one text part. Raises ValueError on an unknown role or part type, or when the number of
    image parts and images differ (naming both counts).
    """
    bound: list[dict[str, Any]] = []
    placeholders = 0
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"each message needs a role in {ROLES}, got {message!r}"[:200])
        content = message.get("content")
        if isinstance(content, str):
            content = [text_part(content)]
        if not isinstance(content, list) or not content:
            raise ValueError(
                f"message content must be a string or a non-empty list of parts, got {content!r}"[:200]
            )
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(text_part(part["text"]))
            elif kind == "image":
                if placeholders < len(images):
                    parts.append(image_part(images[placeholders]))
                placeholders += 1
            else:
                raise ValueError(f"unknown content part {part!r}"[:200])
        bound.append({"role": message["role"], "content": parts})
    if placeholders != len(images):
        raise ValueError(f"the messages have {placeholders} image parts but {len(images)} images were given")
    return Sample(key, "chat", bound)


def messages_to_json(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """Split in-memory messages into their JSON form (image placeholders) and the images in order."""
    images: list[Image.Image] = []
    json_messages = []
    for message in messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                images.append(part["image"])
                parts.append({"type": "image"})
            else:
                parts.append(text_part(part["text"]))
        json_messages.append({"role": message["role"], "content": parts})
    return json_messages, images
