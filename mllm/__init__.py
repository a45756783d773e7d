"""mllm: one next-token decoder that reads and draws images.

    import mllm
    model = mllm.load("path/to/model_dir")   # -> mllm.api.MLLM (caption, answer, draw, chat)

`load` imports torch and transformers on first use, so `import mllm` (and `mllm --help`) stays light.
"""

__version__ = "0.1.0"


def load(model_dir, adapter=None, device=None, dtype=None):
    """Load a model folder; see `mllm.api.load`."""
    from mllm.api import load as _load

    return _load(model_dir, adapter=adapter, device=device, dtype=dtype)


__all__ = ["__version__", "load"]
