"""LoRA and QLoRA on the unified model's LLM, through peft.

    model = UnifiedMLLM.from_pretrained(dir)        # or load_base_4bit(dir) for QLoRA
    add_lora(model, LoraSettings(r=16))             # model.llm becomes a peft model
    ... train ...
    model.llm.save_pretrained(adapter_dir)          # adapter_config.json + adapter_model.safetensors
    UnifiedMLLM.from_pretrained(dir, adapter=adapter_dir)   # or `mllm merge` -> a full model folder

The rows `mllm init` added to the base's vocabulary (the chat and image special tokens and the K image
ids) start as the mean of the base's rows: a LoRA on the attention and MLP projections alone could never
teach the model to read or write them. They train as peft "trainable tokens" (TrainableTokensModel,
`LoraConfig.trainable_token_indices`): a small delta for just those rows of the input embedding and, for
an untied head, of the LM head, saved in the adapter file and folded in by `merge_and_unload`. Training
the whole embedding matrices instead (`modules_to_save`) would put two V x H matrices in every adapter.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mllm.config import MLLMConfig
from mllm.model import UnifiedMLLM

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# peft's PeftModel.__init__ (0.21 and earlier) reads `model.is_gradient_checkpointing`, a property transformers 5
# deprecated for `is_activation_checkpointing`: every adapter created or loaded printed a FutureWarning that
# no argument of ours avoids. Exactly that message is silenced around the peft calls (`quiet_peft`).
PEFT_DEPRECATION_MESSAGE = r"`is_gradient_checkpointing` is deprecated"


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Run peft calls (get_peft_model, PeftModel.from_pretrained) without the FutureWarning peft itself
    triggers in transformers 5 (PEFT_DEPRECATION_MESSAGE); every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATION_MESSAGE, category=FutureWarning)
        yield


@dataclass
class LoraSettings:
    """What `add_lora` puts on the LLM (a recipe's `lora:` section, parsed by `tokenizer_vision.schema`,
    which refuses unknown keys). target_modules: module-name suffixes, or "all-linear" (peft:
    every linear layer except the output head), for architectures whose projections are named otherwise
    (GPT-NeoX's query_key_value, dense_h_to_4h, ...)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    train_new_rows: bool = True  # train the added special-token and image-id rows (trainable tokens)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ValueError(
                f"target_modules must be a list of module names or 'all-linear', got {self.target_modules!r}"
            )


def new_token_ids(model: UnifiedMLLM) -> list[int]:
    """The ids `mllm init` added to the base vocabulary: the chat tokens it added (when the base had no
    chat template), <|boi|> <|eoi|> <|image|>, and the K image ids. Padding rows past the image ids are
    never seen, so they are left out.

    `prepare_text_tokenizer` adds the chat tokens, then the image tokens, each block at the end of the
    text vocabulary; so the added text ids are the image special tokens plus the chat tokens directly
    before them (a base's own chat tokens, e.g. Qwen2's <|im_end|>, sit elsewhere and were trained).
    """
    from mllm.text_tokenizer import CHAT_TOKENS

    config = model.config
    first = min(config.boi_token_id, config.eoi_token_id, config.image_token_id)
    tokenizer = model.processor.text_tokenizer
    while first > 0 and tokenizer.convert_ids_to_tokens(first - 1) in CHAT_TOKENS:
        first -= 1
    return list(range(first, config.image_offset + config.codebook_size))


def _module_name(llm: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in llm.named_modules() if candidate is module)


def _tied(llm: nn.Module) -> bool:
    output = llm.get_output_embeddings()
    return output is not None and output.weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()


def _trainable_token_indices(model: UnifiedMLLM, llm: nn.Module) -> dict[str, list[int]]:
    """{embedding module name: ids} for peft's trainable tokens.

    A tied head is covered by peft itself (it ties a wrapper on the head to the embedding's delta); an
    untied head is named explicitly. In codebook mode the image ids' INPUT rows come from the projector
    (and `bake` overwrites them), so only their output rows train.
    """
    ids = new_token_ids(model)
    input_ids = ids
    if model.config.embedding_mode == "codebook":
        input_ids = [i for i in ids if i < model.config.image_offset]
    indices = {_module_name(llm, llm.get_input_embeddings()): input_ids}
    output = llm.get_output_embeddings()
    if output is not None and not _tied(llm):
        indices[_module_name(llm, output)] = ids
    return indices


def add_lora(model: UnifiedMLLM, settings: LoraSettings | None = None):
    """Wrap `model.llm` in a peft LoRA model (in place) and return it.

    Only the LoRA matrices and (with `settings.train_new_rows`) the new vocabulary rows train; everything
    else is frozen, the visual tokenizer and a codebook-mode projector included (a recipe that tunes them
    as well sets their requires_grad and saves them itself: they are not part of the adapter).
    """
    from peft import LoraConfig, get_peft_model

    settings = settings or LoraSettings()
    llm = model.llm
    if type(llm).__module__.startswith("peft"):
        raise ValueError("the LLM already carries a peft adapter: merge it first (`model.merge_adapter()`)")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        trainable_token_indices=_trainable_token_indices(model, llm) if settings.train_new_rows else None,
        task_type="CAUSAL_LM",
    )
    model.vision_tokenizer.requires_grad_(False)
    if model.projector is not None:
        model.projector.requires_grad_(False)
    with quiet_peft():
        model.llm = get_peft_model(llm, config)
    return model.llm


def load_base_4bit(
    model_dir: str | os.PathLike,
    compute_dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = True,
) -> UnifiedMLLM:
    """A model folder with its LLM quantized to 4-bit NF4 for QLoRA (Dettmers et al., 2023).

    On CUDA the LLM goes to the GPU and computes in bf16 (where supported); elsewhere it stays on the CPU
    (bitsandbytes' CPU backend runs 4-bit) and computes in float32. `peft.prepare_model_for_kbit_training`
    then freezes the base and keeps the norms and the head in float32, and (`gradient_checkpointing`)
    activation checkpointing is turned on. Call `add_lora` next.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        # A user error, not a bug: one line with the exact command (the `mllm` on PyPI is another project).
        raise ValueError(
            "quantization: 4bit (QLoRA) needs bitsandbytes, which this environment lacks (install it with "
            f"`{sys.executable} -m pip install 'bitsandbytes>=0.48'`, or `make install` in the checkout)"
        ) from None
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    model_dir = Path(model_dir)
    MLLMConfig.load(model_dir)  # a clear error for a folder that is not a model folder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if compute_dtype is None:
        bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
        compute_dtype = torch.bfloat16 if bf16 else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )
    model = UnifiedMLLM.from_pretrained(model_dir, device=device, quantization_config=quantization)
    # peft would turn checkpointing on through `gradient_checkpointing_enable`, deprecated in transformers 5
    # (a FutureWarning per run): it only freezes and upcasts here, and checkpointing is turned on below.
    model.llm = prepare_model_for_kbit_training(model.llm, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_activation_checkpointing(model.llm)
    if model.projector is not None:
        model.projector.float()
    return model


def enable_activation_checkpointing(llm) -> None:
    """Activation (gradient) checkpointing on a transformers model, non-reentrant (torch deprecates the
    reentrant variant; the non-reentrant one also needs no input that requires grad), through the current
    API (`activation_checkpointing_enable`) where this transformers has it."""
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers releases before the rename
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LoraSettings",
    "add_lora",
    "enable_activation_checkpointing",
    "is_adapter_dir",
    "load_base_4bit",
    "new_token_ids",
    "quiet_peft",
]
