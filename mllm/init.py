"""`mllm init`: a base LLM (+ a visual tokenizer) -> a unified model folder.

    mllm init --llm tiny|shapes|PATH --vision-tokenizer DIR|tiny|shapes --out DIR [--embedding learned|codebook]
              [--image-init codebook|mean]

`--llm tiny|shapes` builds a fresh Llama-architecture LM of a named size (`mllm.config.LLM_SIZES`)
with a sentencepiece text tokenizer trained on `--text-corpus` (default: the shapes world's texts).
`--llm PATH` extends any local HF causal LM folder (Llama, Qwen2, Mistral, Gemma, GPT-NeoX, ...)
through the Auto classes, offline and without remote code: the image special tokens (and a chat
template when the base has none) are added to its tokenizer and its embeddings are resized once,
padded to a multiple of 64, for the text specials + K image ids.

New rows (added special tokens, image ids, padding) start as the mean of the base's rows, input and
output side: the new ids then start with an average logit instead of dominating the softmax
(Hewitt, "Initializing new word embeddings for pretrained language models", 2021; transformers'
`mean_resizing` adds small noise around the same mean, we keep it exact and deterministic).
In `codebook` mode the image input rows come from the projector instead, initialised so its outputs
have the mean and spread of the base's rows, and a tied input/output embedding is untied (with a
tied head, baking the projected rows into the input matrix would change the logits).

`--image-init codebook` (the default) starts the image-id rows, input and (untied) output side, from
the tokenizer instead of the mean: a seeded random projection of each code's semantic + pixel codebook
rows (the projector's initial map), scaled to the mean and spread of the existing rows. Codes the
tokenizer sees as alike then start alike, for reading (input rows) and drawing (output rows), instead
of as 1024 identical (or unrelated random) rows that training must pull apart one by one. With a
trained tokenizer this is what lets the shapes demo learn in minutes. `--image-init mean` keeps every
new row at the mean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from mllm.config import CONFIG_NAME, EMBEDDING_MODES, IMAGE_INITS, LLM_SIZES, VISION_TOKENIZER_DIR
from mllm.model import (
    LLM_WEIGHT_FILES,
    CodebookProjector,
    UnifiedMLLM,
    codebook_feature_size,
    codebook_features,
    reading,
)
from tokenizer_vision import DualCodebookTokenizer
from tokenizer_vision.config import FRESH_TOKENIZER_SIZES, TOKENIZER_SIZES
from tokenizer_vision.schema import closest


def _load_vision_tokenizer(vision_tokenizer: str | Path | DualCodebookTokenizer) -> DualCodebookTokenizer:
    if isinstance(vision_tokenizer, DualCodebookTokenizer):
        return vision_tokenizer.eval()
    if str(vision_tokenizer) in TOKENIZER_SIZES and not Path(vision_tokenizer).exists():
        if str(vision_tokenizer) not in FRESH_TOKENIZER_SIZES:
            raise ValueError(
                f"--vision-tokenizer {vision_tokenizer}: this size needs a semantic teacher (a local CLIP/SigLIP/ViT "
                f"folder), so it has no fresh random form; train one with `mllm train-tokenizer --recipe "
                f"tokenizer-photo --teacher DIR ...` and give its folder, or use a named size "
                f"{list(FRESH_TOKENIZER_SIZES)} for a smoke run"
            )
        # A fresh, randomly initialised tokenizer of a named size: for tests and smoke runs only.
        return DualCodebookTokenizer.from_name(str(vision_tokenizer)).eval()
    path = Path(vision_tokenizer)
    if not path.is_dir():
        suggestion = closest(str(vision_tokenizer), FRESH_TOKENIZER_SIZES)
        hint = f"; did you mean {suggestion}?" if suggestion else " (train one with `mllm train-tokenizer`)"
        raise ValueError(
            f"--vision-tokenizer {vision_tokenizer!r} is neither a saved tokenizer folder nor one of the "
            f"named sizes {list(FRESH_TOKENIZER_SIZES)}{hint}"
        )
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            hint = (f"it is a model folder: its tokenizer is {path / VISION_TOKENIZER_DIR}"
                    if (path / CONFIG_NAME).is_file() else "give a folder written by `mllm train-tokenizer`")
            raise FileNotFoundError(f"--vision-tokenizer {path} is not a saved tokenizer: {name} is missing ({hint})")
    with reading(path, "vision tokenizer", "give a folder written by `mllm train-tokenizer`"):
        return DualCodebookTokenizer.from_pretrained(path)


def _text_corpus(text_corpus: str | Path | Iterable[str] | None, seed: int) -> list[str]:
    from mllm.text_tokenizer import shapes_text_corpus

    if text_corpus is None:
        return shapes_text_corpus(seed=seed)
    if isinstance(text_corpus, (str, Path)):
        if not Path(text_corpus).is_file():
            state = "is a folder" if Path(text_corpus).is_dir() else "does not exist"
            raise FileNotFoundError(f"--text-corpus {text_corpus} {state} (give a text file, one string per line)")
        with reading(Path(text_corpus), "text corpus", "give a UTF-8 text file, one string per line"):
            text = Path(text_corpus).read_text(encoding="utf-8")
        lines = [line.strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise ValueError(f"the text corpus {text_corpus} has no non-empty lines (give one string per line)")
        return lines
    return list(text_corpus)


def _fresh_llm(size: str, text_corpus, seed: int, vision_tokenizer, embedding: str):
    """A named-size Llama LM with a freshly trained text tokenizer; all its rows are random."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mllm.processor import MultimodalProcessor
    from mllm.text_tokenizer import train_text_tokenizer

    settings = dict(LLM_SIZES[size])
    text_vocab_size = settings.pop("text_vocab_size")
    text_tokenizer = train_text_tokenizer(_text_corpus(text_corpus, seed), vocab_size=text_vocab_size, seed=seed)
    processor, config = MultimodalProcessor.build(
        text_tokenizer, vision_tokenizer, embedding, settings["max_position_embeddings"]
    )
    llm_config = LlamaConfig(
        vocab_size=config.vocab_size,
        tie_word_embeddings=False,
        bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=text_tokenizer.eos_token_id,
        pad_token_id=config.pad_token_id,
        **settings,
    )
    llm = LlamaForCausalLM(llm_config)
    return llm, processor, config, config.image_offset  # reference rows: the text rows


# A base's tokenizer is in one of these (fast tokenizers: tokenizer.json; sentencepiece: tokenizer.model;
# byte-level BPE: vocab.json + merges.txt; tokenizer_config.json names the class).
BASE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@contextlib.contextmanager
def _library_refusal(path: Path, hint: str):
    """transformers' ValueError for a folder it cannot load as a causal LM (an unknown model type, a vision
    model, a tokenizer it cannot build) names neither the folder nor the option: add both, keep the first
    sentence (the rest lists every architecture it knows)."""
    try:
        yield
    except ValueError as error:
        text = " ".join(str(error).split())
        first = text.split(". ")[0].rstrip(".")
        raise ValueError(f"--llm {path} cannot be loaded as a causal LM: {first} ({hint})") from error


def _is_tied(llm: nn.Module) -> bool:
    output = llm.get_output_embeddings()
    return output is not None and output.weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()


def _untie_embeddings(llm: nn.Module) -> None:
    """Give the LM head its own copy of the (tied) embedding matrix, and say so in the config so
    save_pretrained / from_pretrained keep them apart."""
    output = llm.get_output_embeddings()
    output.weight = nn.Parameter(llm.get_input_embeddings().weight.detach().clone())
    llm.config.tie_word_embeddings = False
    llm.config.get_text_config().tie_word_embeddings = False


@torch.no_grad()
def _extend_base_llm(path: Path, vision_tokenizer, embedding: str):
    """Load a local HF causal LM + tokenizer, add the special tokens, resize the embeddings once and
    initialise every new row to the mean of the base's rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mllm.processor import MultimodalProcessor

    if not (path / "config.json").is_file():
        suggestion = closest(str(path), LLM_SIZES)
        hint = f"; did you mean {suggestion}?" if suggestion else ""
        if (path / CONFIG_NAME).is_file():
            hint = " (it is already a model folder: train or use it with --model)"
        where = "has no config.json" if path.is_dir() else "does not exist"
        raise ValueError(
            f"--llm {path} is neither a named size {sorted(LLM_SIZES)} nor a HF model folder ({where}){hint}"
        )
    if not any((path / name).is_file() for name in LLM_WEIGHT_FILES):
        raise FileNotFoundError(f"--llm {path} has no weights: {' or '.join(LLM_WEIGHT_FILES)} is missing (copy "
                                "the whole base model folder)")
    if not any((path / name).is_file() for name in BASE_TOKENIZER_FILES):
        raise FileNotFoundError(f"--llm {path} has no tokenizer: {' or '.join(BASE_TOKENIZER_FILES)} is missing "
                                "(copy the base model's tokenizer files into it)")
    hint = "give a local Hugging Face causal LM folder: Llama, Qwen2, Mistral, Gemma, ..."
    with reading(path, "--llm base model", "a file is damaged: copy the base model folder again"), \
            _library_refusal(path, hint):
        text_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # dtype="auto": the base's own dtype (a 7B base stays bf16 instead of doubling in float32).
        llm = AutoModelForCausalLM.from_pretrained(path, dtype="auto", local_files_only=True)
    base_rows = llm.get_input_embeddings().weight.shape[0]
    # The base's trained rows are its tokenizer's; rows past len(tokenizer) (Qwen2 pads its matrix)
    # were never trained and are re-initialised like the new ones.
    reference_rows = min(len(text_tokenizer), base_rows)
    context_length = int(llm.config.get_text_config().max_position_embeddings)
    # build() prepares the tokenizer in place (prepare_text_tokenizer: image tokens, chat template when
    # the base has none, pad token) and derives the config: image_offset = len(tokenizer) after that.
    processor, config = MultimodalProcessor.build(text_tokenizer, vision_tokenizer, embedding, context_length)

    input_weight = llm.get_input_embeddings().weight
    input_mean = input_weight[:reference_rows].float().mean(0)  # (H,)
    output = llm.get_output_embeddings()
    tied = _is_tied(llm)
    output_mean = None if tied else output.weight[:reference_rows].float().mean(0)
    output_bias_mean = None
    if getattr(output, "bias", None) is not None:
        output_bias_mean = output.bias[:reference_rows].float().mean()

    llm.resize_token_embeddings(config.vocab_size, pad_to_multiple_of=64, mean_resizing=False)
    llm.get_input_embeddings().weight[reference_rows:] = input_mean.to(input_weight.dtype)
    output = llm.get_output_embeddings()
    if output_mean is not None:
        output.weight[reference_rows:] = output_mean.to(output.weight.dtype)
    if output_bias_mean is not None:
        output.bias[reference_rows:] = output_bias_mean.to(output.bias.dtype)
    if embedding == "codebook" and _is_tied(llm):
        _untie_embeddings(llm)
    llm.config.pad_token_id = config.pad_token_id
    llm.config.get_text_config().pad_token_id = config.pad_token_id
    return llm, processor, config, reference_rows


@torch.no_grad()
def _codebook_image_rows(llm: nn.Module, vision, config, reference_rows: int,
                         projector: CodebookProjector | None, seed: int) -> None:
    """Image-id rows <- the projected codebook features, at the statistics of the first `reference_rows`
    rows: the input side in learned mode (codebook mode: the projector already supplies them), the output
    side whenever the head is untied (a tied head shares the input rows)."""
    features = codebook_features(vision, torch.arange(config.codebook_size)).float()  # (K, d_sem + d_pix)
    if projector is None:
        torch.manual_seed(seed)
        hidden = int(llm.get_input_embeddings().weight.shape[1])
        projector = CodebookProjector(features.shape[1], hidden, hidden)
    fc1, fc2 = projector.fc1, projector.fc2
    hidden_features = projector.act(nn.functional.linear(features, fc1.weight.float(), fc1.bias.float()))
    raw = nn.functional.linear(hidden_features, fc2.weight.float())  # (K, H)
    start = config.image_offset
    end = start + config.codebook_size
    standard = (raw - raw.mean(0)) / (raw - raw.mean(0)).std().clamp_min(1e-12)  # (K, H)

    def fill(weight: torch.Tensor) -> None:
        reference = weight[:reference_rows].float()
        rows = reference.mean(0) + standard * (reference - reference.mean(0)).std()
        weight[start:end] = rows.to(weight.dtype)

    input_weight = llm.get_input_embeddings().weight
    if config.embedding_mode == "learned":
        fill(input_weight)
    output = llm.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != input_weight.data_ptr():
        fill(output.weight)


def init_model(
    llm: str | Path,
    vision_tokenizer: str | Path | DualCodebookTokenizer,
    out: str | Path,
    embedding: str = "learned",
    text_corpus: str | Path | Iterable[str] | None = None,
    seed: int = 0,
    projector_hidden_size: int | None = None,
    overwrite: bool = False,
    image_init: str = "codebook",
) -> Path:
    """Build a unified model folder at `out` and return its path.

    llm: a named size ("tiny", "shapes": a fresh Llama with a text tokenizer trained on `text_corpus`,
    a file of lines or a list of strings; default the shapes world's texts) or a local HF model folder.
    vision_tokenizer: a saved DualCodebookTokenizer folder, a loaded one, or a named size ("tiny",
    "shapes": a fresh random tokenizer, for tests and smoke runs). embedding: "learned" | "codebook".
    projector_hidden_size: codebook mode, the projector's hidden width (default: the LLM's hidden size).
    image_init: "codebook" (image rows from the tokenizer's codebooks) | "mean" (see the module docstring).
    """
    if embedding not in EMBEDDING_MODES:
        raise ValueError(f"embedding must be one of {EMBEDDING_MODES}, got {embedding!r}")
    if image_init not in IMAGE_INITS:
        raise ValueError(f"image_init must be one of {IMAGE_INITS}, got {image_init!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    torch.manual_seed(seed)
    vision = _load_vision_tokenizer(vision_tokenizer)
    if str(llm) in LLM_SIZES and not Path(llm).exists():
        language_model, processor, config, reference_rows = _fresh_llm(str(llm), text_corpus, seed, vision, embedding)
    else:
        if text_corpus is not None:
            raise ValueError("--text-corpus is for a named --llm size; a base model folder brings its own tokenizer "
                             "(leave --text-corpus out)")
        language_model, processor, config, reference_rows = _extend_base_llm(Path(llm), vision, embedding)

    projector = None
    if embedding == "codebook":
        hidden = int(language_model.get_input_embeddings().weight.shape[1])
        config.projector_hidden_size = projector_hidden_size or hidden
        projector = CodebookProjector(codebook_feature_size(vision), config.projector_hidden_size, hidden)
        with torch.no_grad():
            features = codebook_features(vision, torch.arange(config.codebook_size))  # (K, d_sem + d_pix)
            reference = language_model.get_input_embeddings().weight[:reference_rows]
            projector.match_statistics(features, reference)
        projector.to(language_model.dtype)
    if image_init == "codebook":
        _codebook_image_rows(language_model, vision, config, reference_rows, projector, seed)
    model = UnifiedMLLM(config, language_model, vision, processor, projector)
    model.sync_image_embeddings()
    return model.save_pretrained(out, bake=False)


def describe_model(out: Path) -> str:
    """What `mllm init` prints about the folder it wrote."""
    model = UnifiedMLLM.from_pretrained(out)
    config = model.config
    return (
        f"wrote {out}\n"
        f"  llm: {type(model.llm).__name__}, {model.num_parameters() / 1e6:.2f}M parameters, "
        f"context {model.context_length}, {config.embedding_mode} image embeddings\n"
        f"  vocabulary: {config.image_offset} text ids, {config.codebook_size} image ids from {config.image_offset}, "
        f"{config.vocab_size} rows; images are {config.grid_size[0]}x{config.grid_size[1]} codes of "
        f"{config.image_size}px"
    )


__all__ = ["IMAGE_INITS", "describe_model", "init_model"]
