"""`mllm tune-encoder --model DIR [--steps N] [--out DIR]`.

Teaches a trained shapes tokenizer's encoder to read objects anywhere in their cell, codebooks and decoder
unchanged, so a model trained on the tokenizer's codes keeps working without new training
(training/tune_encoder.py; docs/tokenizer.md, "Objects anywhere in the cell").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm.commands.types import non_negative_float, positive_float, positive_int

EPILOG = """\
The model folder's vision_tokenizer/ (or a tokenizer folder) is changed in place unless --out names a copy;
the figures (judge agreement on held-out scenes with objects anywhere in the cell, before and after, and the
share of exact renders' codes kept) are printed and written to encoder_tuning.json beside the weights.

examples:
  mllm tune-encoder --model runs/demo/model
  mllm tune-encoder --model runs/demo/tokenizer --out runs/demo/tokenizer-anywhere --steps 600
See docs/tokenizer.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.tune_encoder import EncoderTuneConfig

    defaults = EncoderTuneConfig()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Tune a shapes tokenizer's encoder (codebooks and decoder frozen) so that scenes whose objects sit\n"
        "anywhere in their cell get the codes of their exact render."
    )
    parser.epilog = EPILOG
    parser.add_argument("--model", required=True, type=Path, help="model folder (its vision_tokenizer/) or tokenizer folder")
    parser.add_argument("--out", type=Path, help="write the tuned tokenizer here instead of in place")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    parser.add_argument("--learning-rate", type=positive_float, default=defaults.learning_rate,
                        help=f"AdamW learning rate of the encoder (default {defaults.learning_rate:g})")
    parser.add_argument("--scenes", type=positive_int, default=defaults.scenes,
                        help=f"training scenes, each rendered three ways (default {defaults.scenes})")
    parser.add_argument("--check-scenes", type=positive_int, default=defaults.check_scenes,
                        help=f"held-out scenes for the before/after figures (default {defaults.check_scenes})")
    parser.add_argument("--preference-margin", type=non_negative_float, default=defaults.preference_margin,
                        help="the tuned tokenizer's code_preference_margin: among codes this close to the nearest, "
                             f"the common one (default {defaults.preference_margin:g}; 0: keep the tokenizer's own)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of the batches (default {defaults.seed})")


def run(args: argparse.Namespace) -> int:
    from training.tune_encoder import EncoderTuneConfig, tune_encoder

    cfg = EncoderTuneConfig(steps=args.steps, learning_rate=args.learning_rate, scenes=args.scenes,
                            check_scenes=args.check_scenes, seed=args.seed,
                            preference_margin=args.preference_margin or None)
    figures = tune_encoder(args.model, cfg, out=args.out)
    print(f"judge agreement, objects anywhere in the cell: {figures['anywhere_judge_agreement_before']}% before, "
          f"{figures['anywhere_judge_agreement']}% after; varied world {figures['varied_judge_agreement']}%")
    print(f"exact renders' codes kept: {figures['exact_codes_kept']}%; varied renders given their exact render's "
          f"codes: {figures['varied_codes_of_exact_before']}% -> {figures['varied_codes_of_exact']}%")
    return 0
