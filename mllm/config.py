"""`MLLMConfig` (the `mllm_config.json` of a model folder) and the registry of named LLM sizes.

A model folder (described for users in docs/model.md):

    model_dir/
      mllm_config.json     this config: grid, K, image_offset, special-token ids, embedding mode, versions
      llm/                 plain HF causal LM (AutoModelForCausalLM loads it alone)
      tokenizer/           text tokenizer + chat template (AutoTokenizer loads it)
      vision_tokenizer/    DualCodebookTokenizer folder (config.json + model.safetensors)
      projector.safetensors   only for an unbaked `codebook`-mode model
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizer_vision.schema import check_keys, field_names

CONFIG_NAME = "mllm_config.json"
LLM_DIR = "llm"
TOKENIZER_DIR = "tokenizer"
VISION_TOKENIZER_DIR = "vision_tokenizer"
PROJECTOR_NAME = "projector.safetensors"

BOI_TOKEN = "<|boi|>"
EOI_TOKEN = "<|eoi|>"
IMAGE_TOKEN = "<|image|>"
EMBEDDING_MODES = ("learned", "codebook")
# How `mllm init` starts the image-id rows: a projection of the tokenizer's codebooks, or the mean row.
IMAGE_INITS = ("codebook", "mean")
VOCAB_PAD_MULTIPLE = 64

# Drawing defaults of every entry point (`MLLM.draw`, `mllm draw`, `mllm chat`, the server, `mllm eval`):
# the CFG scale and the sampling temperature of image codes. At temperature 1 a drawing too often mixes
# in an unlikely code (a stray second object, a wrong colour); below ~0.5 the codes collapse to the
# likeliest one, a blank patch, and an object asked for without a position goes missing. A higher CFG
# scale draws the asked-for object more often but places it less well. Measured on the demo's model:
# docs/experiments.md, "Drawing: sampling settings".
DRAW_GUIDANCE_SCALE = 3.0
DRAW_TEMPERATURE = 0.6
# Editing defaults (`MLLM.edit`, `mllm edit`, `POST /v1/images/edits`): what the unconditional branch of
# classifier-free guidance drops ("instruction": the source image alone; "both": the unconditional draw
# request; training drops each for a share of its edit examples), its scale and the sampling temperature.
# Measured on the demo model (docs/editing.md, "Guidance"): guidance that drops the instruction at 1.5 with
# temperature 0.3 gave 41.7% exact edits against 34.0% without guidance at 0.6 (greedy: 42.7%, but n
# edits would all be the same); dropping both keeps more objects but leaves more sources unchanged.
EDIT_GUIDANCE_MODES = ("instruction", "both")
EDIT_GUIDANCE = "instruction"
EDIT_GUIDANCE_SCALE = 1.5  # a model's own default is its config's `edit_guidance_scale` (this unless set)
EDIT_TEMPERATURE = 0.3
# How image codes are decoded (`mllm.generation.sample_image_codes`): "jacobi", speculative Jacobi decoding
# (several codes per forward pass, each accepted by the speculative-sampling rule), or "sequential" (one code
# per forward pass). Both draw from the same distribution and give the same codes when greedy. "jacobi" needs
# fewer passes but each pass carries a window of tokens per image, so it is faster for a few images at a time
# and slower for large batches on a CPU; "auto" (the default) picks "jacobi" for calls of up to
# JACOBI_AUTO_MAX_IMAGES images and "sequential" above (BENCHMARKS.md, "Image generation"). Here so that the
# commands can offer the choice without importing torch.
DECODING_METHODS = ("auto", "jacobi", "sequential")
DEFAULT_DECODING = "auto"
JACOBI_AUTO_MAX_IMAGES = 3  # measured crossover on a 2-core CPU, demo model: jacobi 1.05x at 3 images, 0.75x at 4


@dataclass
class MLLMConfig:
    """What ties the LLM, its text tokenizer and the visual tokenizer together.

    Ids: text ids are [0, image_offset); image code k (0 <= k < codebook_size) has id
    image_offset + k; rows at and above image_offset + codebook_size are padding (the embedding
    matrix is padded to a multiple of 64) and are never sampled.
    """

    image_offset: int  # = len(text tokenizer), special tokens included
    codebook_size: int  # K
    grid_size: tuple[int, int]  # (h, w) codes per image, raster order
    image_size: int  # pixels per side of the visual tokenizer
    boi_token_id: int
    eoi_token_id: int
    image_token_id: int  # the placeholder a processor expands into <|boi|> codes <|eoi|>
    end_of_turn_token_id: int  # what ends an assistant turn in the chat template
    pad_token_id: int
    vocab_size: int  # rows of the (padded) embedding matrix
    embedding_mode: str = "learned"  # "learned" | "codebook" (ETT: image rows = proj(codebooks))
    projector_hidden_size: int | None = None  # codebook mode: hidden width of the proj MLP
    boi_token: str = BOI_TOKEN
    eoi_token: str = EOI_TOKEN
    image_token: str = IMAGE_TOKEN
    draw_template: str = "Draw: {prompt}"
    caption_prompt: str = "Describe the image."
    vqa_template: str = "{question}"
    # The guidance scale of an edit that names none (`MLLM.edit`, `mllm edit`, /v1/images/edits, the edit
    # suites): the one measured best for this model (`mllm demo` writes its plan's; 1: no guidance).
    edit_guidance_scale: float = EDIT_GUIDANCE_SCALE
    # Chat, on a turn of one image followed by text (an edit as chat clients send it, or a question): the
    # reply starts with an image when the model gives `<|boi|>` at least this chance as the reply's first
    # token, even where another token is likelier. A model trained on instruction-first edits gives
    # image-first edits a small but clear chance of an image and questions almost none (docs/editing.md,
    # "Edits in chat"); `mllm demo` measures this threshold for its model. None: the plain decision.
    chat_image_threshold: float | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.grid_size = tuple(int(v) for v in self.grid_size)
        if self.embedding_mode not in EMBEDDING_MODES:
            raise ValueError(f"embedding_mode must be one of {EMBEDDING_MODES}, got {self.embedding_mode!r}")
        if len(self.grid_size) != 2 or min(self.grid_size) < 1:
            raise ValueError(f"grid_size must be (h, w) with positive sides, got {self.grid_size}")
        if self.vocab_size < self.image_offset + self.codebook_size:
            raise ValueError(
                f"vocab_size {self.vocab_size} cannot hold {self.image_offset} text ids + {self.codebook_size} image ids"
            )
        if not self.edit_guidance_scale > 0:
            raise ValueError(f"edit_guidance_scale must be positive (1: no guidance), got {self.edit_guidance_scale}")
        if self.chat_image_threshold is not None and not 0 < self.chat_image_threshold < 1:
            raise ValueError(f"chat_image_threshold must be in (0, 1) or null, got {self.chat_image_threshold}")
        specials = {"boi": self.boi_token_id, "eoi": self.eoi_token_id, "image": self.image_token_id}
        for name, token_id in specials.items():
            if not 0 <= token_id < self.image_offset:
                raise ValueError(f"{name} token id {token_id} must be a text id (< image_offset {self.image_offset})")

    @property
    def image_tokens_per_image(self) -> int:
        """h * w codes (the <|boi|> and <|eoi|> around them not counted)."""
        return self.grid_size[0] * self.grid_size[1]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["grid_size"] = list(self.grid_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MLLMConfig:
        check_keys(data, field_names(cls), CONFIG_NAME)
        return cls(**data)

    def save(self, model_dir: str | Path) -> None:
        path = Path(model_dir) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path) -> MLLMConfig:
        path = Path(model_dir) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} is not a model folder: {CONFIG_NAME} is missing (make one with `mllm init`)")
        return cls.from_dict(json.loads(path.read_text()))


def padded_vocab_size(rows: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return -(-rows // multiple) * multiple


# Named LLM sizes for `mllm init --llm NAME`: fresh Llama-architecture models with a
# sentencepiece text tokenizer trained on a text corpus. Real bases come from a local folder.
LLM_SIZES: dict[str, dict[str, Any]] = {
    # Tests: builds and runs a step in well under a second.
    "tiny": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "text_vocab_size": 256,
    },
    # The demo: learns the shapes world on 2 CPU cores in minutes. Wide and shallow on purpose: on a CPU the
    # per-layer elementwise work, attention and per-op overhead cost as much as the matmuls at this scale, so
    # 3 layers of 512 (head dim 64, MLP 4x) train at ~75% of the tokens/s of 6 layers of 256 with 2.4x the
    # parameters: ~50% model FLOP utilisation instead of ~33% (BENCHMARKS.md, "Training throughput").
    "shapes": {
        "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 3, "num_attention_heads": 8,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "text_vocab_size": 512,
    },
}
