"""tokenizer_vision: a discrete visual tokenizer with a TokenFlow-style dual codebook.

An image becomes an (h, w) grid of integer codes; code k selects row k of a semantic codebook
(distilled from a CLIP/SigLIP/ViT teacher) and row k of a pixel codebook. This package imports
nothing from the project's other packages.

    from tokenizer_vision import DualCodebookTokenizer
    tokenizer = DualCodebookTokenizer.from_name("tiny")
    codes = tokenizer.encode(images)            # (B, h, w) int64
    images = tokenizer.decode_images(codes)     # list of PIL images
"""

# Names resolve on first use (PEP 562), so importing a light submodule (`tokenizer_vision.schema`,
# `tokenizer_vision.config`) does not import torch.
_EXPORTS = {
    "TOKENIZER_SIZES": "tokenizer_vision.config",
    "TokenizerConfig": "tokenizer_vision.config",
    "ImageError": "tokenizer_vision.image_processing",
    "ImageProcessor": "tokenizer_vision.image_processing",
    "load_image": "tokenizer_vision.image_processing",
    "DualCodebookTokenizer": "tokenizer_vision.model",
    "EncodedFeatures": "tokenizer_vision.model",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokenizer_vision' has no attribute {name!r}")


__all__ = [
    "TOKENIZER_SIZES",
    "DualCodebookTokenizer",
    "EncodedFeatures",
    "ImageError",
    "ImageProcessor",
    "TokenizerConfig",
    "load_image",
]
