"""The subcommands of `mllm` (one module each), and the warm worker of the one-shot ones (`worker.py`).

Each module exposes `add_arguments(parser)` and `run(args) -> int` (the contract of `mllm.cli`);
torch and the model are imported inside `run`, so `mllm <command> --help` stays instant.
"""
