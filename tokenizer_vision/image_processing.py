"""Images in, validated tensors out (and back).

`load_image` is the project's one image decoder: the processor, the server and the data readers all
go through it. It takes a PIL image, encoded bytes, a path, a `data:` URL or a bare base64 string,
refuses anything that is not a sane image, or that breaks a limit, with an `ImageError` (a
`ValueError`; never a crash or a hang), applies the EXIF orientation and returns an RGB `PIL.Image`.
`ImageProcessor` turns images into the normalised square tensors the tokenizer reads and turns its
output back into PIL images.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import re
import threading
import urllib.parse
import warnings
from collections.abc import Iterable, Iterator, Sequence

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

# A string that is no URL and no existing file is read as bare base64 when it is this long and uses
# only the base64 alphabet: a path almost always has a dot or a separator, or is shorter.
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=\s]+")
_MIN_BASE64_CHARS = 64
_URL_SAFE_ALPHABET = str.maketrans("-_", "+/")
# Media types a data URL may declare besides each format's own (PIL's `Image.MIME`).
_MEDIA_TYPE_ALIASES = {"image/jpg": "JPEG"}
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings mutates process-wide state (the server has threads)


class ImageError(ValueError):
    """`load_image`'s refusal: a one-line message naming the source and the check, and `reason`, for
    callers that answer differently per check (the server with a 400 or a 413, the data readers with
    a skip counter):

    - "source": the source itself is unusable: a malformed data URL, a missing file, a remote URL;
    - "format": an image format, or a data URL's declared media type, outside `formats`;
    - "too_large": above `max_bytes` or `max_pixels`, or a possible decompression bomb;
    - "invalid": no image in it: bad base64, no data, an unknown format, truncated or corrupt data
      (a PNG chunk checksum included), zero pixels, a mode that does not convert to RGB.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_bytes: int | None = None,
    formats: Iterable[str] | None = None,
) -> Image.Image:
    """Decode, validate and convert an image to RGB.

    Sources: a `PIL.Image.Image` (decoded already: only the pixel checks apply); encoded bytes
    (`bytes`, `bytearray`, `memoryview`); a path (`os.PathLike`, a `str`, or a `file://` URL); a
    `data:` URL, `data:<media type>[;base64],<data>`, base64 (line breaks, the URL-safe alphabet
    and missing padding are tolerated) or percent-encoded; a bare base64 string (64 characters or
    more of the base64 alphabet, and no existing file of that name). `http(s)://` URLs are refused:
    fetching is network code and belongs to the caller (the server's `--allow-remote-images`).
    Any other type is a `TypeError`.

    Limits; a refusal is an `ImageError` (a `ValueError`) naming the source and the limit:
    - `max_pixels` (default `DEFAULT_MAX_PIXELS`, 40 MP): width * height, read from the header
      before any pixel is decoded, so a decompression bomb costs nothing; PIL's own bomb limit
      (`Image.MAX_IMAGE_PIXELS`) applies as well.
    - `max_bytes` (default None: no limit): the encoded size, checked before anything is read or
      decoded where it can be (a file's size on disk; a base64 payload's from its length).
    - `formats` (default None: every format PIL reads): PIL format names, e.g. ("PNG", "JPEG",
      "WEBP", "GIF"); a data URL must also declare one of their media types.
    Truncated or corrupt data (PNG chunk checksums included) and zero-size images are refused too.

    Conversions: EXIF orientation applied (an unreadable EXIF block is ignored); RGBA / LA / PA /
    P-with-transparency are composited over white; 16-bit integer images ("I;16*" and "I") are read
    as 0..65535 and scaled to 0..255; "F" follows PIL's convention (0..255, clipped); CMYK, L, 1, P,
    YCbCr go through PIL's conversion. GIF and animated WEBP / PNG: the first frame.
    """
    if not isinstance(source, _SINGLE_IMAGE_TYPES):
        raise TypeError(
            f"load_image takes a PIL image, bytes, a path, a data URL or base64, not {type(source).__name__}"
        )
    allowed = _format_names(formats)
    if isinstance(source, Image.Image):
        image, description = source, "image"
        with _refusals(description):
            _check_size(image, max_pixels, description)
            image.load()  # a lazily opened image is decoded here, so truncation surfaces here
    else:
        encoded, description = _encoded(source, max_bytes, allowed)
        image = _decode(encoded, description, max_pixels, allowed)
    try:
        rgb = _oriented_rgb(image, description)
    except BaseException:
        if image is not source:
            image.close()
        raise
    if image is not source and rgb is not image:
        image.close()  # data loaders meet many files: do not leave their handles to the GC
    return rgb


def _format_names(formats: Iterable[str] | None) -> tuple[str, ...] | None:
    """`formats` as upper-case PIL format names; a name PIL does not know is the caller's mistake."""
    if formats is None:
        return None
    if isinstance(formats, str):
        formats = [formats]
    names = tuple(dict.fromkeys(name.upper() for name in formats))
    Image.init()  # registers every plugin in Image.OPEN
    unknown = [name for name in names if name not in Image.OPEN]
    if unknown:
        raise ValueError(f"unknown image formats {unknown}; PIL reads {', '.join(sorted(Image.OPEN))}")
    return names


# ---------------------------------------------------------------------- sources -> encoded bytes or a path
def _encoded(
    source: ImageSource, max_bytes: int | None, allowed: tuple[str, ...] | None
) -> tuple[bytes | str, str]:
    """A source other than a PIL image -> (encoded bytes, or the path of a file; a description)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        description = f"image bytes ({len(data)} bytes)"
        _check_bytes(len(data), max_bytes, description)
        return data, description
    if isinstance(source, str):
        scheme = source[: source.find(":")].lower() if ":" in source[:8] else ""
        if scheme == "data":
            description = f"image data URL ({len(source)} characters)"
            return _data_url_bytes(source, description, max_bytes, allowed), description
        if scheme in ("http", "https"):
            shown = source if len(source) <= 100 else source[:100] + "..."
            raise ImageError(
                f"image URL {shown!r}: remote image URLs are not fetched; pass the image as bytes, a path "
                "or a data URL",
                "source",
            )
        if scheme == "file" and source[5:7] == "//":
            path = urllib.parse.unquote(source[len("file://") :])
        elif _looks_like_base64(source):
            description = f"base64 image ({len(source)} characters)"
            return _base64_bytes(source, description, max_bytes), description
        else:
            path = source
    else:
        path = os.fspath(source)
    description = f"image file {path!r}"
    if not os.path.isfile(path):
        raise ImageError(f"{description}: no such file", "source")
    _check_bytes(os.path.getsize(path), max_bytes, description)
    return path, description


def _looks_like_base64(text: str) -> bool:
    return (
        len(text) >= _MIN_BASE64_CHARS
        and _BASE64_TEXT.fullmatch(text) is not None
        and not os.path.exists(text)
    )


def _data_url_bytes(
    url: str, description: str, max_bytes: int | None, allowed: tuple[str, ...] | None
) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise ImageError(
            f"{description}: malformed data URL, no ',' after the header (expected "
            "data:image/png;base64,<data>)",
            "source",
        )
    media_type, *parameters = (item.strip().lower() for item in header.split(";"))
    if allowed is not None and media_type not in _media_types(allowed):
        raise ImageError(
            f"{description}: media type {media_type[:40]!r} is not allowed (formats: {', '.join(allowed)})",
            "format",
        )
    if "base64" in parameters:
        return _base64_bytes(payload, description, max_bytes)
    data = urllib.parse.unquote_to_bytes(payload)  # RFC 2397's other encoding: %-escapes
    _check_bytes(len(data), max_bytes, description)
    return data


def _media_types(allowed: tuple[str, ...]) -> set[str]:
    """The media types a data URL may declare for these formats."""
    Image.init()  # fills Image.MIME from every plugin
    aliases = {alias for alias, name in _MEDIA_TYPE_ALIASES.items() if name in allowed}
    return {Image.MIME[name] for name in allowed if name in Image.MIME} | aliases


def _base64_bytes(text: str, description: str, max_bytes: int | None) -> bytes:
    text = "".join(text.split())  # line-wrapped base64
    # 4 base64 characters carry 3 bytes: an oversized image is refused before anything is decoded.
    _check_bytes(len(text.rstrip("=")) * 3 // 4, max_bytes, description, estimated=True)
    if not text:
        raise ImageError(f"{description}: holds no image data", "invalid")
    if "-" in text or "_" in text:
        text = text.translate(_URL_SAFE_ALPHABET)
    text = text.rstrip("=")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"{description}: invalid base64 ({error})", "invalid") from None
    _check_bytes(len(data), max_bytes, description)
    return data


def _check_bytes(size: int, max_bytes: int | None, description: str, estimated: bool = False) -> None:
    if max_bytes is not None and size > max_bytes:
        amount = f"about {size} bytes once decoded" if estimated else f"{size} bytes"
        raise ImageError(f"{description}: {amount} exceeds max_bytes={max_bytes}", "too_large")


# ---------------------------------------------------------------------- encoded -> decoded image
@contextlib.contextmanager
def _refusals(description: str) -> Iterator[None]:
    """Whatever PIL raises for a bad image -> ImageError (PIL signals truncated or corrupt data with
    a mix of exception types, depending on the plugin; a data loader must not crash on any)."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(
            f"{description}: refused as a possible decompression bomb ({error})", "too_large"
        ) from error
    except Exception as error:  # see the docstring
        detail = str(error)[:200]
        raise ImageError(
            f"{description}: truncated or corrupt image ({type(error).__name__}: {detail})", "invalid"
        ) from error


def _readable(encoded: bytes | str) -> io.BytesIO | str:
    return io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded


def _decode(
    encoded: bytes | str, description: str, max_pixels: int, allowed: tuple[str, ...] | None
) -> Image.Image:
    """Open (header only), check the size, check PNG checksums, then decode fully."""
    image = _open_header(encoded, description, allowed)
    try:
        with _refusals(description):
            _check_size(image, max_pixels, description)
            if image.format == "PNG":
                # Decoding skips the chunk checksums; verify() checks them (without decoding) but
                # leaves the image unusable, so it is opened again to decode.
                image.verify()
                image = Image.open(_readable(encoded), formats=["PNG"])
            image.load()  # the full decode, now, so truncation surfaces here and not in a later resize
    except BaseException:
        image.close()
        raise
    return image


def _open_header(encoded: bytes | str, description: str, allowed: tuple[str, ...] | None) -> Image.Image:
    with _OPEN_LOCK, warnings.catch_warnings(), _refusals(description):
        # PIL's bomb check runs in Image.open: it warns above Image.MAX_IMAGE_PIXELS (a refusal
        # here) and raises above twice that.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(_readable(encoded), formats=allowed)  # lazy: reads the header only
        except UnidentifiedImageError:
            pass  # named below, outside the lock
    raise _unidentified(encoded, description, allowed)


def _unidentified(encoded: bytes | str, description: str, allowed: tuple[str, ...] | None) -> ImageError:
    """The refusal for data no allowed decoder recognises, naming its format when PIL knows it."""
    if isinstance(encoded, bytes):
        head = encoded[:12]
    else:
        with open(encoded, "rb") as file:
            head = file.read(12)
    signature = _signature(head)
    if signature is not None and (allowed is None or signature in allowed):
        # The right signature, but PIL could not even read the header.
        return ImageError(f"{description}: truncated or corrupt {signature} data", "invalid")
    if allowed is None:
        return ImageError(f"{description}: not a recognised image format", "invalid")
    found = _probe_format(encoded)
    if found is not None:
        return ImageError(
            f"{description}: {found} images are not allowed (formats: {', '.join(allowed)})", "format"
        )
    return ImageError(
        f"{description}: not a recognised image format (formats: {', '.join(allowed)})", "invalid"
    )


def _signature(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _probe_format(encoded: bytes | str) -> str | None:
    """The format PIL reads the data as, with every plugin (header only); None for no image."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(_readable(encoded)) as probe:
                return probe.format
    except Exception:  # noqa: BLE001 - not an image at all
        return None


def _check_size(image: Image.Image, max_pixels: int, description: str) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{description}: zero-size image ({width}x{height})", "invalid")
    if width * height > max_pixels:
        raise ImageError(
            f"{description}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
            "too_large",
        )


# ---------------------------------------------------------------------- decoded image -> RGB
def _oriented_rgb(image: Image.Image, description: str) -> Image.Image:
    # An unreadable EXIF block is ignored: the pixels are fine, they keep their stored orientation.
    with contextlib.suppress(Exception):
        image = ImageOps.exif_transpose(image)
    try:
        return _to_rgb(image, description)
    except ImageError:
        raise
    except Exception as error:  # an exotic mode must not crash a data loader
        raise ImageError(
            f"{description}: cannot convert to RGB ({type(error).__name__}: {error})", "invalid"
        ) from error


def _to_rgb(image: Image.Image, description: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> L conversion clips at 255 instead of scaling; scale 0..65535 -> 0..255.
        return _to_eight_bit(image, _scale_sixteen_bit).convert("RGB")
    if mode == "F":
        return _to_eight_bit(image, _round_float).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        background = Image.new("RGBA", image.size, _BACKGROUND)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageError(f"{description}: unsupported image mode {mode!r}", "invalid") from error


# Rows converted at a time by `_to_eight_bit`: about 256k pixels, so the temporaries of a band are about
# 1 MB each (int32 / float32) whatever the image's size.
_CONVERSION_PIXELS = 1 << 18


def _to_eight_bit(image: Image.Image, convert) -> Image.Image:
    """A 16-bit ("I;16*", "I") or float ("F") image -> an 8-bit "L" image, `convert` applied to bands of
    rows: the only full-size buffer besides the two images is the uint8 result (1 byte a pixel), where
    converting all of it at once in float64 took 8 bytes a pixel for each temporary (+440 MB RSS for one
    4096 x 4096 16-bit PNG)."""
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _CONVERSION_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = convert(np.asarray(image.crop((0, top, width, bottom))))
    return Image.fromarray(out)


def _scale_sixteen_bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded to nearest (values outside clipped): rint(v * 255 / 65535) =
    rint(v / 257), computed exactly in integers as (v + 128) // 257 (v / 257 is never exactly half
    an integer, 257 being odd, so no tie is rounded differently)."""
    scaled = values.astype(np.int32)  # "I" is int32 already; 65535 + 128 fits
    np.clip(scaled, 0, 65535, out=scaled)
    scaled += 128
    scaled //= 257
    return scaled.astype(np.uint8)


def _round_float(values: np.ndarray) -> np.ndarray:
    """PIL's "F" convention: rounded to nearest (half to even), clipped to 0..255; NaN -> 0."""
    rounded = np.rint(values.astype(np.float32))  # float32 is F's own precision: exact
    np.clip(rounded, 0, 255, out=rounded)
    np.nan_to_num(rounded, copy=False, nan=0.0)
    return rounded.astype(np.uint8)


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


__all__ = ["DEFAULT_MAX_PIXELS", "ImageError", "ImageProcessor", "load_image"]
