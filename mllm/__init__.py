"""mllm: one next-token decoder that reads and draws images.

    import mllm
    model = mllm.load("path/to/model_dir")   # -> mllm.api.MLLM (caption, answer, draw, chat)

`load` imports torch and transformers on first use, so `import mllm` (and `mllm --help`) stays light.
"""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft when installed) tries, on CPUs with AVX-512 BF16, to fetch an optional 4-bit
# kernel from the Hugging Face Hub and warns when it cannot; it then uses its own CPU kernel, which is what
# runs here anyway (nothing is ever downloaded). The warning would otherwise open every `train` and `merge`.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# Where the `kernels` package is installed (transformers >= 5.25 depends on it), that fetch goes through it,
# and in offline mode it logs that it skips the kernel's publisher check: the same non-event, one more line.
logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)


def load(model_dir, adapter=None, device=None, dtype=None):
    """Load a model folder; see `mllm.api.load`."""
    from mllm.api import load as _load

    return _load(model_dir, adapter=adapter, device=device, dtype=dtype)


__all__ = ["__version__", "load"]
