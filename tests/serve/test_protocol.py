"""serve.protocol: every bad request is an APIError with its status and param; good ones parse."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from PIL import Image

from mllm.config import DRAW_GUIDANCE_SCALE
from serve.protocol import (
    APIError,
    ChatRequest,
    ImageRequest,
    Limits,
    decode_image_url,
    parse_chat_request,
    parse_image_request,
    parse_json_body,
    split_markdown_images,
)

# ----------------------------------------------------------------------------------------- fixtures
RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png(size=(7, 5), color=RED, mode="RGB") -> bytes:
    return encode(Image.new(mode, size, color), "PNG")


def noisy_png(size=(64, 64)) -> bytes:
    """Incompressible pixels, so the file is big enough to cut in half meaningfully."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR claims width x height (CRC fixed): a decompression bomb's header."""
    data = bytearray(png((1, 1)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url, text: str = "what is this?") -> dict:
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
    }


def chat(*messages, **fields) -> dict:
    return {"model": "tiny", "messages": list(messages) or [{"role": "user", "content": "hi"}], **fields}


def body(payload) -> bytes:
    return json.dumps(payload).encode()


def parse_chat_bytes(raw: bytes, limits: Limits | None = None) -> ChatRequest:
    """What the app does with a chat body."""
    limits = limits or Limits()
    return parse_chat_request(parse_json_body(raw, limits), limits)


USER_HI = {"role": "user", "content": "hi"}
IMAGE_PARAM = "messages[0].content[1].image_url"


# -------------------------------------------------------------------------------- bad chat requests
def case(name, raw, status, param, code=None, limits=None):
    """One bad request: raw body, expected status and param (and error code, when given)."""
    return pytest.param(raw, limits, status, param, code, id=name)


def user(content, **fields) -> bytes:
    return body(chat({"role": "user", "content": content}, **fields))


def with_image(url: str) -> bytes:
    return body(chat(image_message(url)))


def parts(*items) -> bytes:
    return user(list(items))


TRUNCATED_PNG = noisy_png()[: len(noisy_png()) // 2]
TRUNCATED_JPEG = encode(Image.open(io.BytesIO(noisy_png())), "JPEG")[:600]
BMP = encode(Image.new("RGB", (4, 4)), "BMP")
NAN_BODY = b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
INF_BODY = b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}'
ASSISTANT_MARKDOWN = {"role": "assistant", "content": "![x](data:image/png;base64,aGVsbG8=)"}
NINE_IMAGES = [{"type": "image_url", "image_url": data_url(png())}] * 9
IMG = IMAGE_PARAM

BAD_CHAT = [
    # JSON body
    case("malformed-json", b'{"messages": [', 400, None, "invalid_json"),
    case("non-utf8", b'{"messages": "\xff\xfe"}', 400, None, "invalid_json"),
    case("nan-is-not-json", NAN_BODY, 400, None, "invalid_json"),
    case("empty-body", b"", 400, None, "invalid_json"),
    case("deep-nesting", b"[" * 100_000 + b"]" * 100_000, 400, None, "invalid_json"),
    case("body-not-object", body([1, 2]), 400, None),
    case("oversized-body", user("hi"), 413, None, "request_too_large", Limits(max_body_bytes=20)),
    # messages
    case("messages-missing", body({"model": "x"}), 400, "messages", "missing_required_parameter"),
    case("messages-not-list", body({"messages": "hello"}), 400, "messages", "invalid_type"),
    case("messages-empty", body({"messages": []}), 400, "messages"),
    case("message-not-object", body({"messages": ["hi"]}), 400, "messages[0]"),
    case("content-number", user(5), 400, "messages[0].content", "invalid_type"),
    case("content-missing", body(chat({"role": "user"})), 400, "messages[0].content"),
    case("user-content-null", user(None), 400, "messages[0].content"),
    case("content-empty-list", user([]), 400, "messages[0].content"),
    case("unknown-role", body(chat({"role": "wizard", "content": "x"})), 400, "messages[0].role"),
    case("tool-role", body(chat({"role": "tool", "content": "x"})), 400, "messages[0].role"),
    case("role-not-string", body(chat({"role": ["user"], "content": "x"})), 400, "messages[0].role"),
    case("role-missing", body(chat({"content": "x"})), 400, "messages[0].role"),
    case("unknown-part-type", parts({"type": "input_audio"}), 400, "messages[0].content[0].type"),
    case("part-not-object", parts("hi"), 400, "messages[0].content[0]"),
    case("text-not-string", parts({"type": "text", "text": 3}), 400, "messages[0].content[0].text"),
    case(
        "image-url-no-url",
        parts({"type": "image_url", "image_url": {}}),
        400,
        "messages[0].content[0].image_url.url",
    ),
    case(
        "image-in-system",
        body(chat({"role": "system", "content": [{"type": "image_url", "image_url": "x"}]})),
        400,
        "messages[0].content[0]",
    ),
    case(
        "assistant-tool-calls",
        body(chat(USER_HI, {"role": "assistant", "content": None, "tool_calls": [{}]})),
        400,
        "messages[1].tool_calls",
        "unsupported_parameter",
    ),
    case(
        "too-much-text",
        user("x" * 11),
        400,
        "messages",
        "context_length_exceeded",
        Limits(max_prompt_chars=10),
    ),
    # sampling fields
    case("temperature-string", user("x", temperature="hot"), 400, "temperature", "invalid_type"),
    case("temperature-bool", user("x", temperature=True), 400, "temperature", "invalid_type"),
    case("temperature-range", user("x", temperature=2.5), 400, "temperature", "invalid_value"),
    case("temperature-inf", INF_BODY, 400, "temperature", "invalid_value"),
    case("top-p-zero", user("x", top_p=0), 400, "top_p", "invalid_value"),
    case("top-p-above-one", user("x", top_p=1.5), 400, "top_p", "invalid_value"),
    case("n-bool", user("x", n=True), 400, "n", "invalid_type"),
    case("n-zero", user("x", n=0), 400, "n", "invalid_value"),
    case("n-over-max", user("x", n=9), 400, "n", "invalid_value"),
    case("n-float", user("x", n=2.0), 400, "n", "invalid_type"),
    case("max-tokens-zero", user("x", max_tokens=0), 400, "max_tokens", "invalid_value"),
    case("max-tokens-over-cap", user("x", max_tokens=2049), 400, "max_tokens", "invalid_value"),
    case("max-tokens-string", user("x", max_tokens="10"), 400, "max_tokens", "invalid_type"),
    case("max-completion-over-cap", user("x", max_completion_tokens=10**6), 400, "max_completion_tokens"),
    case("seed-string", user("x", seed="1"), 400, "seed", "invalid_type"),
    case("seed-float", user("x", seed=1.5), 400, "seed", "invalid_type"),
    case("seed-huge", user("x", seed=2**70), 400, "seed", "invalid_value"),
    case("stop-number", user("x", stop=3), 400, "stop", "invalid_type"),
    case("stop-five", user("x", stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    case("stop-item-number", user("x", stop=["a", 1]), 400, "stop[1]", "invalid_type"),
    case("stop-empty-string", user("x", stop=[""]), 400, "stop[0]", "invalid_value"),
    case("stream-string", user("x", stream="yes"), 400, "stream", "invalid_type"),
    case(
        "include-usage-string",
        user("x", stream=True, stream_options={"include_usage": "yes"}),
        400,
        "stream_options.include_usage",
        "invalid_type",
    ),
    case("guidance-string", user("x", guidance_scale="lots"), 400, "guidance_scale", "invalid_type"),
    case("decoding-unknown", user("x", decoding="fast"), 400, "decoding", "invalid_value"),
    case("decoding-number", user("x", decoding=1), 400, "decoding", "invalid_type"),
    case("model-number", user("x", model=5), 400, "model", "invalid_type"),
    # OpenAI features we cannot honour
    case("tools-refused", user("x", tools=[{"type": "function"}]), 400, "tools", "unsupported_parameter"),
    case(
        "functions-refused", user("x", functions=[{"name": "f"}]), 400, "functions", "unsupported_parameter"
    ),
    case("tool-choice-required", user("x", tool_choice="required"), 400, "tool_choice"),
    case("logprobs-refused", user("x", logprobs=True), 400, "logprobs", "unsupported_parameter"),
    case("top-logprobs-refused", user("x", top_logprobs=3), 400, "top_logprobs", "unsupported_parameter"),
    case(
        "response-format-json",
        user("x", response_format={"type": "json_object"}),
        400,
        "response_format",
        "unsupported_value",
    ),
    case(
        "logit-bias-refused",
        user("x", logit_bias={"50256": -100}),
        400,
        "logit_bias",
        "unsupported_parameter",
    ),
    case("audio-refused", user("x", audio={"voice": "alloy"}), 400, "audio", "unsupported_parameter"),
    case("audio-modality-refused", user("x", modalities=["text", "audio"]), 400, "modalities"),
    # images
    case("bad-base64", with_image("data:image/png;base64,!!!notbase64!!!"), 400, IMG, "invalid_image"),
    case("bad-base64-length", with_image("data:image/png;base64,AAAAA"), 400, IMG, "invalid_image"),
    case("empty-image-data", with_image("data:image/png;base64,"), 400, IMG, "invalid_image"),
    case("not-base64-data-url", with_image("data:image/png,hello"), 400, IMG, "invalid_image_url"),
    case("data-url-no-comma", with_image("data:image/png;base64"), 400, IMG, "invalid_image_url"),
    case(
        "svg-media-type", with_image(data_url(b"<svg/>", "image/svg+xml")), 400, IMG, "invalid_image_format"
    ),
    case("non-image-bytes", with_image(data_url(b"hello")), 400, IMG, "invalid_image"),
    case("bmp-not-supported", with_image(data_url(BMP)), 400, IMG, "invalid_image_format"),
    case("truncated-png", with_image(data_url(TRUNCATED_PNG)), 400, IMG, "invalid_image"),
    case("truncated-jpeg", with_image(data_url(TRUNCATED_JPEG, "image/jpeg")), 400, IMG, "invalid_image"),
    case("png-header-only", with_image(data_url(png()[:33])), 400, IMG, "invalid_image"),
    case(
        "bomb-20000x20000",
        with_image(data_url(png_with_header_size(20000, 20000))),
        413,
        IMG,
        "image_too_large",
    ),
    case(
        "over-pixel-limit",
        with_image(data_url(png_with_header_size(5000, 5000))),
        413,
        IMG,
        "image_too_large",
    ),
    # 100 MP: above PIL's MAX_IMAGE_PIXELS (its DecompressionBombWarning, made an error) though within ours
    case(
        "pil-bomb-warning",
        with_image(data_url(png_with_header_size(10000, 10000))),
        413,
        IMG,
        "image_too_large",
        Limits(max_image_pixels=10**9),
    ),
    case(
        "oversized-image-bytes",
        with_image(data_url(noisy_png())),
        413,
        IMG,
        "image_too_large",
        Limits(max_image_bytes=1000),
    ),
    case("too-many-images", user(NINE_IMAGES), 400, "messages", "too_many_images"),
    case(
        "too-many-markdown-images",
        user(f"![a]({data_url(png())}) " * 3),
        400,
        "messages",
        "too_many_images",
        Limits(max_images=2),
    ),
    case("remote-url-refused", with_image("https://example.com/cat.png"), 400, IMG, "remote_images_disabled"),
    case("file-url-refused", with_image("file:///etc/passwd"), 400, IMG, "invalid_image_url"),
    case("plain-path-refused", with_image("/etc/passwd"), 400, IMG, "invalid_image_url"),
    case(
        "string-image-url-bad",
        parts({"type": "image_url", "image_url": "data:,"}),
        400,
        "messages[0].content[0].image_url",
    ),
    case(
        "markdown-bad-image-in-assistant",
        body(chat(USER_HI, ASSISTANT_MARKDOWN)),
        400,
        "messages[1].content",
        "invalid_image",
    ),
]


@pytest.mark.parametrize(("raw", "limits", "status", "param", "code"), BAD_CHAT)
def test_bad_chat_requests(raw, limits, status, param, code):
    with pytest.raises(APIError) as info:
        parse_chat_bytes(raw, limits)
    error = info.value
    assert (error.status, error.param) == (status, param), error.message
    if code is not None:
        assert error.code == code, error.message
    assert error.body() == {
        "error": {
            "message": error.message,
            "type": "invalid_request_error",
            "param": param,
            "code": error.code,
        }
    }
    assert isinstance(error.message, str) and error.message
    json.dumps(error.body())  # serialisable as is


def test_images_are_not_decoded_when_the_request_is_refused_for_cheap_reasons():
    """Too many images / too much text / a bad field is reported before any image is decoded."""
    bomb = data_url(png_with_header_size(20000, 20000))
    many = chat({"role": "user", "content": [{"type": "image_url", "image_url": bomb}] * 9})
    with pytest.raises(APIError) as info:
        parse_chat_request(many, Limits())
    assert (info.value.status, info.value.param) == (400, "messages")
    with pytest.raises(APIError) as info:
        parse_chat_request(chat(image_message(bomb), temperature="hot"), Limits())
    assert info.value.param == "temperature"


def test_oversized_image_is_refused_before_base64_decoding(monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("base64 decoded")

    # The decoding is tokenizer_vision.load_image's, which calls base64.b64decode.
    monkeypatch.setattr(base64, "b64decode", no_decode)
    with pytest.raises(APIError) as info:
        decode_image_url("data:image/png;base64," + "A" * 4000, Limits(max_image_bytes=1000), "p")
    assert (info.value.status, info.value.param) == (413, "p")


# ------------------------------------------------------------------------------- good chat requests
def test_text_only_defaults():
    request = parse_chat_bytes(body({"messages": [{"role": "user", "content": "hi"}]}))
    assert request == ChatRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        model=None,
        max_tokens=None,
        temperature=1.0,
        top_p=None,
        seed=None,
        stop=[],
        n=1,
        stream=False,
        include_usage=False,
        guidance_scale=DRAW_GUIDANCE_SCALE,
        image_count=0,
    )
    # A server sets the default temperature (from the model's generation config); a request's own wins.
    plain = body({"messages": [{"role": "user", "content": "hi"}]})
    assert parse_chat_request(json.loads(plain), Limits(default_temperature=0.0)).temperature == 0.0
    assert parse_chat_request(json.loads(plain), Limits(default_temperature=0.7)).temperature == 0.7
    assert parse_chat_request(chat(temperature=1.2), Limits(default_temperature=0.0)).temperature == 1.2


def test_all_fields_and_harmless_extras():
    payload = chat(
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            "name": "me",
        },
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {"role": "user", "content": ""},
        model="tiny-1",
        max_tokens=10,
        max_completion_tokens=20,
        temperature=0,
        top_p=0.9,
        seed=-3,
        stop="END",
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        guidance_scale=5,
        # harmless, ignored
        user="u1",
        frequency_penalty=0.5,
        presence_penalty=-1,
        logit_bias=None,
        tools=[],
        tool_choice="none",
        parallel_tool_calls=False,
        logprobs=False,
        response_format={"type": "text"},
        metadata={"k": "v"},
        store=False,
        something_new={"x": 1},
    )
    request = parse_chat_bytes(body(payload))
    assert request.messages == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": []},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
        {"role": "user", "content": [{"type": "text", "text": ""}]},
    ]
    assert (request.model, request.max_tokens, request.temperature, request.top_p) == ("tiny-1", 20, 0.0, 0.9)
    assert (request.seed, request.stop, request.n, request.stream, request.include_usage) == (
        -3,
        ["END"],
        2,
        True,
        True,
    )
    assert request.guidance_scale == 5.0 and isinstance(request.temperature, float)
    assert parse_chat_bytes(body(chat(stop=["a", "b", "c", "d"], max_tokens=2048))).stop == [
        "a",
        "b",
        "c",
        "d",
    ]


def _gif_two_frames() -> bytes:
    frames = [Image.new("RGB", (6, 4), RED), Image.new("RGB", (6, 4), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


IMAGE_FORMATS = [
    ("png", lambda: png((7, 5)), "image/png", (7, 5), 0),
    ("png-rgba-transparent-over-white", lambda: png((3, 2), (0, 0, 0, 0), "RGBA"), "image/png", (3, 2), 0),
    ("jpeg", lambda: encode(Image.new("RGB", (16, 8), RED), "JPEG", quality=95), "image/jpeg", (16, 8), 12),
    ("jpg-mime", lambda: encode(Image.new("RGB", (8, 8), RED), "JPEG", quality=95), "image/jpg", (8, 8), 12),
    ("webp", lambda: encode(Image.new("RGB", (10, 6), RED), "WEBP", lossless=True), "image/webp", (10, 6), 0),
    ("gif-first-frame", _gif_two_frames, "image/gif", (6, 4), 0),
    ("grey-png", lambda: png((5, 5), 76, "L"), "image/png", (5, 5), 1),
    ("mislabelled-png-as-jpeg", lambda: png((4, 4)), "image/jpeg", (4, 4), 0),
]


@pytest.mark.parametrize(
    ("make", "mime", "size", "tolerance"), [pytest.param(*c[1:], id=c[0]) for c in IMAGE_FORMATS]
)
def test_data_url_images_decode_to_rgb(make, mime, size, tolerance, request):
    request_ = parse_chat_bytes(body(chat(image_message(data_url(make(), mime)))))
    assert request_.image_count == 1
    text, image_part = request_.messages[0]["content"]
    assert text == {"type": "text", "text": "what is this?"}
    assert image_part["type"] == "image"
    image = image_part["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == size
    expected = {"png-rgba-transparent-over-white": (255, 255, 255), "grey-png": (76, 76, 76)}.get(
        request.node.callspec.id, RED
    )
    pixel = image.getpixel((0, 0))
    assert all(abs(a - b) <= tolerance for a, b in zip(pixel, expected)), pixel


def test_image_url_forms():
    url = data_url(png((3, 3)))
    wrapped = base64.encodebytes(png((3, 3))).decode()  # base64 with line breaks
    assert "\n" in wrapped
    payload = chat(
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": url},  # a bare string
                {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + wrapped}},
                {"type": "image_url", "image_url": {"url": url.rstrip("=")}},  # padding dropped
                {"type": "text", "text": "compare"},
            ],
        }
    )
    request = parse_chat_bytes(body(payload))
    assert request.image_count == 4
    kinds = [part["type"] for part in request.messages[0]["content"]]
    assert kinds == ["image", "image", "image", "image", "text"]
    assert all(part["image"].size == (3, 3) for part in request.messages[0]["content"][:4])


def test_markdown_images_in_assistant_text_become_image_parts():
    drawn = data_url(png((4, 4), BLUE))
    payload = chat(
        {"role": "user", "content": "draw a blue square"},
        {"role": "assistant", "content": f"Here it is:\n\n![a blue square]({drawn})\n\nAnything else?"},
        {
            "role": "user",
            "content": [{"type": "text", "text": f"![mine]({data_url(png((2, 2)))}) and yours?"}],
        },
        {"role": "system", "content": f"![kept as text]({drawn})"},  # system text is never split
    )
    request = parse_chat_bytes(body(payload))
    assert request.image_count == 2
    assistant = request.messages[1]["content"]
    assert [part["type"] for part in assistant] == ["text", "image", "text"]
    assert assistant[0]["text"] == "Here it is:\n\n" and assistant[2]["text"] == "\n\nAnything else?"
    assert assistant[1]["image"].size == (4, 4) and assistant[1]["image"].getpixel((1, 1)) == BLUE
    user = request.messages[2]["content"]
    assert [part["type"] for part in user] == ["image", "text"] and user[1]["text"] == " and yours?"
    assert request.messages[3]["content"] == [{"type": "text", "text": f"![kept as text]({drawn})"}]


def test_split_markdown_images():
    url = "data:image/png;base64,iVBORw0KGgo="
    assert split_markdown_images("a ![x](" + url + ") b") == [
        {"type": "text", "text": "a "},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": " b"},
    ]
    assert split_markdown_images("plain") == [{"type": "text", "text": "plain"}]
    assert split_markdown_images("") == [{"type": "text", "text": ""}]
    assert split_markdown_images(f"![]({url})![b]({url})") == [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    for text in (
        "![remote](https://example.com/x.png)",  # only data: URLs are images
        f"![x]({url}",  # never closed
        f"[not an image]({url})",  # a link, not an image
        f"![x]({url} trailing)",
        "![x](data:image/png;base64,abc",
    ):
        assert split_markdown_images(text) == [{"type": "text", "text": text}], text


def test_split_markdown_images_is_linear_on_adversarial_text():
    import time

    for text in ("![" * 200_000, "](data:image/" * 100_000, "![a](data:image/png;base64," + "A" * 10**6):
        start = time.perf_counter()
        assert split_markdown_images(text) == [{"type": "text", "text": text}]
        assert time.perf_counter() - start < 2.0


def test_parse_json_body_accepts_bom_and_returns_value():
    assert parse_json_body(b'\xef\xbb\xbf{"a": 1}', Limits()) == {"a": 1}
    assert parse_json_body(bytearray(b"[1]"), Limits()) == [1]


# ----------------------------------------------------------------------------------- image requests
BAD_IMAGE = [
    ("not-object", ["prompt"], 400, None),
    ("prompt-missing", {"n": 1}, 400, "prompt"),
    ("prompt-empty", {"prompt": "  "}, 400, "prompt"),
    ("prompt-number", {"prompt": 5}, 400, "prompt"),
    ("prompt-too-long", {"prompt": "x" * 200_001}, 400, "prompt"),
    ("n-zero", {"prompt": "a", "n": 0}, 400, "n"),
    ("n-over-max", {"prompt": "a", "n": 9}, 400, "n"),
    ("n-string", {"prompt": "a", "n": "2"}, 400, "n"),
    ("n-bool", {"prompt": "a", "n": True}, 400, "n"),
    ("size-word", {"prompt": "a", "size": "big"}, 400, "size"),
    ("size-zero", {"prompt": "a", "size": "0x512"}, 400, "size"),
    ("size-too-big", {"prompt": "a", "size": "5000x5000"}, 400, "size"),
    ("size-number", {"prompt": "a", "size": 512}, 400, "size"),
    ("response-format-url", {"prompt": "a", "response_format": "url"}, 400, "response_format"),
    ("response-format-other", {"prompt": "a", "response_format": "png"}, 400, "response_format"),
    ("guidance-string", {"prompt": "a", "guidance_scale": "x"}, 400, "guidance_scale"),
    ("decoding-unknown", {"prompt": "a", "decoding": "Jacobi"}, 400, "decoding"),
    ("decoding-list", {"prompt": "a", "decoding": ["jacobi"]}, 400, "decoding"),
    ("seed-float", {"prompt": "a", "seed": 1.5}, 400, "seed"),
    ("model-number", {"prompt": "a", "model": 1}, 400, "model"),
    ("stream-refused", {"prompt": "a", "stream": True}, 400, "stream"),
]


@pytest.mark.parametrize(("payload", "status", "param"), [pytest.param(*c[1:], id=c[0]) for c in BAD_IMAGE])
def test_bad_image_requests(payload, status, param):
    with pytest.raises(APIError) as info:
        limits = Limits()
        parse_image_request(parse_json_body(body(payload), limits), limits)
    assert (info.value.status, info.value.param) == (status, param), info.value.message


def test_decoding_field_names_the_allowed_values_and_defaults_to_the_servers():
    for parse, payload in ((parse_image_request, {"prompt": "a"}),
                           (parse_chat_request, chat())):
        with pytest.raises(APIError) as info:
            parse({**payload, "decoding": "fast"}, Limits())
        assert info.value.message == "'decoding' must be one of 'auto', 'jacobi', 'sequential', got the string 'fast'"
        assert parse(payload, Limits()).decoding == "auto"  # DEFAULT_DECODING
        assert parse(payload, Limits(default_decoding="sequential")).decoding == "sequential"  # mllm serve --decoding
        assert parse({**payload, "decoding": "sequential"}, Limits()).decoding == "sequential"
        assert parse({**payload, "decoding": "jacobi"}, Limits(default_decoding="sequential")).decoding == "jacobi"


def test_url_response_format_says_why():
    with pytest.raises(APIError) as info:
        parse_image_request({"prompt": "a", "response_format": "url"}, Limits())
    assert "b64_json" in info.value.message and info.value.code == "unsupported_value"


def test_image_request_parsing():
    assert parse_image_request({"prompt": "a red circle"}, Limits()) == ImageRequest(
        prompt="a red circle",
        n=1,
        size=None,
        response_format="b64_json",
        guidance_scale=DRAW_GUIDANCE_SCALE,
        seed=None,
        model=None,
    )
    request = parse_image_request(
        {
            "prompt": "a cat",
            "n": 2,
            "size": "512x256",
            "response_format": "b64_json",
            "guidance_scale": 1.5,
            "seed": 7,
            "model": "tiny",
            "quality": "hd",
            "style": "vivid",
            "user": "u",
        },
        Limits(),
    )
    assert request == ImageRequest("a cat", 2, (512, 256), "b64_json", 1.5, 7, "tiny")
    assert parse_image_request({"prompt": "a", "size": "auto"}, Limits()).size is None
    assert parse_image_request({"prompt": "a", "size": "4096x1"}, Limits()).size == (4096, 1)


# ------------------------------------------------------------------------------------ remote images
class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, bytes]]] = {}

    def do_GET(self):  # http.server's name
        status, payload = self.routes.get(self.path, (404, b"not found"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        """Keep the test output free of the server's request log."""


@pytest.fixture
def image_server(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    _Handler.routes = {
        "/cat.png": (200, png((5, 3))),
        "/big.png": (200, noisy_png()),
        "/text": (200, b"hello"),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_remote_images_when_allowed(image_server, monkeypatch):
    import serve.protocol

    # The loopback test server stands in for a public host (loopback itself is refused: see test_hardening).
    monkeypatch.setattr(serve.protocol, "is_public_address", lambda address: address == "127.0.0.1")
    limits = Limits(allow_remote_images=True)
    image = decode_image_url(f"{image_server}/cat.png", limits, "p")
    assert image.size == (5, 3) and image.mode == "RGB"
    for path, status, code in (
        ("/missing.png", 400, "image_fetch_failed"),
        ("/text", 400, "invalid_image"),
    ):
        with pytest.raises(APIError) as info:
            decode_image_url(image_server + path, limits, "p")
        assert (info.value.status, info.value.param, info.value.code) == (status, "p", code)
    with pytest.raises(APIError) as info:
        decode_image_url(
            f"{image_server}/big.png", Limits(allow_remote_images=True, max_image_bytes=1000), "p"
        )
    assert (info.value.status, info.value.code) == (413, "image_too_large")
    with pytest.raises(APIError) as info:  # nothing listens on port 1
        decode_image_url("http://127.0.0.1:1/x.png", limits, "p")
    assert (info.value.status, info.value.code) == (400, "image_fetch_failed")


def test_remote_images_refused_by_default():
    with pytest.raises(APIError) as info:
        decode_image_url("http://127.0.0.1:1/x.png", Limits(), "messages[0].content[0].image_url")
    assert info.value.status == 400 and "--allow-remote-images" in info.value.message
