"""`mllm eval-score`: score a predictions file with a suite's official rules, without a model.

Reads predictions in the suite's format (vqav2 also takes the official results list,
`[{"question_id", "answer"}]`), prints the table, then `<primary metric> <value>` as the last line.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from eval.suites import suite_names

    parser.add_argument("--suite", required=True, help=f"one of: {', '.join(suite_names())}")
    parser.add_argument("--predictions", required=True,
                        help="predictions: JSONL of {id, answer} (or the suite's official results format)")
    parser.add_argument("--data", help="the benchmark's annotation files (e.g. a folder with the VQAv2 questions "
                                       "and annotations JSON)")
    parser.add_argument("--option", nargs="*", default=[], metavar="KEY=VALUE",
                        help="suite options, as for `mllm eval`: e.g. normalize=lmms-eval (vqav2, textvqa, vizwiz, "
                             "gqa: normalise every answer as lmms-eval does; default official)")


def run(args: argparse.Namespace) -> int:
    from eval.runner import parse_options, score_file

    score_file(args.suite, args.predictions, data=args.data, options=parse_options(args.option))
    return 0
