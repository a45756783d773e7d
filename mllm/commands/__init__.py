"""One-shot use of a model folder: `mllm caption`, `mllm ask`, `mllm draw`.

Each module exposes `add_arguments(parser)` and `run(args) -> int` (the contract of `mllm.cli`);
torch and the model are imported inside `run`, so `mllm <command> --help` stays instant.
"""
