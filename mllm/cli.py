"""The single `mllm` command.

Every subcommand is a module of `mllm/commands/` exposing `add_arguments(parser)` and `run(args) -> int`:
a thin adapter that parses options and calls one library function. The module is imported only when
that subcommand runs, so `mllm --help` stays instant (no torch/transformers import).

A user error (a wrong path, name, value or file format) is raised by the library as a ValueError or a
file error; this dispatcher prints it as one line, `mllm <command>: error: ...`, and exits with 2.
Any other exception is a bug and keeps its traceback. The command sits above every layer of the
project (tokenizer_vision <- mllm <- training, eval, serve <- demo): its modules import those layers
lazily, inside `run`, and nothing imports them. Several processes: `torchrun ... -m mllm.cli train ...`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

# name -> (module implementing it, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("mllm.commands.data", "make the shapes world as shards or LLaVA JSON; convert LLaVA JSON to shards"),
    "pretokenize": ("mllm.commands.pretokenize", "replace the images of shards by their vision-tokenizer codes"),
    "train-teacher": ("mllm.commands.train_teacher", "train a tiny CLIP teacher for the tokenizer's semantic branch"),
    "train-tokenizer": ("mllm.commands.train_tokenizer", "train the dual-codebook visual tokenizer"),
    "tune-encoder": ("mllm.commands.tune_encoder", "teach a shapes tokenizer's encoder objects anywhere in their cell (codes unchanged)"),
    "eval-tokenizer": ("mllm.commands.eval_tokenizer", "PSNR, SSIM, codebook use, semantic cosine, judge agreement"),
    "init": ("mllm.commands.init", "base LLM (+ vision tokenizer) -> unified model folder"),
    "caption": ("mllm.commands.caption", "describe image(s) with a model folder"),
    "ask": ("mllm.commands.ask", "answer a question about an image with a model folder"),
    "draw": ("mllm.commands.draw", "draw image(s) from a text prompt with a model folder"),
    "edit": ("mllm.commands.edit", 'edit an image with a model folder ("make the circle blue", "remove the square")'),
    "train": ("mllm.commands.train", "train the unified model with a staged recipe (align, pretrain, sft, ett; LoRA, QLoRA or full)"),
    "merge": ("mllm.commands.merge", "base model folder + LoRA adapter -> full model folder"),
    "chat-threshold": ("mllm.commands.chat_threshold", "measure and set when chat answers an image and an instruction with an image"),
    "chat": ("mllm.commands.chat", "chat with a model in the terminal (/image PATH, /draw PROMPT, /reset, /quit)"),
    "serve": ("mllm.commands.serve", "OpenAI-compatible HTTP server (chat completions with images, image generation) + web chat"),
    "demo": ("mllm.commands.demo", "the whole pipeline on the shapes world: data, tokenizer, model, evaluation, report"),
    "eval": ("mllm.commands.eval", "run a model over an evaluation suite (VQA, captioning, generation); resumable"),
    "eval-score": ("mllm.commands.eval_score", "score a predictions file with a suite's official rules, without a model"),
}


class CommandParser(argparse.ArgumentParser):
    """argparse with the dispatcher's error style: one line naming the option, no usage block."""

    def error(self, message: str):
        invalid = re.match(r"argument (\S+): invalid choice: '(.*)' \(choose from (.*)\)$", message)
        if invalid:  # argparse lists the choices; add the closest one, as every other unknown name gets
            from tokenizer_vision.schema import closest

            option, value, choices = invalid.groups()
            suggestion = closest(value, re.findall(r"'([^']*)'", choices))
            if suggestion:
                message = f"argument {option}: invalid choice {value!r}; did you mean {suggestion}? (choose from {choices})"
        # `mllm data shapes: ...` would break the one prefix every error line of a command starts with.
        command = " ".join(self.prog.split()[:2])
        self.exit(2, f"{command}: error: {message} (see `{self.prog} --help`)\n")


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


def main(argv: list[str] | None = None, use_worker: bool = True) -> int:
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
        from tokenizer_vision.schema import closest

        suggestion = closest(name, COMMANDS)
        hint = f" (did you mean {suggestion}?)" if suggestion else " (run `mllm --help` for the list)"
        print(f"mllm: error: unknown command {name!r}{hint}", file=sys.stderr)
        return 2
    module_name, summary = COMMANDS[name]
    # transformers' per-load "Loading weights" bars are noise in a one-shot command; our own
    # progress bars (tqdm) are unaffected.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    module = importlib.import_module(module_name)
    parser = CommandParser(prog=f"mllm {name}", description=summary)
    module.add_arguments(parser)
    from mllm.commands import worker  # standard library only

    if name in worker.WORKER_COMMANDS:
        parser.add_argument("--no-worker", action="store_true",
                            help="run in this process, not in the warm background worker (also: MLLM_WORKER=0)")
    args = parser.parse_args(argv[1:])
    if use_worker and name in worker.WORKER_COMMANDS and not args.no_worker and worker.enabled():
        # The warm worker answers in a fraction of the start-up time (mllm/commands/worker.py); when it is
        # unavailable nothing has been printed yet and the command runs here.
        try:
            return worker.run_in_worker(argv)
        except worker.WorkerUnavailable:
            pass
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as error:
        # The library raises ValueError (a bad value, named with the valid choices) or a file error
        # for what the user can fix; everything else is a bug and keeps its traceback.
        if os.environ.get("MLLM_TRACEBACK"):
            raise
        print(f"mllm {name}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mllm {name}: interrupted", file=sys.stderr)
        return 130


# What a user can fix: wrong values, names, paths and file formats. Set MLLM_TRACEBACK=1 to see where
# one was raised.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = " ".join(str(error).split()) or type(error).__name__
    return text


if __name__ == "__main__":
    sys.exit(main())
