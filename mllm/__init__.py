"""mllm: one next-token decoder that reads and draws images."""

__version__ = "0.1.0"
