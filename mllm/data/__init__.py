"""Data: the built-in shapes world (`mllm.data.shapes`), its judge (`mllm.data.judge`) and dataset readers."""
