"""Images in, validated tensors out (and back).

`load_image` is the one gate every image passes: it accepts a PIL image, a file path or raw bytes,
refuses anything that is not a sane image with a `ValueError` (never a crash or a hang), applies the
EXIF orientation and returns an RGB `PIL.Image`. `ImageProcessor` turns images into the normalised
square tensors the tokenizer reads and turns its output back into PIL images.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Image.Image | str | os.PathLike | bytes | bytearray | memoryview
_SINGLE_IMAGE_TYPES = (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)

# 40 MP is far above anything a tokenizer needs (it resizes to a few hundred pixels) and far below
# what would exhaust memory when decoded (40e6 * 4 bytes = 160 MB as RGBA).
DEFAULT_MAX_PIXELS = 40_000_000

# Alpha is composited over white: the shapes world and most documents/icons use a white background.
_BACKGROUND = (255, 255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, validate and convert an image to RGB.

    Accepts a `PIL.Image.Image`, a path (`str` / `os.PathLike`) or encoded bytes. Raises `ValueError`
    for non-images, truncated or corrupt files, zero-size images and images with more than
    `max_pixels` pixels; the pixel limit is checked from the header, before anything is decoded, so a
    decompression bomb costs nothing. PIL's own bomb check (`Image.MAX_IMAGE_PIXELS`) applies as well
    and is reported the same way.

    Conversions: EXIF orientation applied; RGBA / LA / PA / P-with-transparency are composited over
    white; 16-bit integer images ("I;16*" and "I") are read as 0..65535 and scaled to 0..255; "F"
    follows PIL's convention (0..255, clipped); CMYK, L, 1, P, YCbCr go through PIL's conversion.
    """
    if not isinstance(src, _SINGLE_IMAGE_TYPES):
        raise TypeError(f"load_image takes a PIL image, a path or bytes, not {type(src).__name__}")
    description = _describe(src)
    with warnings.catch_warnings():
        # PIL warns (rather than raises) between MAX_IMAGE_PIXELS and twice that; treat it as a refusal.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = _open_and_decode(src, description, max_pixels)
        except ValueError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"{description}: refused as a possible decompression bomb ({error})") from error
        except (OSError, SyntaxError, EOFError, MemoryError, IndexError, TypeError, KeyError) as error:
            # PIL signals truncated/corrupt data with a mix of these, depending on the plugin.
            raise ValueError(
                f"{description}: truncated or corrupt image ({type(error).__name__}: {error})"
            ) from error
        try:
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image, description)
        except ValueError:
            raise
        except Exception as error:  # a broken EXIF block or an exotic mode must not crash a data loader
            raise ValueError(
                f"{description}: cannot convert to RGB ({type(error).__name__}: {error})"
            ) from error


def _describe(src: object) -> str:
    if isinstance(src, (str, os.PathLike)):
        return f"image file {os.fspath(src)!r}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(src)} bytes)"
    return "image"


def _open(src: ImageSource, description: str) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    elif not os.path.isfile(src):
        raise ValueError(f"{description}: no such file")
    try:
        return Image.open(src)  # lazy: reads the header only
    except UnidentifiedImageError as error:
        raise ValueError(f"{description}: not a recognised image format") from error


def _open_and_decode(src: ImageSource, description: str, max_pixels: int) -> Image.Image:
    """Open (header only), check the size, then decode fully; a refused file is closed again."""
    image = _open(src, description)
    try:
        _check_size(image, max_pixels, description)
        image.load()  # force the full decode now so truncation surfaces here, not later
    except BaseException:
        if image is not src:
            image.close()  # data loaders meet many bad files: do not leak their handles
        raise
    return image


def _check_size(image: Image.Image, max_pixels: int, description: str) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ValueError(f"{description}: zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(
            f"{description}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
        )


def _to_rgb(image: Image.Image, description: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> L conversion clips at 255 instead of scaling; scale 0..65535 -> 0..255.
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        background = Image.new("RGBA", image.size, _BACKGROUND)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"{description}: unsupported image mode {mode!r}") from error


class ImageProcessor:
    """PIL images <-> normalised tensors of shape (B, 3, S, S).

    `preprocess` resizes the shorter side to S (bicubic) and centre-crops to S x S, then maps
    [0, 255] to (x / 255 - mean) / std. `postprocess` inverts the normalisation, clamps and rounds to
    uint8.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.max_pixels = max_pixels

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(image_size={self.image_size}, mean={self.mean.flatten().tolist()}, "
            f"std={self.std.flatten().tolist()})"
        )

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        size = self.image_size
        width, height = image.size
        if (width, height) == (size, size):
            return image
        scale = size / min(width, height)
        new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        left, top = (new_width - size) // 2, (new_height - size) // 2
        return image.crop((left, top, left + size, top + size))

    def preprocess(self, images: ImageSource | Sequence[ImageSource]) -> torch.Tensor:
        """One image or a list of images (anything `load_image` takes) -> FloatTensor (B, 3, S, S)."""
        if isinstance(images, _SINGLE_IMAGE_TYPES):
            images = [images]
        if len(images) == 0:
            raise ValueError("preprocess needs at least one image")
        arrays = [
            np.asarray(self.resize_and_crop(load_image(image, self.max_pixels)), dtype=np.uint8)
            for image in images
        ]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, S, S)
        return (batch - self.mean) / self.std

    def postprocess(self, pixel_values: torch.Tensor) -> list[Image.Image]:
        """Normalised (B, 3, H, W) or (3, H, W) tensor -> list of RGB PIL images."""
        if pixel_values.dim() == 3:
            pixel_values = pixel_values.unsqueeze(0)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"postprocess expects (B, 3, H, W), got {tuple(pixel_values.shape)}")
        values = pixel_values.detach().float().cpu() * self.std + self.mean  # (B, 3, H, W) in [0, 1]
        values = (values.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(array) for array in values]


__all__ = ["DEFAULT_MAX_PIXELS", "ImageProcessor", "load_image"]
