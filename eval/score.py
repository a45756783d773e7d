"""`mllm eval-score`: score a predictions file without a model (eval.runner.score_file)."""

from eval.runner import add_score_arguments as add_arguments
from eval.runner import run_score as run

__all__ = ["add_arguments", "run"]
