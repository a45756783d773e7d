"""The single `mllm` command.

Each subcommand names the module that implements it; the module is imported only when that
subcommand runs, so `mllm --help` stays instant (no torch/transformers import). A module
exposes `add_arguments(parser)` and `run(args) -> int`.

Subcommands are listed here as their features land; nothing is listed that does not work.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module implementing it, one-line help). The modules of training/eval/serve are named
# by string and imported lazily: the CLI is the one place that dispatches to the recipes.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("mllm.data.cli", "make the shapes world as shards or LLaVA JSON; convert LLaVA JSON to shards"),
    "pretokenize": ("mllm.data.pretokenize", "replace the images of shards by their vision-tokenizer codes"),
    "train-teacher": ("training.train_teacher", "train a tiny CLIP teacher for the tokenizer's semantic branch"),
    "train-tokenizer": ("training.train_tokenizer", "train the dual-codebook visual tokenizer"),
    "eval-tokenizer": ("eval.tokenizer_metrics", "PSNR, SSIM, codebook use, semantic cosine, judge agreement"),
    "init": ("mllm.init", "base LLM (+ vision tokenizer) -> unified model folder"),
    "caption": ("mllm.commands.caption", "describe image(s) with a model folder"),
    "ask": ("mllm.commands.ask", "answer a question about an image with a model folder"),
    "draw": ("mllm.commands.draw", "draw image(s) from a text prompt with a model folder"),
    "train": ("training.train_llm", "train the unified model with a staged recipe (align, pretrain, sft, ett; LoRA, QLoRA or full)"),
    "merge": ("mllm.merge", "base model folder + LoRA adapter -> full model folder"),
    "chat": ("mllm.commands.chat", "chat with a model in the terminal (/image PATH, /draw PROMPT, /reset, /quit)"),
    "serve": ("serve.cli", "OpenAI-compatible HTTP server (chat completions with images, image generation) + web chat"),
    "demo": ("mllm.demo", "the whole pipeline on the shapes world: data, tokenizer, model, evaluation, report"),
    "eval": ("eval.runner", "run a model over an evaluation suite (VQA, captioning, generation); resumable"),
    "eval-score": ("eval.score", "score a predictions file with a suite's official rules, without a model"),
}


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: a clear message instead of a crash further down."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _top_level_help() -> str:
    width = max(len(name) for name in COMMANDS) + 2
    lines = [
        "usage: mllm <command> [options]",
        "",
        "One next-token decoder that reads and draws images.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}{summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `mllm <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_level_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"mllm {version('mllm')}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"mllm: unknown command {name!r}\n\n{_top_level_help()}", file=sys.stderr)
        return 2
    module_name, summary = COMMANDS[name]
    # transformers' per-load "Loading weights" bars are noise in a one-shot command; our own
    # progress bars (tqdm) are unaffected.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mllm {name}", description=summary)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
