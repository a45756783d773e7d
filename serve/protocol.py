"""Request parsing and validation for the OpenAI-compatible server.

Everything a client sends passes through this module before it reaches the model. Each function
either returns a clean, typed request or raises `APIError`, which the app turns into a 4xx response
with OpenAI's error body `{"error": {"message", "type", "param", "code"}}`. Bad input never escapes as
another exception (a 500) and never makes the server do unbounded work:

- the body is refused (413) above `Limits.max_body_bytes` before it is parsed;
- `parse_chat_request` checks every field's type and range, the number of images and the amount of
  text *before* decoding any image;
- an image's encoded size is checked before its base64 is decoded, and its pixel count is read from
  the header and checked before its pixels are decoded (decompression bombs cost nothing).

Status codes: 413 for "too large" (body, image bytes, image pixels), 400 for everything else,
including too many images and too much text (code "context_length_exceeded", as OpenAI does).
`param` names the offending field in OpenAI's dotted style, e.g. "messages[1].content[0].image_url".

Field policy for chat completions: fields we honour are validated; harmless OpenAI fields we do not
use (user, frequency_penalty, presence_penalty, metadata, store, ...) and unknown fields are ignored;
fields that would change what the client gets back and that we cannot honour (non-empty tools or
functions, tool_choice other than "none"/"auto", logprobs, top_logprobs, response_format other than
text, audio output, non-empty logit_bias, web_search_options) are refused with a 400 naming them.

PIL (through `tokenizer_vision.load_image`, the project's one image decoder) and httpx are imported
inside the functions that need them, so importing this module is cheap.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mllm.config import DRAW_GUIDANCE_SCALE

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

__all__ = [
    "APIError",
    "ChatRequest",
    "ImageRequest",
    "Limits",
    "decode_image_url",
    "parse_chat_request",
    "parse_image_request",
    "parse_json_body",
    "split_markdown_images",
]


# ------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error the client caused: `status` (4xx) and OpenAI's error body via `body()`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # OpenAI's field name (shadows the builtin here only)
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


# ------------------------------------------------------------------------------------------- limits
@dataclass
class Limits:
    """Server-side caps on what one request may ask for (the server's command line sets them)."""

    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 16 * 2**20  # decoded (not base64) bytes of one image
    max_image_pixels: int = 4096 * 4096  # width * height, checked from the header before decoding
    max_images: int = 8  # images per request, over all messages (markdown images included)
    max_tokens: int = 2048  # the largest max_tokens / max_completion_tokens accepted
    max_n: int = 8
    max_prompt_chars: int = 200_000  # total text characters of a request (cheap guard before tokenizing)
    allow_remote_images: bool = False  # fetch http(s):// image URLs (off: only data: URLs)
    # The temperature of a chat request that gives none; None: 1, OpenAI's default (`create_app` sets it from
    # the model's generation config).
    default_temperature: float | None = None


# ----------------------------------------------------------------------------------------- requests
@dataclass
class ChatRequest:
    """A validated /v1/chat/completions request.

    `messages` are in the processor's format: {"role": "system" | "user" | "assistant", "content":
    [{"type": "text", "text": str} | {"type": "image", "image": PIL.Image (RGB)}]}; "developer" is
    mapped to "system", string content to one text part, markdown data-URL images in user/assistant
    text to image parts, and an assistant's null content to an empty list.
    """

    messages: list[dict]
    model: str | None = None
    max_tokens: int | None = None  # from max_completion_tokens, else max_tokens; None: the server's default
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    guidance_scale: float = DRAW_GUIDANCE_SCALE  # extra field: CFG scale for images drawn inside the chat
    image_count: int = 0


@dataclass
class ImageRequest:
    """A validated /v1/images/generations request (`size` is (width, height); None for "auto")."""

    prompt: str
    n: int = 1
    size: tuple[int, int] | None = None
    response_format: str = "b64_json"
    guidance_scale: float = DRAW_GUIDANCE_SCALE
    seed: int | None = None
    model: str | None = None


# ---------------------------------------------------------------------------------------- JSON body
def parse_json_body(raw: bytes, limits: Limits) -> Any:
    """The request body -> the parsed JSON value.

    413 when `raw` is longer than `limits.max_body_bytes`; 400 "invalid JSON" for an empty body, bytes
    that are not UTF-8 (a UTF-8 BOM is tolerated), malformed JSON, NaN/Infinity (not JSON) and
    nesting too deep to parse.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise APIError(400, "invalid JSON: the request body must be bytes", code="invalid_json")
    if len(raw) > limits.max_body_bytes:
        raise APIError(
            413,
            f"request body is {len(raw)} bytes, above this server's limit of {limits.max_body_bytes} "
            "bytes; send smaller (or fewer) images",
            code="request_too_large",
        )
    try:
        text = bytes(raw).decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise APIError(
            400,
            f"invalid JSON: the body is not UTF-8 ({error.reason} at byte {error.start})",
            code="invalid_json",
        ) from None
    if not text.strip():
        raise APIError(
            400, "invalid JSON: the request body is empty; send a JSON object", code="invalid_json"
        )
    try:
        return _json_loads(text)
    except RecursionError:
        raise APIError(400, "invalid JSON: nested too deeply", code="invalid_json") from None
    except ValueError as error:  # json.JSONDecodeError, NaN/Infinity, integers too long to convert
        raise APIError(400, f"invalid JSON: {error}", code="invalid_json") from None


def _json_loads(text: str) -> Any:
    import json

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(text, parse_constant=refuse_constant)


# ------------------------------------------------------------------------------------- field checks
_MISSING = object()


def _describe(value: Any) -> str:
    """A short, safe description of a client value for error messages (never a huge repr)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return f"the string {shown!r}"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**30 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _invalid_type(param: str, expected: str, value: Any) -> APIError:
    return APIError(
        400, f"'{param}' must be {expected}, got {_describe(value)}", param=param, code="invalid_type"
    )


def _invalid_value(param: str, expected: str, value: Any) -> APIError:
    return APIError(
        400, f"'{param}' must be {expected}, got {_describe(value)}", param=param, code="invalid_value"
    )


def _get_checked(
    payload: dict,
    key: str,
    default: Any,
    expected: str,
    is_type: Callable[[Any], bool],
    in_range: Callable[[Any], bool] | None = None,
) -> Any:
    """payload[key], or `default` when absent or null; a 400 naming `expected` when the value is not of
    the type (`is_type`) or, given `in_range`, not in range."""
    value = payload.get(key)
    if value is None:
        return default
    if not is_type(value):
        raise _invalid_type(key, expected, value)
    if in_range is not None and not in_range(value):
        raise _invalid_value(key, expected, value)
    return value


def _get_int(payload: dict, key: str, low: int, high: int, default: int | None) -> int | None:
    expected = f"an integer between {low} and {high}"
    return _get_checked(payload, key, default, expected, _is_int, lambda value: low <= value <= high)


def _get_number(
    payload: dict, key: str, low: float, high: float, default: float | None, low_open: bool = False
) -> float | None:
    expected = f"a number {'>' if low_open else '>='} {low:g} and <= {high:g}"

    def in_range(value: float) -> bool:
        return math.isfinite(value) and (value > low if low_open else value >= low) and value <= high

    value = _get_checked(payload, key, default, expected, _is_number, in_range)
    return None if value is None else float(value)


def _get_bool(payload: dict, key: str, default: bool) -> bool:
    return _get_checked(payload, key, default, "a boolean", lambda value: isinstance(value, bool))


def _get_str(payload: dict, key: str) -> str | None:
    return _get_checked(payload, key, None, "a string", lambda value: isinstance(value, str))


def _get_seed(payload: dict) -> int | None:
    """An int64 (what torch's generators take; the engine adds the image index to it)."""
    value = payload.get("seed")
    if value is None:
        return None
    if not _is_int(value):
        raise _invalid_type("seed", "an integer", value)
    if not -(2**63) <= value < 2**63:
        raise _invalid_value("seed", "a 64-bit signed integer", value)
    return value


def _get_guidance_scale(payload: dict) -> float:
    value = _get_number(payload, "guidance_scale", 0.0, 100.0, DRAW_GUIDANCE_SCALE)
    assert value is not None
    return value


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


# --------------------------------------------------------------------------------------------- chat
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MAX_STOP = 4  # OpenAI's rule


def _refuse_unsupported_chat_fields(payload: dict) -> None:
    """400 for OpenAI fields whose meaning we cannot honour; harmless ones are left alone."""
    for key in ("tools", "functions"):
        value = payload.get(key)
        if value is None or value == []:
            continue
        if not isinstance(value, list):
            raise _invalid_type(key, "an array", value)
        raise _unsupported(key, f"'{key}' is not supported: this server does not do function/tool calling")
    for key, allowed in (("tool_choice", ("none", "auto")), ("function_call", ("none", "auto"))):
        value = payload.get(key)
        if value is not None and value not in allowed:
            raise _unsupported(
                key, f"'{key}' is not supported: this server does not do function/tool calling; omit it"
            )
    logprobs = payload.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _invalid_type("logprobs", "a boolean", logprobs)
    if logprobs:
        raise _unsupported(
            "logprobs", "'logprobs' is not supported by this server; omit it or set it to false"
        )
    top_logprobs = payload.get("top_logprobs")
    if top_logprobs is not None and top_logprobs != 0:
        raise _unsupported("top_logprobs", "'top_logprobs' is not supported by this server; omit it")
    response_format = payload.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise _invalid_type("response_format", 'an object such as {"type": "text"}', response_format)
        if response_format.get("type", "text") != "text":
            raise APIError(
                400,
                f"response_format {_describe(response_format.get('type'))} is not supported: this server "
                'only produces free text ({"type": "text"}); omit response_format',
                param="response_format",
                code="unsupported_value",
            )
    if payload.get("audio") is not None:
        raise _unsupported("audio", "audio output is not supported by this server; omit 'audio'")
    modalities = payload.get("modalities")
    if modalities is not None:
        if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
            raise _invalid_type("modalities", "an array of strings", modalities)
        if "audio" in modalities:
            raise APIError(
                400,
                'audio output is not supported by this server; use modalities ["text"]',
                param="modalities",
                code="unsupported_value",
            )
    logit_bias = payload.get("logit_bias")
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise _invalid_type("logit_bias", "an object", logit_bias)
        if logit_bias:
            raise _unsupported("logit_bias", "'logit_bias' is not supported by this server; omit it")
    if payload.get("web_search_options") is not None:
        raise _unsupported("web_search_options", "web search is not supported by this server; omit it")


def _get_stop(payload: dict) -> list[str]:
    value = payload.get("stop")
    if value is None:
        return []
    expected = f"a string or an array of at most {_MAX_STOP} strings"
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise _invalid_type("stop", expected, value)
    if len(value) > _MAX_STOP:
        raise APIError(
            400,
            f"'stop' may hold at most {_MAX_STOP} sequences, got {len(value)}",
            param="stop",
            code="invalid_value",
        )
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise _invalid_type(f"stop[{index}]", "a string", item)
        if not item:
            raise _invalid_value(f"stop[{index}]", "a non-empty string", item)
    return list(value)


@dataclass
class _Part:
    """One content part before image decoding: text, or an image URL with the param it came from."""

    kind: str  # "text" | "image"
    value: str  # the text, or the image URL
    param: str


def _text_parts(text: str, param: str, split_images: bool) -> list[_Part]:
    if not split_images:
        return [_Part("text", text, param)]
    parts = []
    for piece in split_markdown_images(text):
        if piece["type"] == "text":
            parts.append(_Part("text", piece["text"], param))
        else:
            parts.append(_Part("image", piece["image_url"]["url"], param))
    return parts


def _parse_content_part(part: Any, param: str, role: str) -> list[_Part]:
    if not isinstance(part, dict):
        raise _invalid_type(param, 'an object such as {"type": "text", "text": "..."}', part)
    kind = part.get("type")
    split_images = role in ("user", "assistant")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise _invalid_type(f"{param}.text", "a string", text)
        return _text_parts(text, f"{param}.text", split_images)
    if kind == "refusal" and role == "assistant":  # an earlier assistant refusal, echoed back: plain text
        text = part.get("refusal")
        if not isinstance(text, str):
            raise _invalid_type(f"{param}.refusal", "a string", text)
        return [_Part("text", text, f"{param}.refusal")]
    if kind == "image_url":
        if role == "system":
            raise APIError(
                400,
                "system messages may only contain text; put images in a user message",
                param=param,
                code="invalid_value",
            )
        image_url = part.get("image_url")
        if isinstance(image_url, str):
            return [_Part("image", image_url, f"{param}.image_url")]
        if not isinstance(image_url, dict):
            raise _invalid_type(
                f"{param}.image_url", 'an object {"url": "data:image/png;base64,..."}', image_url
            )
        url = image_url.get("url")
        if not isinstance(url, str):
            raise _invalid_type(f"{param}.image_url.url", "a string (a data: URL)", url)
        return [_Part("image", url, f"{param}.image_url")]
    if not isinstance(kind, str):
        raise _invalid_type(f"{param}.type", 'a string ("text" or "image_url")', kind)
    raise APIError(
        400,
        f"content part type {_describe(kind)} is not supported; use 'text' or 'image_url' parts",
        param=f"{param}.type",
        code="invalid_value",
    )


def _parse_message(message: Any, index: int) -> tuple[str, list[_Part]]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _invalid_type(param, 'an object {"role": ..., "content": ...}', message)
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        if role is None:
            raise APIError(
                400, f"'{param}.role' is required", param=f"{param}.role", code="missing_required_parameter"
            )
        extra = " (tool and function messages are not supported)" if role in ("tool", "function") else ""
        raise APIError(
            400,
            f"'{param}.role' must be one of 'system', 'developer', 'user', 'assistant', got "
            f"{_describe(role)}{extra}",
            param=f"{param}.role",
            code="invalid_value",
        )
    role = _ROLES[role]
    for key in ("tool_calls", "function_call"):
        if message.get(key):
            raise _unsupported(
                f"{param}.{key}", f"'{key}' in messages is not supported: this server does no tool calling"
            )
    if "content" not in message and role != "assistant":
        raise APIError(
            400, f"'{param}.content' is required", param=f"{param}.content", code="missing_required_parameter"
        )
    content = message.get("content")
    split_images = role in ("user", "assistant")
    if content is None:
        if role != "assistant":
            raise _invalid_type(f"{param}.content", "a string or an array of content parts", content)
        return role, []
    if isinstance(content, str):
        return role, _text_parts(content, f"{param}.content", split_images)
    if not isinstance(content, list):
        raise _invalid_type(f"{param}.content", "a string or an array of content parts", content)
    if not content:
        raise _invalid_value(f"{param}.content", "a non-empty array of content parts", content)
    parts: list[_Part] = []
    for part_index, part in enumerate(content):
        parts.extend(_parse_content_part(part, f"{param}.content[{part_index}]", role))
    return role, parts


def parse_chat_request(payload: Any, limits: Limits) -> ChatRequest:
    """A parsed /v1/chat/completions body -> ChatRequest, or APIError.

    Rules (violations: 400 unless noted, `param` naming the field):
    - `messages`: a non-empty array of {"role", "content"}; roles system, developer (= system), user,
      assistant; content a string, null (assistant only) or a non-empty array of
      {"type": "text", "text": str} and {"type": "image_url", "image_url": {"url": str, "detail"?}}
      (or "image_url": "<url>") parts; no images in system messages. Markdown data-URL images in
      user/assistant text (`![alt](data:image/png;base64,...)`, as this server returns drawn images)
      become image parts.
    - at most `limits.max_images` images in all (param "messages"), at most `limits.max_prompt_chars`
      characters of text (code "context_length_exceeded"); both checked before any image is decoded.
    - images: see `decode_image_url` (413 for too many bytes or pixels).
    - `temperature` a number in [0, 2] (default `limits.default_temperature`); `top_p` in (0, 1]; `n` an integer in
      [1, max_n]; `max_completion_tokens` (preferred) / `max_tokens` an integer in [1, max_tokens];
      `seed` an integer (int64); `stop` a string or up to 4 non-empty strings; `stream` a boolean;
      `stream_options.include_usage` a boolean; `guidance_scale` (extra) a number in [0, 100],
      default DRAW_GUIDANCE_SCALE; `model` a string. Booleans are not numbers.
    - unsupported fields that change the answer's meaning (tools, logprobs, response_format other
      than text, ...) are refused; harmless and unknown fields are ignored.
    """
    if not isinstance(payload, dict):
        raise APIError(
            400, f"the request body must be a JSON object, got {_describe(payload)}", code="invalid_type"
        )

    _refuse_unsupported_chat_fields(payload)
    model = _get_str(payload, "model")
    default_temperature = 1.0 if limits.default_temperature is None else limits.default_temperature
    temperature = _get_number(payload, "temperature", 0.0, 2.0, default_temperature)
    top_p = _get_number(payload, "top_p", 0.0, 1.0, None, low_open=True)
    n = _get_int(payload, "n", 1, limits.max_n, 1)
    max_tokens = _get_int(payload, "max_tokens", 1, limits.max_tokens, None)
    max_completion_tokens = _get_int(payload, "max_completion_tokens", 1, limits.max_tokens, None)
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens
    seed = _get_seed(payload)
    stop = _get_stop(payload)
    stream = _get_bool(payload, "stream", False)
    include_usage = False
    stream_options = payload.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _invalid_type("stream_options", 'an object such as {"include_usage": true}', stream_options)
        value = stream_options.get("include_usage")
        if value is not None and not isinstance(value, bool):
            raise _invalid_type("stream_options.include_usage", "a boolean", value)
        include_usage = bool(value)
    guidance_scale = _get_guidance_scale(payload)

    messages = payload.get("messages", _MISSING)
    if messages is _MISSING or messages is None:
        raise APIError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise _invalid_type("messages", "an array of messages", messages)
    if not messages:
        raise _invalid_value("messages", "a non-empty array of messages", messages)

    # Structure first, counting images and text, so nothing expensive runs for a request we refuse.
    parsed = [_parse_message(message, index) for index, message in enumerate(messages)]
    image_count = sum(1 for _, parts in parsed for part in parts if part.kind == "image")
    if image_count > limits.max_images:
        raise APIError(
            400,
            f"this request has {image_count} images; this server accepts at most {limits.max_images} per "
            "request (markdown images in message text count too)",
            param="messages",
            code="too_many_images",
        )
    chars = sum(len(part.value) for _, parts in parsed for part in parts if part.kind == "text")
    if chars > limits.max_prompt_chars:
        raise APIError(
            400,
            f"the messages hold {chars} characters of text, more than this server's limit of "
            f"{limits.max_prompt_chars}; shorten the conversation",
            param="messages",
            code="context_length_exceeded",
        )

    out_messages = []
    for role, parts in parsed:
        content: list[dict] = []
        for part in parts:
            if part.kind == "text":
                content.append({"type": "text", "text": part.value})
            else:
                content.append({"type": "image", "image": decode_image_url(part.value, limits, part.param)})
        out_messages.append({"role": role, "content": content})

    assert temperature is not None
    return ChatRequest(
        messages=out_messages,
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
        n=n if n is not None else 1,
        stream=stream,
        include_usage=include_usage,
        guidance_scale=guidance_scale,
        image_count=image_count,
    )


# ------------------------------------------------------------------------------- images/generations
_MAX_SIDE = 4096
_SIZE_RE = re.compile(r"\s*(\d{1,6})\s*[xX\u00d7]\s*(\d{1,6})\s*")


def parse_image_request(payload: Any, limits: Limits) -> ImageRequest:
    """A parsed /v1/images/generations body -> ImageRequest, or APIError (400).

    `prompt` a non-empty string of at most `limits.max_prompt_chars` characters (code
    "context_length_exceeded" beyond); `n` an integer in [1, max_n] (default 1); `size` "WxH" with
    sides 1..4096, or "auto"/absent (None: the model's native size); `response_format` "b64_json"
    (default) - "url" is refused, since this server stores no files; `guidance_scale` (extra) a number
    in [0, 100], default DRAW_GUIDANCE_SCALE; `seed` an integer; `model` a string. `quality`, `style`, `user` and unknown
    fields are ignored; `stream: true` is refused.
    """
    if not isinstance(payload, dict):
        raise APIError(
            400, f"the request body must be a JSON object, got {_describe(payload)}", code="invalid_type"
        )
    prompt = payload.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise _invalid_type("prompt", "a string", prompt)
    if not prompt.strip():
        raise _invalid_value("prompt", "a non-empty string", prompt)
    if len(prompt) > limits.max_prompt_chars:
        raise APIError(
            400,
            f"'prompt' has {len(prompt)} characters, more than this server's limit of "
            f"{limits.max_prompt_chars}; shorten it",
            param="prompt",
            code="context_length_exceeded",
        )
    n = _get_int(payload, "n", 1, limits.max_n, 1)

    size = payload.get("size")
    parsed_size: tuple[int, int] | None = None
    if size is not None and size != "auto":
        expected = f'"WIDTHxHEIGHT" with sides 1..{_MAX_SIDE} (e.g. "512x512"), or "auto"'
        if not isinstance(size, str):
            raise _invalid_type("size", expected, size)
        match = _SIZE_RE.fullmatch(size)
        if match is None:
            raise _invalid_value("size", expected, size)
        width, height = int(match.group(1)), int(match.group(2))
        if not (1 <= width <= _MAX_SIDE and 1 <= height <= _MAX_SIDE):
            raise _invalid_value("size", expected, size)
        parsed_size = (width, height)

    response_format = payload.get("response_format")
    if response_format is None:
        response_format = "b64_json"
    elif response_format == "url":
        raise APIError(
            400,
            "response_format 'url' is not supported: this server does not host image files; use "
            "response_format 'b64_json' (the default)",
            param="response_format",
            code="unsupported_value",
        )
    elif response_format != "b64_json":
        raise _invalid_value("response_format", "'b64_json'", response_format)

    if _get_bool(payload, "stream", False):
        raise _unsupported("stream", "streaming image generation is not supported; omit 'stream'")

    return ImageRequest(
        prompt=prompt,
        n=n if n is not None else 1,
        size=parsed_size,
        response_format=response_format,
        guidance_scale=_get_guidance_scale(payload),
        seed=_get_seed(payload),
        model=_get_str(payload, "model"),
    )


# ---------------------------------------------------------------------------------- markdown images
# `![alt](data:image/<type>;base64,<payload>)`. Found by a literal search for "](data:image/" and checked
# around each hit, so the cost is linear in the text even for adversarial input (no regex backtracking
# over the whole text).
_MARKDOWN_NEEDLE = "](data:image/"
_MARKDOWN_URL_RE = re.compile(
    r"data:image/[A-Za-z0-9.+-]{1,32}(?:;[A-Za-z0-9=._-]{1,64}){0,4};base64,[A-Za-z0-9+/=_-]*"
)
_MARKDOWN_TAIL_RE = re.compile(r"[ \t]*\)")
_MAX_ALT = 1000


def split_markdown_images(text: str) -> list[dict]:
    """Text with markdown data-URL images -> OpenAI content parts, in order.

    "a ![x](data:image/png;base64,iVBOR...) b" -> [{"type": "text", "text": "a "}, {"type": "image_url",
    "image_url": {"url": "data:image/png;base64,iVBOR..."}}, {"type": "text", "text": " b"}]. This is
    how images the server drew come back in later turns; the model must see the image, not base64.
    Only data: URLs are recognised (a markdown link to a remote image stays text); the alt text is
    dropped; empty text between images is left out. Text without images -> one text part (even "").
    """
    parts: list[dict] = []
    position = 0  # start of the text not yet emitted
    search = 0
    while True:
        hit = text.find(_MARKDOWN_NEEDLE, search)
        if hit < 0:
            break
        search = hit + 1
        start = text.rfind("![", max(position, hit - _MAX_ALT), hit)
        if start < 0 or "]" in text[start + 2 : hit]:
            continue
        url_match = _MARKDOWN_URL_RE.match(text, hit + 2)
        if url_match is None:
            continue
        tail = _MARKDOWN_TAIL_RE.match(text, url_match.end())
        if tail is None:
            continue
        if start > position:
            parts.append({"type": "text", "text": text[position:start]})
        parts.append({"type": "image_url", "image_url": {"url": url_match.group(0)}})
        position = search = tail.end()
    if not parts:
        return [{"type": "text", "text": text}]
    if position < len(text):
        parts.append({"type": "text", "text": text[position:]})
    return parts


# --------------------------------------------------------------------------------------- image URLs
_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # the formats this server decodes
_FETCH_TIMEOUT_S = 10.0
_MAX_URL_CHARS = 8192  # for remote URLs; data: URLs are bounded by the body limit
# `load_image`'s refusal reasons -> (status, error code, what the client can do about it).
_IMAGE_REFUSALS = {
    "source": (400, "invalid_image_url", "send a data: URL (data:image/png;base64,...)"),
    "format": (400, "invalid_image_format", "send PNG, JPEG, WEBP or GIF"),
    "too_large": (413, "image_too_large", "send a smaller image"),
    "invalid": (400, "invalid_image", "send a complete PNG, JPEG, WEBP or GIF image"),
}


def decode_image_url(url: str, limits: Limits, param: str) -> Image.Image:
    """An image URL from a request -> an RGB PIL image, or APIError with `param`.

    - `data:<media type>;base64,<payload>`: a data URL without ";base64" -> 400 "invalid_image_url".
    - `http(s)://...`: 400 unless `limits.allow_remote_images`; then fetched with a 10 s timeout and a
      streamed cap of `max_image_bytes` (413 above it); fetch errors and HTTP errors -> 400.
    - any other scheme (file:// and bare paths included) -> 400.
    Decoding and every check on the image are `tokenizer_vision.load_image`'s, with formats PNG, JPEG,
    WEBP and GIF (the data URL's declared media type too), `max_bytes=limits.max_image_bytes` (judged
    from the base64 length, before decoding) and `max_pixels=limits.max_image_pixels` (read from the
    header, before any pixel is decoded). Its refusals become: too many bytes or pixels, or a
    decompression bomb -> 413 "image_too_large"; another media type or format -> 400
    "invalid_image_format"; a malformed data URL -> 400 "invalid_image_url"; bad base64, no data, not
    an image, truncated or corrupt data -> 400 "invalid_image". GIF and animated WEBP: the first
    frame; EXIF orientation applied, transparency composited over white (as in training).
    """
    from tokenizer_vision.image_processing import ImageError, load_image

    if not isinstance(url, str):
        raise _invalid_type(param, "a string (a data: URL)", url)
    url = url.strip()
    scheme = url[: url.find(":")].lower() if ":" in url[:16] else ""
    if scheme == "data":
        if _percent_encoded(url):
            raise APIError(
                400,
                "data URLs must be base64-encoded (data:image/png;base64,<data>)",
                param=param,
                code="invalid_image_url",
            )
        source: str | bytes = url
    elif scheme in ("http", "https"):
        if not limits.allow_remote_images:
            raise APIError(
                400,
                "remote image URLs are disabled; send a data: URL (or start the server with "
                "--allow-remote-images)",
                param=param,
                code="remote_images_disabled",
            )
        source = _fetch(url, limits, param)
    else:
        raise APIError(
            400,
            f"unsupported image URL{f' scheme {scheme!r}' if scheme else ''}; send a data: URL "
            "(data:image/png;base64,...)",
            param=param,
            code="invalid_image_url",
        )
    try:
        return load_image(
            source, limits.max_image_pixels, max_bytes=limits.max_image_bytes, formats=_IMAGE_FORMATS
        )
    except ImageError as error:
        status, code, hint = _IMAGE_REFUSALS[error.reason]
        raise APIError(status, f"{error}; {hint}", param=param, code=code) from None


def _percent_encoded(url: str) -> bool:
    """A data: URL in RFC 2397's %-escaped form: `load_image` reads it, this server takes base64 only."""
    comma = url.find(",")
    return comma >= 0 and "base64" not in (item.strip().lower() for item in url[5:comma].split(";")[1:])


def _image_too_large(size: int, limits: Limits, param: str) -> APIError:
    return APIError(
        413,
        f"image is {size} bytes, above this server's limit of {limits.max_image_bytes} bytes; send a smaller "
        "image",
        param=param,
        code="image_too_large",
    )


def _fetch(url: str, limits: Limits, param: str) -> bytes:
    """GET an image with a 10 s budget and a streamed size cap."""
    import httpx

    if len(url) > _MAX_URL_CHARS:
        raise APIError(
            400, f"image URL longer than {_MAX_URL_CHARS} characters", param=param, code="invalid_image_url"
        )
    deadline = time.monotonic() + _FETCH_TIMEOUT_S
    shown = url if len(url) <= 100 else url[:100] + "..."
    try:
        with (
            httpx.Client(timeout=_FETCH_TIMEOUT_S, follow_redirects=True, max_redirects=5) as client,
            client.stream("GET", url, headers={"Accept": "image/*"}) as response,
        ):
            if response.status_code >= 400:
                raise APIError(
                    400,
                    f"could not fetch image {shown}: HTTP {response.status_code}",
                    param=param,
                    code="image_fetch_failed",
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_image_bytes:
                raise _image_too_large(int(declared), limits, param)
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > limits.max_image_bytes:
                    raise _image_too_large(total, limits, param)
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise httpx.TimeoutException("took longer than the time budget")
            return b"".join(chunks)
    except APIError:
        raise
    except httpx.TimeoutException:
        raise APIError(
            400,
            f"could not fetch image {shown}: timed out after {_FETCH_TIMEOUT_S:g} s; send a data: URL "
            "instead",
            param=param,
            code="image_fetch_failed",
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, OSError) as error:
        raise APIError(
            400,
            f"could not fetch image {shown}: {type(error).__name__}: {error}; send a data: URL instead",
            param=param,
            code="image_fetch_failed",
        ) from None
