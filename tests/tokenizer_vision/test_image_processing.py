"""load_image refuses bad input with ValueError and converts every mode to the expected RGB;
ImageProcessor resizes, crops and normalises exactly."""

import base64
import io
import struct
import time
import urllib.parse
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer_vision import ImageError, ImageProcessor, load_image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_with_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit grey) but whose data is a few bytes:
    cheap to make, and any attempt to decode it would fail as truncated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def noise_image(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"definitely not an image", "not a recognised image format"),
        (b"", "not a recognised image format"),
        (encode(noise_image(), "PNG")[:6000], "truncated"),
        (encode(noise_image(), "JPEG")[:2000], "truncated"),
    ],
    ids=["text", "empty", "truncated-png", "truncated-jpeg"],
)
def test_bad_bytes_raise_value_error(payload, message):
    with pytest.raises(ValueError, match=message):
        load_image(payload)


def test_truncated_file_on_disk_raises(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(encode(noise_image(), "PNG")[:5000])
    with pytest.raises(ValueError, match="truncated"):
        load_image(path)
    with pytest.raises(ValueError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_zero_size_image_raises():
    with pytest.raises(ValueError, match="zero-size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError):
        load_image(png_with_header_only(0, 10))


def test_decompression_bomb_is_refused_from_the_header():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(png_with_header_only(100_000, 100_000))  # 10 GP: PIL's own bomb check
    # 49 MP is under PIL's limits but over ours; "max_pixels" (not "truncated") in the message shows the
    # size was refused from the header, before the (bogus) data was decoded.
    with pytest.raises(ValueError, match="exceeds max_pixels=40000000"):
        load_image(png_with_header_only(7000, 7000))
    with pytest.raises(ValueError, match="exceeds max_pixels=1000"):
        load_image(encode(noise_image(), "PNG"), max_pixels=1000)
    assert time.perf_counter() - start < 2.0


def test_wrong_type_raises_type_error():
    with pytest.raises(TypeError):
        load_image(12345)


# ------------------------------------------------------------------ conversions


def test_rgba_is_composited_over_white():
    image = Image.new("RGBA", (3, 1))
    image.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    out = rgb(load_image(encode(image, "PNG")))
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white
    assert out[0, 1].tolist() == [10, 20, 30]  # opaque -> unchanged
    assert out[0, 2].tolist() == [127, 127, 127]  # half-transparent black over white


def test_la_is_composited_over_white():
    image = Image.new("LA", (2, 1))
    image.putdata([(100, 0), (100, 255)])
    out = rgb(load_image(image))
    assert out[0].tolist() == [[255, 255, 255], [100, 100, 100]]


def test_palette_with_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    image.putdata([0, 1])
    data = encode(image, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    out = rgb(load_image(data))
    assert out[0].tolist() == [[255, 255, 255], [200, 30, 40]]


def test_cmyk_and_greyscale_modes():
    assert rgb(load_image(Image.new("CMYK", (1, 1), (0, 255, 255, 0))))[0, 0].tolist() == [255, 0, 0]
    assert rgb(load_image(Image.new("L", (1, 1), 77)))[0, 0].tolist() == [77, 77, 77]
    assert rgb(load_image(Image.new("1", (1, 1), 1)))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 65535, 257 * 128, 1000]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    expected = [0, 255, 128, 4]  # round(v * 255 / 65535)
    for source in (image, encode(image, "PNG"), Image.fromarray(values.astype(np.int32))):  # I;16 and I
        out = rgb(load_image(source))
        assert out[0, :, 0].tolist() == expected
        assert (out[..., 0] == out[..., 2]).all()


def test_float_mode_follows_pil_convention():
    image = Image.fromarray(np.array([[-5.0, 12.4, 300.0]], dtype=np.float32))
    assert image.mode == "F"
    assert rgb(load_image(image))[0, :, 1].tolist() == [0, 12, 255]


def _float64_reference(image: Image.Image) -> np.ndarray:
    """The conversion load_image made before it worked in bands of integer / float32 arithmetic."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        with np.errstate(invalid="ignore"):
            return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)


def _png16(width: int, height: int, colour_type: int, samples: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (PIL writes no 16-bit RGBA / LA): samples (H, W, channels) uint16."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def test_sixteen_bit_float_and_alpha_pixels_are_those_of_the_float64_conversion(monkeypatch):
    from tokenizer_vision import image_processing

    # many bands, a short last one (raising=False: the same test ran on the float64 conversion)
    monkeypatch.setattr(image_processing, "_CONVERSION_PIXELS", 1000, raising=False)
    every = np.arange(65536, dtype=np.uint16).reshape(128, 512)  # every 16-bit value
    # "I" with values beyond 0..65535
    wide = np.random.default_rng(0).integers(-100_000, 200_000, (37, 61), dtype=np.int32)
    floats = np.array(
        [-3.5, -0.5, 0.5, 1.5, 2.5, 12.4, 254.5, 255.5, 300.0, np.inf, -np.inf, np.nan, 1e30],
        dtype=np.float32,
    )
    floats = np.concatenate([floats, np.random.default_rng(1).normal(128, 90, 13 * 40 - len(floats))])
    sources = {
        "I;16": Image.fromarray(every),
        "I;16 PNG": encode(Image.fromarray(every), "PNG"),
        "I;16B": Image.frombytes("I;16B", (512, 128), every.astype(">u2").tobytes()),
        "I": Image.fromarray(wide),
        "F": Image.fromarray(floats.astype(np.float32).reshape(13, 40)),
    }
    for name, source in sources.items():
        decoded = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else source
        expected = _float64_reference(decoded)
        out = rgb(load_image(source))
        assert (out == expected[..., None]).all(), name
    # 16-bit RGBA and grey + alpha PNGs: composited over white, as before
    grey, alpha = every[:, :64], np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (128, 1))
    for colour_type, samples in (
        (6, np.stack([grey, grey[::-1], grey[:, ::-1], alpha], -1)),
        (4, np.stack([grey, alpha], -1)),
    ):
        data = _png16(64, 128, colour_type, samples)
        decoded = Image.open(io.BytesIO(data))
        decoded.load()
        expected = Image.alpha_composite(
            Image.new("RGBA", decoded.size, (255, 255, 255, 255)), decoded.convert("RGBA")
        ).convert("RGB")
        assert (rgb(load_image(data)) == np.asarray(expected)).all(), colour_type


def test_decoding_a_large_sixteen_bit_png_needs_little_extra_memory():
    """A 4096 x 4096 16-bit PNG (about 80 KB): the conversion to 8 bits used to make float64 copies of
    the whole image, 384 MB at the peak (tracemalloc; +440 MB RSS in the server). It now works in bands
    of rows: the uint8 result (16 MB) plus about 1 MB a band. Bound asserted: 48 MB. (PIL's own buffers,
    the decoded image and the RGB result, are outside tracemalloc's view and the same as before.)"""
    import tracemalloc

    x = np.arange(4096, dtype=np.uint32)
    values = ((x[None, :] * 16 + x[:, None] * 7) % 65536).astype(np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    del values, x
    tracemalloc.start()
    try:
        image = load_image(data, max_pixels=4096 * 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.size == (4096, 4096) and image.mode == "RGB"
    assert peak < 48 * 2**20, f"decoding took {peak / 2**20:.0f} MB at the peak"


def test_exif_orientation_is_applied():
    # 16 x 8 image: left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise
    # for display", so the displayed image is 8 x 16 with red on top.
    image = Image.new("RGB", (16, 8), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (8, 16)
    pixels = rgb(out)
    assert np.abs(pixels[3, 4] - [255, 0, 0]).max() < 40
    assert np.abs(pixels[12, 4] - [0, 0, 255]).max() < 40


def test_accepts_path_bytes_and_pil(tmp_path):
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    path = tmp_path / "a.png"
    image.save(path)
    for source in (image, path, str(path), path.read_bytes(), bytearray(path.read_bytes())):
        assert rgb(load_image(source))[0, 0].tolist() == [1, 2, 3]


# ------------------------------------------------------------------ one decoder, every source


def test_every_source_kind_gives_the_same_pixels(tmp_path):
    image = noise_image(16)
    png = encode(image, "PNG")
    path = tmp_path / "noise image.png"
    path.write_bytes(png)
    b64 = base64.b64encode(png).decode()
    urlsafe = base64.urlsafe_b64encode(png).decode()
    sources = {
        "pil": image,
        "bytes": png,
        "bytearray": bytearray(png),
        "memoryview": memoryview(png),
        "path": path,
        "str path": str(path),
        "file url": "file://" + urllib.parse.quote(str(path)),
        "data url": "data:image/png;base64," + b64,
        "data url, wrapped": "data:image/png;base64," + base64.encodebytes(png).decode(),
        "data url, url-safe, unpadded": "data:image/png;base64," + urlsafe.rstrip("="),
        "data url, %-escaped": "data:image/png," + urllib.parse.quote_from_bytes(png),
        "bare base64": b64,
    }
    expected = np.asarray(image)
    for name, source in sources.items():
        out = load_image(source)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), expected), name


def refusal(reason: str, *fragments: str, **kwargs) -> ImageError:
    """The ImageError `load_image(**kwargs)` raises, checked for its reason and message fragments."""
    source = kwargs.pop("source")
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)
    error = info.value
    assert isinstance(error, ValueError) and error.reason == reason, (error.reason, str(error))
    assert "\n" not in str(error)
    for fragment in fragments:
        assert fragment in str(error), (fragment, str(error))
    return error


def test_each_limit_refuses_naming_it(tmp_path, monkeypatch):
    png = encode(noise_image(), "PNG")  # 64 x 64, over 12 kB
    path = tmp_path / "a.png"
    path.write_bytes(png)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    refusal("too_large", "exceeds max_pixels=1000", "image bytes", source=png, max_pixels=1000)
    refusal("too_large", "exceeds max_pixels=1000", "image data URL", source=url, max_pixels=1000)
    refusal(
        "too_large", f"{len(png)} bytes exceeds max_bytes=1000", "image bytes", source=png, max_bytes=1000
    )
    refusal("too_large", "exceeds max_bytes=1000", repr(str(path)), source=path, max_bytes=1000)
    refusal("too_large", "exceeds max_bytes=1000", "base64 image", source=url[22:], max_bytes=1000)
    bmp = encode(Image.new("RGB", (4, 4)), "BMP")
    refusal("format", "BMP images are not allowed", "PNG, JPEG", source=bmp, formats=("PNG", "JPEG"))
    refusal("format", "'image/gif'", "not allowed", source="data:image/gif;base64,R0lG", formats=["png"])
    assert load_image(bmp).size == (4, 4)  # every format PIL reads, by default
    with pytest.raises(ValueError, match="unknown image formats"):  # a caller's typo is not a refusal
        load_image(png, formats=["JPG"])
    assert load_image(url.replace("image/png", "image/jpg"), formats=["PNG", "JPEG"]).size == (64, 64)

    # An oversized base64 payload is judged from its length: nothing is decoded.
    def no_decode(*args, **kwargs):
        raise AssertionError("base64 decoded")

    monkeypatch.setattr(base64, "b64decode", no_decode)
    refusal("too_large", "about 12", "exceeds max_bytes=1000", source=url, max_bytes=1000)


def test_bad_sources_are_refused():
    refusal("source", "no ','", source="data:image/png;base64")
    refusal("source", "remote image URLs are not fetched", source="https://example.com/cat.png")
    refusal("source", "no such file", source="/no/such/image.png")
    refusal("invalid", "invalid base64", source="data:image/png;base64,@@@not base64@@@")
    refusal("invalid", "holds no image data", source="data:image/png;base64,")
    refusal("invalid", "not a recognised image format", source="data:text/plain;base64,aGVsbG8=")
    refusal("invalid", "not a recognised image format", source=b"hello")


def test_bomb_header_is_refused_without_decoding(monkeypatch):
    from PIL import ImageFile, PngImagePlugin

    def no_decode(self, *args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "verify", no_decode)
    refusal("too_large", "decompression bomb", source=png_with_header_only(100_000, 100_000))
    # Between PIL's limit and twice that PIL only warns: a refusal all the same.
    refusal("too_large", "decompression bomb", source=png_with_header_only(10_000, 10_000), max_pixels=10**9)
    refusal("too_large", "exceeds max_pixels", source=png_with_header_only(7000, 7000))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_are_refused(fmt):
    data = encode(noise_image(), fmt)
    for cut in (data[: len(data) // 2], data[:40]):
        refusal("invalid", "truncated or corrupt", source=cut)
        url = f"data:image/{fmt.lower()};base64," + base64.b64encode(cut).decode()
        refusal("invalid", "truncated or corrupt", source=url, formats=("PNG", "JPEG"))


def test_png_checksums_are_checked():
    data = bytearray(encode(noise_image(), "PNG"))
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    data[idat + 4 + length] ^= 0xFF  # the first byte of the IDAT chunk's CRC: the pixels are intact
    refusal("invalid", "truncated or corrupt", source=bytes(data))


# ------------------------------------------------------------------ ImageProcessor


def test_preprocess_normalises_and_centre_crops():
    processor = ImageProcessor(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    wide = Image.new("RGB", (96, 32), (0, 0, 255))  # blue | green | red thirds
    wide.paste((0, 255, 0), (32, 0, 64, 32))
    wide.paste((255, 0, 0), (64, 0, 96, 32))
    batch = processor.preprocess([wide, Image.new("RGB", (32, 32), (255, 255, 255))])
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.equal(batch[0, 1], torch.ones(32, 32))  # the centre third: green at +1
    assert torch.equal(batch[0, 0], -torch.ones(32, 32))
    assert torch.equal(batch[1], torch.ones(3, 32, 32))
    tall = processor.preprocess(Image.new("RGB", (20, 80), (255, 0, 0)))
    assert tall.shape == (1, 3, 32, 32)  # shorter side resized to 32, then cropped


def test_postprocess_inverts_preprocess():
    processor = ImageProcessor(16, mean=(0.48, 0.45, 0.40), std=(0.27, 0.26, 0.28))
    image = noise_image(16)
    (restored,) = processor.postprocess(processor.preprocess(image))
    assert restored.size == (16, 16) and restored.mode == "RGB"
    assert np.array_equal(np.asarray(restored), np.asarray(image))
    clipped = processor.postprocess(torch.full((3, 2, 2), 100.0))[0]
    assert np.asarray(clipped).max() == 255
