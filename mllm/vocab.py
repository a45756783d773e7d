"""The one owner of the image-code <-> LLM-id mapping and of the special tokens.

Image code k has LLM id `image_offset + k`. The K image ids are NOT added to the text tokenizer
as strings (that makes tokenization slow); they are mapped arithmetically here. Anything that
turns codes into ids, ids into codes, or asks "is this an image id?" goes through this module
(the same single-owner rule as transformers' `ChameleonImageVocabularyMapping`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mllm.config import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, MLLMConfig


class ImageVocabulary:
    """Arithmetic mapping between image codes and LLM ids, plus the image special tokens."""

    def __init__(self, config: MLLMConfig):
        self.config = config
        self.image_offset = config.image_offset
        self.codebook_size = config.codebook_size
        self.grid_size = config.grid_size
        self.boi_token_id = config.boi_token_id
        self.eoi_token_id = config.eoi_token_id
        self.image_token_id = config.image_token_id

    # ------------------------------------------------------------------ ranges
    @property
    def image_id_range(self) -> tuple[int, int]:
        """[start, end) of the image ids."""
        return self.image_offset, self.image_offset + self.codebook_size

    @property
    def tokens_per_image(self) -> int:
        """Ids one image occupies in a sequence: <|boi|> + h*w codes + <|eoi|>."""
        return self.config.image_tokens_per_image + 2

    def is_image_id(self, ids: torch.Tensor) -> torch.Tensor:
        start, end = self.image_id_range
        return (ids >= start) & (ids < end)

    # ------------------------------------------------------------------ mapping
    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"image codes must lie in [0, {self.codebook_size}); got [{int(codes.min())}, {int(codes.max())}]"
            )
        return codes.long() + self.image_offset

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        if ids.numel() and not bool(self.is_image_id(ids).all()):
            bad = ids[~self.is_image_id(ids)]
            start, end = self.image_id_range
            raise ValueError(f"ids {bad[:5].tolist()} are not image ids (image ids are [{start}, {end}))")
        return ids.long() - self.image_offset

    def image_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """One image's codes (h, w) or (h*w,) -> [<|boi|>, ids in raster order..., <|eoi|>]."""
        codes = torch.as_tensor(codes).reshape(-1)
        if codes.numel() != self.config.image_tokens_per_image:
            raise ValueError(
                f"an image has {self.config.image_tokens_per_image} codes ({self.grid_size[0]}x{self.grid_size[1]}), "
                f"got {codes.numel()}"
            )
        body = self.codes_to_ids(codes)
        return torch.cat([body.new_tensor([self.boi_token_id]), body, body.new_tensor([self.eoi_token_id])])

    def find_images(self, ids: Sequence[int] | torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Complete images in one sequence: [(position of <|boi|>, codes (h, w)), ...].

        An image is <|boi|> followed by exactly h*w image ids and <|eoi|>; anything else
        (e.g. a generation cut short) is not returned.
        """
        ids = torch.as_tensor(ids).reshape(-1)
        n = self.config.image_tokens_per_image
        found = []
        for start in (ids == self.boi_token_id).nonzero().flatten().tolist():
            end = start + 1 + n
            if end < len(ids) and int(ids[end]) == self.eoi_token_id and bool(self.is_image_id(ids[start + 1 : end]).all()):
                found.append((start, self.ids_to_codes(ids[start + 1 : end]).reshape(self.grid_size)))
        return found


def add_image_special_tokens(text_tokenizer) -> dict[str, int]:
    """Add <|boi|>, <|eoi|>, <|image|> to a HF text tokenizer (idempotent); return their ids."""
    tokens = [BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN]
    missing = [t for t in tokens if t not in text_tokenizer.get_vocab()]
    if missing:
        text_tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return {t: text_tokenizer.convert_tokens_to_ids(t) for t in tokens}


def reserved_strings(text_tokenizer) -> tuple[str, ...]:
    """The strings a text tokenizer turns into special ids: its special added tokens (the chat template's
    markers, <|boi|> <|eoi|> <|image|>, bos / eos / pad / unk), longest first.

    Typed in a message they would forge control ids (a fake end of turn, an image that is not one), so
    the processor tokenizes message text with these strings as ordinary text (`MultimodalProcessor`).
    """
    found = {token.content for token in text_tokenizer.added_tokens_decoder.values() if token.special}
    found.update(text_tokenizer.all_special_tokens)
    return tuple(sorted((s for s in found if s), key=lambda s: (-len(s), s)))


def special_token_ids(text_tokenizer) -> frozenset[int]:
    """The ids of the strings `reserved_strings` lists."""
    ids = {token_id for token_id, token in text_tokenizer.added_tokens_decoder.items() if token.special}
    ids.update(text_tokenizer.all_special_ids)
    return frozenset(int(i) for i in ids)
