"""`mllm init`: a base LLM (+ a visual tokenizer) -> a unified model folder (mllm.init.init_model)."""

from __future__ import annotations

import argparse

from mllm.commands.types import positive_int
from mllm.config import EMBEDDING_MODES, IMAGE_INITS, LLM_SIZES
from tokenizer_vision.config import FRESH_TOKENIZER_SIZES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--llm", required=True,
        help=f"a named size {sorted(LLM_SIZES)} (a fresh Llama-architecture LM with a sentencepiece tokenizer "
        "trained on --text-corpus) or a local Hugging Face causal LM folder (Llama, Qwen2, Mistral, Gemma, "
        "GPT-NeoX, ...; loaded offline, never with remote code)",
    )
    parser.add_argument(
        "--vision-tokenizer", required=True,
        help="a folder written by `mllm train-tokenizer`, or a named size "
        f"{list(FRESH_TOKENIZER_SIZES)} for a fresh RANDOMLY INITIALISED tokenizer (tests and smoke runs only)",
    )
    parser.add_argument("--out", required=True, help="the model folder to write")
    parser.add_argument(
        "--embedding", choices=EMBEDDING_MODES, default="learned",
        help="image input embeddings: ordinary trainable rows ('learned'), or projected from the tokenizer's "
        "codebooks ('codebook', for end-to-end tuning; baked into rows when saved later). Default: learned",
    )
    parser.add_argument(
        "--text-corpus", default=None,
        help="named --llm only: a text file, one training string per line, for the text tokenizer "
        "(default: captions, questions and prompts of the shapes world)",
    )
    parser.add_argument("--projector-hidden-size", type=positive_int, default=None,
                        help="codebook mode: hidden width of the projector MLP (default: the LLM's hidden size)")
    parser.add_argument(
        "--image-init", choices=IMAGE_INITS, default="codebook",
        help="how the image-id rows start: a projection of the tokenizer's codebooks, so codes that look alike "
        "start alike ('codebook', default), or the mean of the existing rows ('mean')",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random initialisation (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    from mllm.init import describe_model, init_model

    out = init_model(
        args.llm,
        args.vision_tokenizer,
        args.out,
        embedding=args.embedding,
        text_corpus=args.text_corpus,
        seed=args.seed,
        projector_hidden_size=args.projector_hidden_size,
        overwrite=args.overwrite,
        image_init=args.image_init,
    )
    print(describe_model(out))
    return 0
