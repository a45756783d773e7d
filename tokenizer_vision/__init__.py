"""tokenizer_vision: a discrete visual tokenizer with a TokenFlow-style dual codebook.

An image becomes an (h, w) grid of integer codes; code k selects row k of a semantic codebook
(distilled from a CLIP/SigLIP/ViT teacher) and row k of a pixel codebook. This package imports
nothing from the project's other packages.

    from tokenizer_vision import DualCodebookTokenizer
    tokenizer = DualCodebookTokenizer.from_name("tiny")
    codes = tokenizer.encode(images)            # (B, h, w) int64
    images = tokenizer.decode_images(codes)     # list of PIL images
"""

from tokenizer_vision.config import TOKENIZER_SIZES, TokenizerConfig
from tokenizer_vision.image_processing import ImageProcessor, load_image
from tokenizer_vision.model import DualCodebookTokenizer, EncodedFeatures

__all__ = [
    "TOKENIZER_SIZES",
    "DualCodebookTokenizer",
    "EncodedFeatures",
    "ImageProcessor",
    "TokenizerConfig",
    "load_image",
]
