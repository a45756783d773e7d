"""Conversations with images -> `input_ids`, `attention_mask`, `labels`; generated ids -> text and images.

The pipeline of `MultimodalProcessor.__call__`, for a batch of conversations:

1. Flatten each message's content parts into one string (text parts as they are, each image part as the
   `<|image|>` placeholder, parts joined by "\\n") and collect the images in placeholder order. Strings are
   what every chat template accepts, so a base model's own template (Qwen2, Llama, ...) works unchanged.
   Message text is data, never control: a reserved string typed in a text part (any special token of the
   text tokenizer: `<|end|>`, an assistant header, `<|boi|>`, `<|image|>`, bos / eos ...) is swapped for a
   unique marker while the template renders, and restored afterwards with its position recorded, so that
   step 3 tokenizes it as ordinary text. Text without reserved strings takes exactly the path it always
   took. `image_placeholders_in_text=True` (trusted callers only) keeps a typed `<|image|>` a placeholder.
2. Render the chat template once per conversation (one batched `apply_chat_template` call) and find each
   assistant turn's character span: turn i's reply starts where `render(messages[:i],
   add_generation_prompt=True)` ends and stops right after the next end-of-turn token, so the template's
   text after it (e.g. ChatML's "\\n") is not supervised. Rendering every such prefix costs O(turns^2), so
   a conversation with more than two assistant turns renders once more with each reply swapped for a
   marker instead (the reply starts where its marker is) and checks that against the prefix renders of
   its first and last reply: linear, and the same spans (the prefix renders decide wherever they differ).
   Generation prompts need no spans (`return_labels=False`): one render.
3. Tokenize all rendered strings in ONE batched call; a token is supervised when its first character
   lies in an assistant span (offset mapping; no per-token Python loop). Where a reserved string typed in
   a message became a special id, the text between the template's own special tokens around it is
   tokenized again as plain text (`split_special_tokens=True`).
4. Encode every image of the batch in ONE `vision_tokenizer.encode` call (precomputed codes skip it) and
   expand each `<|image|>` id into `<|boi|>` + h*w image ids + `<|eoi|>` (`ImageVocabulary.image_ids`):
   each sequence is cut at its placeholders and the pieces, text ids and image ids in turn, are joined
   by one `torch.cat`; an expanded image inherits its placeholder's supervision (the flag repeated over
   the image's span), so an image in an assistant turn is a generation target and one in a user turn is
   context.
5. Check the length against `max_length` (or truncate), pad (left by default, for generation) and stack.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mllm.config import (
    IMAGE_TOKEN,
    LLM_DIR,
    TOKENIZER_DIR,
    VISION_TOKENIZER_DIR,
    MLLMConfig,
    padded_vocab_size,
)
from mllm.text_tokenizer import prepare_text_tokenizer
from mllm.vocab import ImageVocabulary, reserved_strings, special_token_ids

if TYPE_CHECKING:
    from PIL import Image

    from tokenizer_vision import DualCodebookTokenizer

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # labels the loss skips (PyTorch's cross_entropy default)
PART_SEPARATOR = "\n"  # between the content parts of one message (DEFAULT_CHAT_TEMPLATE does the same)
# tokenizer.model_max_length of a tokenizer that never set one is ~1e30; anything this large means "unset".
_UNSET_LENGTH = 10**8
# A conversation with more assistant turns than this finds its reply spans from one marked rendering
# instead of one prefix rendering per turn (see `_reply_starts`).
_PREFIX_RENDERS = 2


class _FromImages:
    """Marker: this placeholder takes the next image of the `images=` argument."""


class MultimodalProcessor:
    """Turns conversations (text + images) into model inputs and generated ids back into text and images.

    `text_tokenizer` is a HF tokenizer prepared with `prepare_text_tokenizer` (chat template, image
    special tokens), `vision_tokenizer` a `DualCodebookTokenizer` (may be None when every image comes as
    precomputed codes), `config` the `MLLMConfig` tying them together. `context_length` is the default
    `max_length` (None: the tokenizer's `model_max_length` when set, else no limit).
    Build a matching config and processor from two tokenizers with `MultimodalProcessor.build`.
    """

    def __init__(
        self,
        text_tokenizer,
        vision_tokenizer: DualCodebookTokenizer | None,
        config: MLLMConfig,
        context_length: int | None = None,
    ) -> None:
        if len(text_tokenizer) > config.image_offset:
            raise ValueError(
                f"the text tokenizer has {len(text_tokenizer)} tokens but image ids start at "
                f"image_offset={config.image_offset}: text and image ids would overlap"
            )
        if vision_tokenizer is not None and (
            vision_tokenizer.codebook_size != config.codebook_size
            or tuple(vision_tokenizer.grid_size) != tuple(config.grid_size)
        ):
            raise ValueError(
                f"the vision tokenizer (K={vision_tokenizer.codebook_size}, "
                f"grid {tuple(vision_tokenizer.grid_size)}) does not match the config "
                f"(K={config.codebook_size}, grid {tuple(config.grid_size)})"
            )
        self.text_tokenizer = text_tokenizer
        self.vision_tokenizer = vision_tokenizer
        self.config = config
        self.vocab = ImageVocabulary(config)
        if context_length is None and text_tokenizer.model_max_length < _UNSET_LENGTH:
            context_length = int(text_tokenizer.model_max_length)
        self.context_length = context_length
        self.end_of_turn_token = text_tokenizer.decode(
            [config.end_of_turn_token_id], skip_special_tokens=False
        )
        # Ids that end a generated reply: the template's end of turn, and eos (a base model may emit either).
        self._stop_ids = torch.tensor(
            sorted({config.end_of_turn_token_id} | ({text_tokenizer.eos_token_id} - {None}))
        )
        # Reserved strings: typed in message text they are tokenized as plain text (see the module doc).
        reserved = reserved_strings(text_tokenizer)
        self._special_ids = special_token_ids(text_tokenizer)
        self._added_ids = frozenset(text_tokenizer.added_tokens_decoder) | self._special_ids
        self._reserved_patterns = {
            allow: _alternation([r for r in reserved if not (allow and r == IMAGE_TOKEN)])
            for allow in (False, True)
        }

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        text_tokenizer,
        vision_tokenizer: DualCodebookTokenizer,
        embedding_mode: str = "learned",
        context_length: int | None = None,
        projector_hidden_size: int | None = None,
    ) -> tuple[MultimodalProcessor, MLLMConfig]:
        """A processor and its `MLLMConfig` from a text tokenizer and a vision tokenizer (for `mllm init`).

        Prepares `text_tokenizer` IN PLACE (`prepare_text_tokenizer`: image tokens, chat template if it has
        none, pad token), then: image_offset = len(text_tokenizer) (special tokens included), codebook size,
        grid and image size from `vision_tokenizer`, vocab_size = image_offset + K padded to a multiple of 64,
        the special-token ids, `embedding_mode` ("learned" | "codebook") and `projector_hidden_size`.
        `context_length` (the LLM's maximum sequence length) becomes the default `max_length` and is saved
        as the tokenizer's `model_max_length`. The LLM's embeddings must then be resized to
        `config.vocab_size` rows; that is the model's job, not the processor's.
        """
        import transformers

        import mllm

        special = prepare_text_tokenizer(text_tokenizer)
        image_offset = len(text_tokenizer)
        codebook_size = int(vision_tokenizer.codebook_size)
        config = MLLMConfig(
            image_offset=image_offset,
            codebook_size=codebook_size,
            grid_size=tuple(vision_tokenizer.grid_size),
            image_size=int(vision_tokenizer.image_size),
            boi_token_id=special["boi"],
            eoi_token_id=special["eoi"],
            image_token_id=special["image"],
            end_of_turn_token_id=special["end_of_turn"],
            pad_token_id=special["pad"],
            vocab_size=padded_vocab_size(image_offset + codebook_size),
            embedding_mode=embedding_mode,
            projector_hidden_size=projector_hidden_size,
            versions={
                "mllm": mllm.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__.split("+")[0],
            },
        )
        if context_length is not None:
            text_tokenizer.model_max_length = int(context_length)
        return cls(text_tokenizer, vision_tokenizer, config, context_length=context_length), config

    @classmethod
    def from_pretrained(
        cls, model_dir: str | os.PathLike, vision_tokenizer: DualCodebookTokenizer | None = None
    ) -> MultimodalProcessor:
        """Load from a model folder: mllm_config.json, tokenizer/ and (unless given) vision_tokenizer/.

        The context length is the tokenizer's saved `model_max_length`, else the LLM config's
        `max_position_embeddings` (or `n_positions`), else unlimited.
        """
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        config = MLLMConfig.load(model_dir)
        text_tokenizer = AutoTokenizer.from_pretrained(model_dir / TOKENIZER_DIR)
        if vision_tokenizer is None and (model_dir / VISION_TOKENIZER_DIR).is_dir():
            from tokenizer_vision import DualCodebookTokenizer

            vision_tokenizer = DualCodebookTokenizer.from_pretrained(model_dir / VISION_TOKENIZER_DIR)
        context_length = None
        llm_config = model_dir / LLM_DIR / "config.json"
        if text_tokenizer.model_max_length >= _UNSET_LENGTH and llm_config.is_file():
            data = json.loads(llm_config.read_text())
            context_length = data.get("max_position_embeddings") or data.get("n_positions")
        return cls(text_tokenizer, vision_tokenizer, config, context_length=context_length)

    def save_pretrained(self, model_dir: str | os.PathLike) -> None:
        """Write the text tokenizer (with its chat template) to model_dir/tokenizer/.

        The config (mllm_config.json) and the vision tokenizer are the model's to save.
        """
        if self.context_length is not None:
            self.text_tokenizer.model_max_length = int(self.context_length)
        self.text_tokenizer.save_pretrained(Path(model_dir) / TOKENIZER_DIR)

    # ------------------------------------------------------------------ conversations -> ids
    def __call__(
        self,
        conversations,
        add_generation_prompt: bool = False,
        padding_side: str = "left",
        max_length: int | None = None,
        truncation: bool = False,
        images: Sequence[Any] | None = None,
        *,
        image_placeholders_in_text: bool = False,
        return_labels: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One conversation (a list of messages) or a batch of them -> padded LongTensors (B, T).

        Returns `input_ids`, `attention_mask` (0 on padding) and `labels` (IGNORE_INDEX except on assistant
        tokens: reply text, the end-of-turn token, and images the assistant draws, <|boi|> codes <|eoi|>).
        Image parts: `{"type": "image", "image": PIL | path | bytes | data URL | base64}` (also "url" or
        "path" keys), `{"type": "image_url", "image_url": {"url": ...}}`, precomputed codes
        `{"type": "image", "codes": (h, w)}`, or a bare `{"type": "image"}`, which takes the next image of
        `images` (a flat list in conversation order, or one list per conversation).
        `add_generation_prompt=True` appends the assistant header for generation.

        Message text is tokenized as text: a special token's string typed in it (`<|end|>`, `<|boi|>`,
        `<|image|>`, ...) becomes ordinary text tokens, never the special id, so client text cannot forge
        a turn or an image. `image_placeholders_in_text=True` (trusted input only) makes a `<|image|>`
        typed in text a placeholder that takes the next image of `images`, like a bare image part.
        `return_labels=False` (generation) skips the label spans and returns no `labels`.
        A sequence longer than `max_length` (default: the context length) raises ValueError unless
        `truncation=True`: generation prompts lose their start, training sequences their end (never
        half an image).
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        batch = _as_batch(conversations)
        escapes = _Escapes(self._reserved_patterns[bool(image_placeholders_in_text)])
        flattened = [self._flatten(c, escapes, image_placeholders_in_text) for c in batch]
        self._bind_images(flattened, images, image_placeholders_in_text)

        messages = [messages for messages, _ in flattened]
        if return_labels:
            full, spans = self._render_with_spans(messages, add_generation_prompt)
        else:
            full, spans = self._apply_template(messages, add_generation_prompt), [[] for _ in messages]
        full, spans, typed = escapes.restore(full, spans)
        token_ids, supervised = self._tokenize(full, spans, typed)

        # Check placeholder counts before the (expensive) vision tokenizer runs.
        placeholder_counts = [int((ids == self.config.image_token_id).sum()) for ids in token_ids]
        for index, (count, (_, sources)) in enumerate(zip(placeholder_counts, flattened)):
            if count != len(sources):
                where = f"conversation {index}" if len(batch) > 1 else "the conversation"
                raise ValueError(
                    f"{where} has {count} {IMAGE_TOKEN} placeholders after the chat template "
                    f"but {len(sources)} images"
                )
        codes = self._codes_for([sources for _, sources in flattened])

        limit = self.context_length if max_length is None else max_length
        sequences = []
        for ids, sup, image_codes in zip(token_ids, supervised, codes):
            ids, sup, image_starts = self._expand_images(ids, sup, image_codes)
            if limit is not None and len(ids) > limit:
                ids, sup = self._truncate(ids, sup, image_starts, limit, truncation, add_generation_prompt)
            sequences.append((ids, sup))
        padded = self._pad(sequences, padding_side)
        if not return_labels:
            del padded["labels"]
        return padded

    def render(self, conversation, add_generation_prompt: bool = False) -> str:
        """The chat template applied to one conversation, images as <|image|> (nothing is decoded).

        Message text is rendered as it is: the string does not show which reserved strings in it
        `__call__` tokenizes as plain text."""
        messages, _ = self._flatten(_as_batch(conversation)[0], _Escapes(None), True)
        return self._apply_template([messages], add_generation_prompt)[0]

    def draw_conversation(self, prompt: str) -> list[dict[str, Any]]:
        """The text-to-image request: user "Draw: {prompt}" (the config's draw template)."""
        return [
            {
                "role": "user",
                "content": [{"type": "text", "text": self.config.draw_template.format(prompt=prompt)}],
            }
        ]

    def unconditional_draw_conversation(self) -> list[dict[str, Any]]:
        """The draw request with an empty prompt: CFG's unconditional branch, and what training drops
        text-to-image prompts to (so the two match exactly)."""
        return self.draw_conversation("")

    def edit_conversation(self, image, instruction: str, drop: str | None = None) -> list[dict[str, Any]]:
        """The edit request: user [the instruction as it is, the image] (the form `mllm train` learns edits
        in). `drop` gives guidance's unconditional branches, as training drops them: "instruction" (the
        image alone) or "both" (the unconditional draw request)."""
        if drop == "both":
            return self.unconditional_draw_conversation()
        if drop not in (None, "instruction"):
            raise ValueError(f"drop must be None, 'instruction' or 'both', got {drop!r}")
        # An image part passes as it is (e.g. precomputed codes: {"type": "image", "codes": ...}).
        part = image if isinstance(image, dict) and image.get("type") == "image" else {"type": "image", "image": image}
        content = [part]
        if drop is None:
            content.insert(0, {"type": "text", "text": instruction})
        return [{"role": "user", "content": content}]

    # ------------------------------------------------------------------ images
    def load_image(self, source) -> Image.Image:
        """A PIL image, path, bytes, `data:` URL or bare base64 string -> validated RGB PIL image (ValueError
        for anything that is not a sane image; `tokenizer_vision.load_image` decodes and checks)."""
        from tokenizer_vision.image_processing import load_image

        try:
            return load_image(source)
        except TypeError as error:
            raise ValueError(f"unsupported image source of type {type(source).__name__}") from error

    def encode_images(self, images) -> torch.LongTensor:
        """Images (one or a list; any source `load_image` takes) -> codes (N, h, w) on the CPU, in ONE
        batched call of the vision tokenizer."""
        if self.vision_tokenizer is None:
            raise ValueError("this processor has no vision tokenizer: pass images as precomputed codes")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            return torch.empty(0, *self.config.grid_size, dtype=torch.long)
        pil_images = [self.load_image(image) for image in images]
        return self.vision_tokenizer.encode(pil_images).long().cpu()

    # ------------------------------------------------------------------ generated ids -> text / images
    def decode_text(self, ids) -> str:
        """Ids -> text with image spans (<|boi|>, image ids, <|eoi|>) and special tokens dropped."""
        ids = torch.as_tensor(ids).reshape(-1).long()
        keep = (ids >= 0) & (ids < self.config.image_offset)
        keep &= (ids != self.config.boi_token_id) & (ids != self.config.eoi_token_id)
        return self.text_tokenizer.decode(ids[keep].tolist(), skip_special_tokens=True)

    def split_reply(self, ids) -> dict[str, Any]:
        """Generated ids (the reply only) -> {"text": str, "image_codes": [LongTensor (h, w), ...]}.

        The reply ends at the first end-of-turn (or eos) id; text is `decode_text` of it, images are the
        complete <|boi|> h*w codes <|eoi|> spans in it (a cut-short image is dropped).
        """
        ids = torch.as_tensor(ids).reshape(-1).long().cpu()
        stops = torch.isin(ids, self._stop_ids).nonzero()
        if len(stops):
            ids = ids[: int(stops[0])]
        return {
            "text": self.decode_text(ids),
            "image_codes": [codes for _, codes in self.vocab.find_images(ids)],
        }

    # ------------------------------------------------------------------ internals
    def _flatten(
        self, conversation, escapes: _Escapes, image_placeholders_in_text: bool
    ) -> tuple[list[dict[str, str]], list[Any]]:
        """Messages with string content (<|image|> for images) and the image sources in placeholder order.

        Reserved strings in text parts are swapped for `escapes`' markers (a typed <|image|> is kept, and
        counts as a placeholder, only with `image_placeholders_in_text`).
        A source is ("codes", tensor), ("image", anything `load_image` takes) or _FromImages."""
        messages, sources = [], []
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("a conversation must be a non-empty list of messages")
        for message in conversation:
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise ValueError(f"each message needs a role in {ROLES}, got {_short(message)}")
            content = message.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, (list, tuple)) or not content:
                raise ValueError(
                    f"message content must be a string or a non-empty list of parts, got {_short(content)}"
                )
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise ValueError(f"a text part needs a string 'text', got {_short(part)}")
                    if image_placeholders_in_text:
                        sources += [_FromImages] * text.count(IMAGE_TOKEN)  # placeholders typed in the text
                    texts.append(escapes.escape(text))
                elif kind in ("image", "image_url"):
                    sources.append(_image_source(part))
                    texts.append(IMAGE_TOKEN)
                else:
                    raise ValueError(
                        f"unknown content part type {kind!r} (expected 'text', 'image' or 'image_url'): "
                        f"{_short(part)}"
                    )
            messages.append({"role": message["role"], "content": PART_SEPARATOR.join(texts)})
        return messages, sources

    @staticmethod
    def _bind_images(
        flattened: list[tuple[list, list]], images: Sequence[Any] | None, image_placeholders_in_text: bool
    ) -> None:
        """Give each placeholder without its own image (bare image part, typed <|image|> when allowed) one
        of `images`."""
        wanted = [sum(source is _FromImages for source in sources) for _, sources in flattened]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        per_conversation = (
            len(flattened) > 1
            and len(images) == len(flattened)
            and all(isinstance(i, (list, tuple)) for i in images)
        )
        if per_conversation:
            for index, (want, given) in enumerate(zip(wanted, images)):
                if want != len(given):
                    raise ValueError(
                        f"conversation {index} has {want} image placeholders without an image "
                        f"but {len(given)} images were given"
                    )
            queue = [image for given in images for image in given]
        else:
            queue = list(images)
            if sum(wanted) != len(queue):
                kinds = f"{IMAGE_TOKEN} in text or bare image parts" if image_placeholders_in_text else (
                    f"bare image parts; a {IMAGE_TOKEN} typed in text is text unless "
                    "image_placeholders_in_text=True"
                )
                raise ValueError(
                    f"the conversation has {sum(wanted)} image placeholders without an image "
                    f"({kinds}) but {len(queue)} images were given"
                )
        position = 0
        for _, sources in flattened:
            for index, source in enumerate(sources):
                if source is _FromImages:
                    sources[index] = ("image", queue[position])
                    position += 1

    def _apply_template(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        if not conversations:
            return []
        return self.text_tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _render_with_spans(
        self, batch: list[list[dict]], add_generation_prompt: bool
    ) -> tuple[list[str], list[list[tuple[int, int]]]]:
        """Render each conversation; return the strings and each one's assistant reply spans (char ranges).

        The reply of assistant message i starts where render(messages[:i], add_generation_prompt=True)
        ends, provided that render is a prefix of the whole one (`_reply_starts`), and ends with the first
        end-of-turn token after it. A template that is not prefix-consistent (one that rewrites earlier
        turns), or a conversation that opens with the assistant, falls back to finding the reply's own text.
        """
        full = self._apply_template(batch, add_generation_prompt)
        replies = [[i for i, m in enumerate(messages) if m["role"] == "assistant"] for messages in batch]
        starts = self._reply_starts(batch, full, replies, add_generation_prompt)
        spans: list[list[tuple[int, int]]] = []
        eot = self.end_of_turn_token
        for text, messages, indices, known in zip(full, batch, replies, starts):
            found, cursor = [], 0
            for i in indices:
                start, close = known.get(i), -1
                if start is not None and start >= cursor:
                    close = text.find(eot, start)
                if close >= 0:
                    end = close + len(eot)
                else:
                    start, end = _find_reply(text, messages[i]["content"], eot, cursor, i)
                found.append((start, end))
                cursor = end
            spans.append(found)
        return full, spans

    def _reply_starts(
        self, batch: list[list[dict]], full: list[str], replies: list[list[int]], add_generation_prompt: bool
    ) -> list[dict[int, int | None]]:
        """Per conversation, {i: where the reply of assistant message i (i > 0) starts in the rendering}:
        len(render(messages[:i], add_generation_prompt=True)) when that is a prefix of the rendering,
        else None.

        Rendering every prefix costs O(n^2) in the number of messages n. A conversation with more than
        `_PREFIX_RENDERS` such replies is rendered once more with each of their contents swapped for a
        unique marker: where a marker stands is where that reply's text starts. That is taken when the
        markers put back give the rendering exactly and the prefix renders of the first and the last
        reply agree with it; otherwise (a template that writes something between the header and the
        reply, or treats turns unevenly) every prefix is rendered. Batched template calls throughout.
        """
        wanted = [[i for i in indices if i > 0] for indices in replies]
        starts: list[dict[int, int | None]] = [{} for _ in batch]
        marked = [b for b, indices in enumerate(wanted) if len(indices) > _PREFIX_RENDERS]
        located: dict[int, dict[int, int]] = {}
        if marked:
            nonce = secrets.token_hex(8)
            rendered = self._apply_template(
                [_mark_replies(batch[b], wanted[b], nonce) for b in marked], add_generation_prompt
            )
            for b, text in zip(marked, rendered):
                positions = _marked_reply_starts(text, batch[b], wanted[b], nonce, full[b])
                if positions is not None:
                    located[b] = positions

        def checked(b: int) -> list[int]:  # the prefixes rendered for conversation b
            return sorted({wanted[b][0], wanted[b][-1]}) if b in located else wanted[b]

        self._prefix_starts(batch, full, starts, [(b, i) for b in range(len(batch)) for i in checked(b)])
        rest = []
        for b, positions in located.items():
            if all(starts[b][i] == positions[i] for i in checked(b)):
                starts[b] = positions
            else:
                rest += [(b, i) for i in wanted[b] if i not in starts[b]]
        self._prefix_starts(batch, full, starts, rest)
        return starts

    def _prefix_starts(self, batch, full, starts, jobs: list[tuple[int, int]]) -> None:
        """starts[b][i] for each (b, i) of `jobs` from the prefix renderings (one batched call)."""
        prompts = self._apply_template([batch[b][:i] for b, i in jobs], True)
        for (b, i), prompt in zip(jobs, prompts):
            starts[b][i] = len(prompt) if full[b].startswith(prompt) else None

    def _tokenize(
        self, texts: list[str], spans: list[list[tuple[int, int]]], typed: list[list[tuple[int, int]]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """All rendered strings in one batched call -> ids (T,) and supervised masks (T,) per sequence.

        `typed`: per string, the character ranges of reserved strings typed in message text; tokens there
        must not be special ids (`_plain_text_runs`)."""
        tokenizer = self.text_tokenizer
        need_offsets = any(spans) or any(typed)
        if need_offsets and not getattr(tokenizer, "is_fast", False):
            return self._tokenize_segments(texts, spans, typed)
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=need_offsets)
        rows = [
            (list(ids), list(encoded["offset_mapping"][index]) if need_offsets else None)
            for index, ids in enumerate(encoded["input_ids"])
        ]
        if any(typed):
            rows = self._plain_text_runs(texts, rows, typed)
        token_ids, supervised = [], []
        for (row_ids, row_offsets), text_spans in zip(rows, spans):
            ids = torch.tensor(row_ids, dtype=torch.long)
            mask = torch.zeros(len(ids), dtype=torch.bool)
            if text_spans:
                offsets = torch.tensor(row_offsets, dtype=torch.long).reshape(-1, 2)
                starts = offsets[:, 0]  # (T,) first character of each token
                bounds = torch.tensor(text_spans, dtype=torch.long)  # (S, 2)
                mask = ((starts[:, None] >= bounds[:, 0]) & (starts[:, None] < bounds[:, 1])).any(dim=1)
            token_ids.append(ids)
            supervised.append(mask)
        return token_ids, supervised

    def _plain_text_runs(self, texts, rows, typed):
        """Re-tokenize, as plain text, each stretch of text that holds a special id typed in a message.

        The tokenizer cuts a string at its added tokens and tokenizes the text between them piece by
        piece. A special token whose characters lie in a `typed` range was typed in a message: the text
        from the template's added token before it to the one after it (all of it message text, or
        template text joined to it) is tokenized again as ONE piece with `split_special_tokens=True`,
        so it reads exactly as it would have without the typed string being special. Every other piece
        keeps its ids. One batched call for all such pieces.
        """
        jobs = []  # (row, first token, end token, first char, end char)
        for row, (text, (ids, offsets), ranges) in enumerate(zip(texts, rows, typed)):
            if not ranges:
                continue
            range_starts = [a for a, _ in ranges]

            def inside(position: int, ranges=ranges, range_starts=range_starts) -> bool:
                k = bisect.bisect_right(range_starts, position) - 1
                return k >= 0 and position < ranges[k][1]

            previous, has_typed = -1, False  # previous: the index of the last boundary token
            for j in range(len(ids) + 1):
                boundary = j == len(ids)
                if not boundary and ids[j] in self._added_ids:
                    if ids[j] in self._special_ids and inside(offsets[j][0]):
                        has_typed = True
                    else:
                        boundary = True
                if boundary:
                    if has_typed:
                        first = offsets[previous][1] if previous >= 0 else 0
                        last = offsets[j][0] if j < len(ids) else len(text)
                        jobs.append((row, previous + 1, j, first, last))
                    previous, has_typed = j, False
        if not jobs:
            return rows
        encoded = self.text_tokenizer(
            [texts[row][first:last] for row, _, _, first, last in jobs],
            add_special_tokens=False,
            split_special_tokens=True,
            return_offsets_mapping=True,
        )
        rows = [(list(ids), list(offsets)) for ids, offsets in rows]
        for index in reversed(range(len(jobs))):  # last piece first: earlier token indices stay valid
            row, begin, end, first, _ = jobs[index]
            ids, offsets = rows[row]
            ids[begin:end] = encoded["input_ids"][index]
            offsets[begin:end] = [(a + first, b + first) for a, b in encoded["offset_mapping"][index]]
        return rows

    def _tokenize_segments(self, texts, spans, typed):
        """Tokenizers without offset mappings: cut at the span boundaries and around typed reserved strings,
        tokenize the pieces (batched; the typed strings as plain text)."""
        pieces, owners = [], []  # pieces: (text, is_reply, plain)
        for index, (text, text_spans, ranges) in enumerate(zip(texts, spans, typed)):
            cuts = sorted({0, len(text)} | {c for pair in [*text_spans, *ranges] for c in pair})
            for first, last in itertools.pairwise(cuts):
                is_reply = any(a <= first < b for a, b in text_spans)
                plain = any(a <= first < b for a, b in ranges)
                pieces.append((text[first:last], is_reply, plain))
                owners.append(index)
        encoded: list[list[int]] = [[] for _ in pieces]
        for plain in (False, True):
            chosen = [k for k, piece in enumerate(pieces) if piece[2] == plain]
            if chosen:
                options = {"split_special_tokens": True} if plain else {}
                ids = self.text_tokenizer([pieces[k][0] for k in chosen], add_special_tokens=False, **options)
                for k, piece_ids in zip(chosen, ids["input_ids"]):
                    encoded[k] = piece_ids
        ids = [[] for _ in texts]
        masks = [[] for _ in texts]
        for owner, (_, is_reply, _), piece_ids in zip(owners, pieces, encoded):
            ids[owner] += piece_ids
            masks[owner] += [is_reply] * len(piece_ids)
        return (
            [torch.tensor(i, dtype=torch.long) for i in ids],
            [torch.tensor(m, dtype=torch.bool) for m in masks],
        )

    def _codes_for(self, all_sources: list[list[Any]]) -> list[list[torch.Tensor]]:
        """Codes for every image of the batch: precomputed ones as given, the rest in ONE encode call."""
        to_encode = [source for sources in all_sources for kind, source in sources if kind == "image"]
        encoded = iter(self.encode_images(to_encode)) if to_encode else iter(())
        result = []
        for sources in all_sources:
            result.append(
                [self._check_codes(source) if kind == "codes" else next(encoded) for kind, source in sources]
            )
        return result

    def _check_codes(self, codes) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"precomputed image codes must be integers, got {codes.dtype}")
        height, width = self.config.grid_size
        if tuple(codes.shape) not in ((height, width), (height * width,)):
            raise ValueError(
                f"precomputed image codes must have shape ({height}, {width}), got {tuple(codes.shape)}"
            )
        return codes.long().cpu()

    def _expand_images(
        self, ids: torch.Tensor, supervised: torch.Tensor, image_codes: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each <|image|> id -> <|boi|> + h*w image ids + <|eoi|>; returns ids, mask, image starts (N,)."""
        positions = (ids == self.config.image_token_id).nonzero().flatten()  # (N,)
        if not len(positions):
            return ids, supervised, positions
        span = self.vocab.tokens_per_image
        # Slices and torch.cat, not repeat_interleave: that took ~2 ms per call on these 20-id rows (CPU, 2
        # threads), most of the setup time of a training run that tokenizes 100k conversations.
        ids_parts, supervised_parts, starts, previous = [], [], [], 0
        for index, position in enumerate(positions.tolist()):
            starts.append(position + index * (span - 1))
            ids_parts += [ids[previous:position], self.vocab.image_ids(image_codes[index]).to(ids.dtype)]
            supervised_parts += [supervised[previous:position], supervised[position:position + 1].expand(span)]
            previous = position + 1
        ids_parts.append(ids[previous:])
        supervised_parts.append(supervised[previous:])
        return torch.cat(ids_parts), torch.cat(supervised_parts), torch.tensor(starts, dtype=torch.long)

    def _truncate(self, ids, supervised, image_starts, limit, truncation, add_generation_prompt):
        kind = "prompt" if add_generation_prompt else "sequence"
        if not truncation:
            raise ValueError(
                f"the {kind} is {len(ids)} tokens long (images included) but the limit is {limit} tokens "
                "(max_length, or the LLM's context length); shorten it or pass truncation=True"
            )
        span = self.vocab.tokens_per_image
        if add_generation_prompt:  # keep the end: that is where generation continues
            cut = len(ids) - limit
            inside = (image_starts < cut) & (image_starts + span > cut)
            if inside.any():
                cut = int(image_starts[inside].max()) + span
            return ids[cut:], supervised[cut:]
        cut = limit  # training: keep the start
        inside = (image_starts < cut) & (image_starts + span > cut)
        if inside.any():
            cut = int(image_starts[inside].min())
        return ids[:cut], supervised[:cut]

    def _pad(
        self, sequences: list[tuple[torch.Tensor, torch.Tensor]], padding_side: str
    ) -> dict[str, torch.Tensor]:
        length = max(len(ids) for ids, _ in sequences)
        batch = len(sequences)
        input_ids = torch.full((batch, length), self.config.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, supervised) in enumerate(sequences):
            n = len(ids)
            columns = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[row, columns] = ids
            attention_mask[row, columns] = 1
            labels[row, columns] = torch.where(supervised, ids, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------- helpers
def _as_batch(conversations) -> list[list[dict]]:
    """One conversation (list of messages, or a Sample) or a list of them -> a list of message lists."""
    if hasattr(conversations, "messages"):
        return [conversations.messages]
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("expected a conversation (a non-empty list of messages) or a list of conversations")
    first = conversations[0]
    if isinstance(first, dict):
        return [list(conversations)]
    return [getattr(conversation, "messages", conversation) for conversation in conversations]


def _short(value: Any, limit: int = 120) -> str:
    """repr for error messages, cut short (a message may hold a whole image)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...]"


def _image_source(part: dict) -> Any:
    """An image part -> ("codes", codes) | ("image", source) | _FromImages (bare placeholder)."""
    if part.get("codes") is not None:
        return ("codes", part["codes"])
    if part["type"] == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not url:
            raise ValueError(f"an image_url part needs image_url.url, got {_short(part)}")
        return ("image", url)
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return ("image", part[key])
    return _FromImages


def _find_reply(text: str, content: str, eot: str, cursor: int, index: int) -> tuple[int, int]:
    """Fallback for templates whose prefixes are not prefix-consistent (or a conversation that opens with
    the assistant): find the reply text itself, after the previous reply."""
    if not content.strip():
        return cursor, cursor  # an empty reply with nothing to anchor it: left unsupervised
    for needle in (content, content.strip()):
        start = text.find(needle, cursor) if needle else -1
        if start >= 0:
            end = start + len(needle)
            close = text.find(eot, end)
            if close >= 0 and not text[end:close].strip():
                end = close + len(eot)
            return start, end
    raise ValueError(
        f"cannot find assistant message {index} in the rendered chat template (its prefixes do not render "
        "consistently and its text does not appear verbatim), so its labels cannot be masked"
    )


def _alternation(strings: Sequence[str]) -> re.Pattern | None:
    """A regex matching any of `strings` (given longest first: the tokenizer's leftmost-longest match)."""
    return re.compile("|".join(re.escape(s) for s in strings)) if strings else None


class _Escapes:
    """Reserved strings typed in message text <-> unique markers, for one processor call.

    `escape` swaps each reserved string of a text for a marker the template copies like any text (private
    use characters around a random nonce and a number); `restore` puts the strings back into the rendered
    strings and returns where they are, so that tokenization keeps them plain text."""

    def __init__(self, pattern: re.Pattern | None) -> None:
        self.pattern = pattern
        self.originals: list[str] = []
        self.nonce = secrets.token_hex(8)
        self.marker = re.compile("\ue000" + self.nonce + r"(\d+)\ue001")

    def escape(self, text: str) -> str:
        if self.pattern is None:
            return text
        return self.pattern.sub(self._swap, text)

    def _swap(self, match: re.Match) -> str:
        self.originals.append(match.group())
        return f"\ue000{self.nonce}{len(self.originals) - 1}\ue001"

    def restore(
        self, texts: list[str], spans: list[list[tuple[int, int]]]
    ) -> tuple[list[str], list[list[tuple[int, int]]], list[list[tuple[int, int]]]]:
        """Rendered strings with markers -> (the strings with the reserved strings back, the spans moved
        to match, per string the character ranges of the restored reserved strings)."""
        typed: list[list[tuple[int, int]]] = [[] for _ in texts]
        if not self.originals:
            return texts, spans, typed
        restored_texts, restored_spans = [], []
        for text, text_spans, ranges in zip(texts, spans, typed):
            pieces, ends, shifts, position, shift = [], [], [], 0, 0
            for match in self.marker.finditer(text):
                if int(match.group(1)) >= len(self.originals):
                    continue  # not one of ours (no text can guess the nonce; checked all the same)
                original = self.originals[int(match.group(1))]
                pieces.append(text[position : match.start()])
                pieces.append(original)
                ranges.append((match.start() + shift, match.start() + shift + len(original)))
                shift += len(original) - (match.end() - match.start())
                ends.append(match.end())
                shifts.append(shift)
                position = match.end()
            if not ranges:
                restored_texts.append(text)
                restored_spans.append(text_spans)
                continue
            pieces.append(text[position:])
            restored_texts.append("".join(pieces))

            def moved(at: int, ends=ends, shifts=shifts) -> int:  # span ends never fall inside a marker
                k = bisect.bisect_right(ends, at) - 1
                return at + (shifts[k] if k >= 0 else 0)

            restored_spans.append([(moved(a), moved(b)) for a, b in text_spans])
        return restored_texts, restored_spans, typed


def _reply_marker(nonce: str, index: int) -> str:
    return f"\ue002{nonce}{index}\ue003"


def _mark_replies(messages: list[dict], indices: list[int], nonce: str) -> list[dict]:
    """The messages with the content of each assistant message in `indices` swapped for its marker."""
    chosen = set(indices)
    return [
        {**message, "content": _reply_marker(nonce, i)} if i in chosen else message
        for i, message in enumerate(messages)
    ]


def _marked_reply_starts(
    marked: str, messages: list[dict], indices: list[int], nonce: str, full: str
) -> dict[int, int] | None:
    """Where each marked reply's text starts in `full` (the unmarked rendering), or None unless every
    marker appears once, in order, and putting the replies back in their place gives `full` exactly."""
    pattern = re.compile("\ue002" + nonce + r"(\d+)\ue003")
    pieces, positions, position, length = [], {}, 0, 0
    expected = iter(indices)
    for match in pattern.finditer(marked):
        index = int(match.group(1))
        if index != next(expected, None):
            return None
        content = messages[index]["content"]
        pieces += [marked[position : match.start()], content]
        length += match.start() - position
        positions[index] = length
        length += len(content)
        position = match.end()
    if len(positions) != len(indices):
        return None
    pieces.append(marked[position:])
    return positions if "".join(pieces) == full else None
