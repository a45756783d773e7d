"""Conversations with images -> `input_ids`, `attention_mask`, `labels`; generated ids -> text and images.

The pipeline of `MultimodalProcessor.__call__`, for a batch of conversations:

1. Flatten each message's content parts into one string (text parts as they are, each image part as the
   `<|image|>` placeholder, parts joined by "\\n") and collect the images in placeholder order. Strings are
   what every chat template accepts, so a base model's own template (Qwen2, Llama, ...) works unchanged.
2. Render the chat template once per conversation (one batched `apply_chat_template` call) and find each
   assistant turn's character span by rendering prefixes: turn i's reply starts where
   `render(messages[:i], add_generation_prompt=True)` ends and stops right after the next end-of-turn
   token, so the template's text after it (e.g. ChatML's "\\n") is not supervised.
3. Tokenize all rendered strings in ONE batched call; a token is supervised when its first character
   lies in an assistant span (offset mapping; no per-token Python loop).
4. Encode every image of the batch in ONE `vision_tokenizer.encode` call (precomputed codes skip it) and
   expand each `<|image|>` id into `<|boi|>` + h*w image ids + `<|eoi|>` (`ImageVocabulary.image_ids`):
   each sequence is cut at its placeholders and the pieces, text ids and image ids in turn, are joined
   by one `torch.cat`; an expanded image inherits its placeholder's supervision (the flag repeated over
   the image's span), so an image in an assistant turn is a generation target and one in a user turn is
   context.
5. Check the length against `max_length` (or truncate), pad (left by default, for generation) and stack.
"""

from __future__ import annotations

import json
import os
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
from mllm.vocab import ImageVocabulary

if TYPE_CHECKING:
    from PIL import Image

    from tokenizer_vision import DualCodebookTokenizer

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # labels the loss skips (PyTorch's cross_entropy default)
PART_SEPARATOR = "\n"  # between the content parts of one message (DEFAULT_CHAT_TEMPLATE does the same)
# tokenizer.model_max_length of a tokenizer that never set one is ~1e30; anything this large means "unset".
_UNSET_LENGTH = 10**8


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
    ) -> dict[str, torch.Tensor]:
        """One conversation (a list of messages) or a batch of them -> padded LongTensors (B, T).

        Returns `input_ids`, `attention_mask` (0 on padding) and `labels` (IGNORE_INDEX except on assistant
        tokens: reply text, the end-of-turn token, and images the assistant draws, <|boi|> codes <|eoi|>).
        Image parts: `{"type": "image", "image": PIL | path | bytes | data URL | base64}` (also "url" or
        "path" keys), `{"type": "image_url", "image_url": {"url": ...}}`, precomputed codes
        `{"type": "image", "codes": (h, w)}`, or a bare `{"type": "image"}` / a `<|image|>` typed in text,
        which take the next image of `images` (a flat list in conversation order, or one list per
        conversation). `add_generation_prompt=True` appends the assistant header for generation.
        A sequence longer than `max_length` (default: the context length) raises ValueError unless
        `truncation=True`: generation prompts lose their start, training sequences their end (never
        half an image).
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        batch = _as_batch(conversations)
        flattened = [self._flatten(conversation) for conversation in batch]
        self._bind_images(flattened, images)

        full, spans = self._render_with_spans([messages for messages, _ in flattened], add_generation_prompt)
        token_ids, supervised = self._tokenize(full, spans)

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
        return self._pad(sequences, padding_side)

    def render(self, conversation, add_generation_prompt: bool = False) -> str:
        """The chat template applied to one conversation, images as <|image|> (nothing is decoded)."""
        messages, _ = self._flatten(_as_batch(conversation)[0])
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
    def _flatten(self, conversation) -> tuple[list[dict[str, str]], list[Any]]:
        """Messages with string content (<|image|> for images) and the image sources in placeholder order.

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
                    sources += [_FromImages] * text.count(IMAGE_TOKEN)  # placeholders typed in the text
                    texts.append(text)
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
    def _bind_images(flattened: list[tuple[list, list]], images: Sequence[Any] | None) -> None:
        """Give each placeholder without its own image (typed <|image|>, bare image part) one of `images`."""
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
                raise ValueError(
                    f"the conversation has {sum(wanted)} image placeholders without an image "
                    f"({IMAGE_TOKEN} in text or bare image parts) but {len(queue)} images were given"
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

        Prefix rendering, which works for any template: the reply of assistant message i starts where
        render(messages[:i], add_generation_prompt=True) ends, provided that render is a prefix of the
        whole one, and ends with the first end-of-turn token after it. Two batched template calls (the
        conversations, then every prompt prefix). A template that is not prefix-consistent (one that
        rewrites earlier turns) falls back to finding the reply's own text.
        """
        full = self._apply_template(batch, add_generation_prompt)
        jobs, prompts = [], []  # jobs: (conversation, message index, index into prompts or None)
        for b, messages in enumerate(batch):
            for i, message in enumerate(messages):
                if message["role"] == "assistant":
                    jobs.append((b, i, len(prompts) if i > 0 else None))
                    if i > 0:
                        prompts.append(messages[:i])
        prompt_texts = self._apply_template(prompts, True)

        spans: list[list[tuple[int, int]]] = [[] for _ in batch]
        cursors = [0] * len(batch)
        eot = self.end_of_turn_token
        for b, i, prompt_index in jobs:
            text = full[b]
            close = -1
            if prompt_index is not None:
                start = len(prompt_texts[prompt_index])
                if start >= cursors[b] and text.startswith(prompt_texts[prompt_index]):
                    close = text.find(eot, start)
            if close >= 0:
                end = close + len(eot)
            else:
                start, end = _find_reply(text, batch[b][i]["content"], eot, cursors[b], i)
            spans[b].append((start, end))
            cursors[b] = end
        return full, spans

    def _tokenize(
        self, texts: list[str], spans: list[list[tuple[int, int]]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """All rendered strings in one batched call -> ids (T,) and supervised masks (T,) per sequence."""
        tokenizer = self.text_tokenizer
        need_offsets = any(spans)
        if need_offsets and not getattr(tokenizer, "is_fast", False):
            return self._tokenize_segments(texts, spans)
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=need_offsets)
        token_ids, supervised = [], []
        for index, text_spans in enumerate(spans):
            ids = torch.tensor(encoded["input_ids"][index], dtype=torch.long)
            mask = torch.zeros(len(ids), dtype=torch.bool)
            if text_spans:
                offsets = torch.tensor(encoded["offset_mapping"][index], dtype=torch.long).reshape(-1, 2)
                starts = offsets[:, 0]  # (T,) first character of each token
                bounds = torch.tensor(text_spans, dtype=torch.long)  # (S, 2)
                mask = ((starts[:, None] >= bounds[:, 0]) & (starts[:, None] < bounds[:, 1])).any(dim=1)
            token_ids.append(ids)
            supervised.append(mask)
        return token_ids, supervised

    def _tokenize_segments(self, texts, spans):
        """Tokenizers without offset mappings: cut at the span boundaries, tokenize the pieces (batched)."""
        pieces, owners = [], []
        for index, (text, text_spans) in enumerate(zip(texts, spans)):
            position = 0
            for start, end in text_spans:
                pieces += [(text[position:start], False), (text[start:end], True)]
                owners += [index, index]
                position = end
            pieces.append((text[position:], False))
            owners.append(index)
        encoded = self.text_tokenizer([piece for piece, _ in pieces], add_special_tokens=False)["input_ids"]
        ids = [[] for _ in texts]
        masks = [[] for _ in texts]
        for owner, (_, is_reply), piece_ids in zip(owners, pieces, encoded):
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
