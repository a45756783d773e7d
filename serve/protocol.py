"""Request parsing and validation for the OpenAI-compatible server.

Everything a client sends passes through this module before it reaches the model. The request schema
is declared as pydantic models, one per endpoint (`ChatCompletionRequest`, `ImageGenerationRequest`,
`ImageEditRequest`; an edit's multipart form is read by `read_edit_form`, its fields typed from their text):
types and ranges are field constraints, cross-field rules and the server's configurable caps
(`Limits`, passed as the validation context) are validators. Every refusal is an `APIError`, which the
app turns into a 4xx with OpenAI's error body `{"error": {"message", "type", "param", "code"}}`; bad
input never escapes as another exception (a 500) and never makes the server do unbounded work:

- the body is refused (413) above `Limits.max_body_bytes` before it is parsed;
- the schema, the number of messages, stop strings, images and the amount of text are checked before
  any image is looked at (`read_chat_request`);
- an image's encoded size is checked before its base64 is decoded, and its pixel count is read from
  its header before any pixel is decoded, per image and summed over the request
  (`check_image_headers`, then `tokenizer_vision.load_image` checks each image again as it decodes).

Status codes: 413 for "too large" (body, image bytes, image pixels), 400 for everything else,
including too many images and too much text (code "context_length_exceeded", as OpenAI does).
`param` names the offending field in OpenAI's dotted style, e.g. "messages[1].content[0].image_url";
`code` is "invalid_type", "invalid_value", "missing_required_parameter", "unsupported_parameter",
"unsupported_value" or a specific one ("too_many_images", "image_too_large", ...).

Field policy for chat completions: fields we honour are validated; harmless OpenAI fields we do not
use (user, frequency_penalty, presence_penalty, metadata, store, ...) and unknown fields are ignored;
fields that would change what the client gets back and that we cannot honour (non-empty tools or
functions, tool_choice other than "none"/"auto", logprobs, top_logprobs, response_format other than
text, audio output, non-empty logit_bias, web_search_options) are refused with a 400 naming them.

Remote images (`--allow-remote-images`) are fetched by `fetch_image`: only http(s), the host resolved
first and every address checked (`is_public_address`: no private, loopback, link-local, reserved,
multicast or unspecified address, IPv4 embedded in IPv6 included), the connection made to the checked
address, redirects followed by hand (at most 5, each hop checked the same way), 10 s and
`max_image_bytes` at most. Every failure is the same 400 "could not fetch the image URL", so the
server cannot be used to probe which hosts or ports answer.

PIL (through `tokenizer_vision.load_image`, the project's one image decoder) is imported inside the
functions that need it; the image header check (`check_image_headers`) reads PNG, GIF, WEBP and JPEG
headers itself, without PIL.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import struct
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from mllm.config import (
    DECODING_METHODS,
    DEFAULT_DECODING,
    DRAW_GUIDANCE_SCALE,
    EDIT_GUIDANCE,
    EDIT_GUIDANCE_MODES,
)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatRequest",
    "EditRequest",
    "ImageEditRequest",
    "ImageGenerationRequest",
    "ImageRef",
    "ImageRequest",
    "Limits",
    "check_image_headers",
    "decode_image",
    "decode_image_url",
    "fetch_image",
    "fetch_remote_images",
    "is_public_address",
    "parse_chat_request",
    "parse_image_request",
    "parse_json_body",
    "read_chat_request",
    "read_edit_form",
    "read_edit_json",
    "split_markdown_images",
]

logger = logging.getLogger("serve")


# ------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error the client caused: `status` (4xx) and OpenAI's error body via `body()`; `headers` are
    sent with the response (e.g. `Connection: close`)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # OpenAI's field name (shadows the builtin here only)
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


# ------------------------------------------------------------------------------------------- limits
@dataclass
class Limits:
    """Server-side caps on what one request may ask for (`mllm serve`'s flags set them)."""

    max_body_bytes: int = 32 * 2**20
    body_timeout_s: float = 60.0  # the whole body must arrive within this (408 otherwise)
    max_image_bytes: int = 16 * 2**20  # decoded (not base64) bytes of one image
    max_image_pixels: int = 4096 * 4096  # width * height of one image, read from its header
    max_request_pixels: int = 2 * 4096 * 4096  # summed over the images of a request, from their headers
    max_images: int = 8  # images per request, over all messages (markdown images included)
    max_messages: int = 256  # messages per chat request
    max_content_parts: int = 2048  # content parts over all messages (text parts cost validation time too)
    max_prompt_chars: int = 200_000  # total text characters of a request (cheap guard before tokenizing)
    max_stop: int = 4  # stop strings per request (OpenAI's rule)
    max_stop_chars: int = 128  # characters per stop string
    max_tokens: int = 2048  # the largest max_tokens / max_completion_tokens accepted
    max_n: int = 8
    max_output_pixels: int = 2048 * 2048  # images/generations: width * height * n (PNG-encoding 4 MP takes ~2 s)
    allow_remote_images: bool = False  # fetch http(s):// image URLs (off: only data: URLs)
    # The temperature of a chat request that gives none; None: 1, OpenAI's default (`create_app` sets it from
    # the model's generation config).
    default_temperature: float | None = None
    # How drawn images are decoded when a request gives no `decoding` (`mllm serve --decoding`).
    default_decoding: str = DEFAULT_DECODING


# A positive temperature below this samples from a distribution that is greedy in all but name, and
# 1 / temperature overflows for tiny ones (1e-300 -> inf -> NaN probabilities): it is decoded greedily.
GREEDY_BELOW = 1e-5


def effective_temperature(value: float) -> float:
    """`value`, or 0 (greedy) for a positive temperature below `GREEDY_BELOW`."""
    return 0.0 if value < GREEDY_BELOW else float(value)


# ----------------------------------------------------------------------------------------- requests
@dataclass(eq=False)
class ImageRef:
    """An image of a request before decoding: its URL, the `param` it came from, and the bytes fetched
    for a remote URL (`fetch_remote_images`)."""

    url: str
    param: str
    data: bytes | None = None

    @property
    def source(self) -> str | bytes:
        """What `load_image` decodes: the fetched bytes, or the data URL."""
        return self.data if self.data is not None else self.url

    @property
    def remote(self) -> bool:
        return _scheme(self.url) in ("http", "https")


@dataclass
class ChatRequest:
    """A validated /v1/chat/completions request.

    `messages` are in the processor's format: {"role": "system" | "user" | "assistant", "content":
    [{"type": "text", "text": str} | {"type": "image", "image": PIL.Image (RGB)}]}; "developer" is
    mapped to "system", string content to one text part, markdown data-URL images in user/assistant
    text to image parts, and an assistant's null content to an empty list. Before the images are
    decoded (`read_chat_request`) an image part holds its `ImageRef`; `image_refs` lists them in order.
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
    decoding: str = DEFAULT_DECODING  # extra field: "auto" | "jacobi" | "sequential", for images drawn inside the chat
    image_count: int = 0
    image_refs: list[ImageRef] = field(default_factory=list, compare=False, repr=False)


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
    decoding: str = DEFAULT_DECODING  # extra field: "auto" | "jacobi" | "sequential"


@dataclass
class EditRequest:
    """A validated /v1/images/edits request: the image to edit (an `ImageRef`, not decoded yet: its bytes for
    an uploaded file, its URL otherwise), the instruction (`prompt`) and the options (`size` is (width,
    height); None for "auto")."""

    image: ImageRef
    prompt: str
    n: int = 1
    size: tuple[int, int] | None = None
    response_format: str = "b64_json"
    guidance_scale: float | None = None  # extra field; None: the model's own (`config.edit_guidance_scale`)
    guidance: str = EDIT_GUIDANCE  # extra field: what guidance's unconditional branch drops
    image_guidance_scale: float | None = None  # extra field: both guidances at once, this the image's scale
    seed: int | None = None
    model: str | None = None
    decoding: str = DEFAULT_DECODING  # extra field: "auto" | "jacobi" | "sequential"


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


# ------------------------------------------------------------------------- validation -> APIError
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


def _refusal(code: str, text: str, param: str | None = None) -> PydanticCustomError:
    """A validator's refusal: `code` becomes the error code, `text` the message ("{param}" in it is
    replaced by the full param), `param` a path relative to where the validator runs (None: there)."""
    return PydanticCustomError(code, "{text}", {"text": text, "param": param})


def _limits(info: ValidationInfo) -> Limits:
    context = info.context or {}
    return context.get("limits") or Limits()


def _param(loc: tuple, relative: str | None = None) -> str | None:
    """A pydantic error location (+ a relative path) -> OpenAI's dotted param: messages[0].content."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    if relative:
        out += relative if relative.startswith("[") or not out else f".{relative}"
    return out or None


_TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}
_BOUND_WORDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _expected(schema: type[BaseModel], loc: tuple, values: dict) -> str | None:
    """What the field at `loc` must be, from its description (or, for a list item, the item model's
    `expected`), with {limit} placeholders filled from `values`."""
    node: Any = schema
    text = getattr(schema, "expected", None) if not loc else None
    for part in loc:
        model = _model_of(node)
        if isinstance(part, int):
            node = _item_of(node)
            item_info = _annotated_info(node)
            item_model = _model_of(node)
            text = (item_info.description if item_info is not None else None) or (
                getattr(item_model, "expected", None) if item_model is not None else None
            )
            continue
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        text, node = info.description, info.annotation
    if text is None:
        return None
    return re.sub(r"\{(\w+)\}", lambda m: str(values.get(m.group(1), m.group(0))), text)


def _strip(annotation: Any) -> Any:
    """Optional[X] / Annotated[X, ...] -> X."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or type(annotation).__name__ == "UnionType":
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _model_of(annotation: Any) -> type[BaseModel] | None:
    annotation = _strip(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _item_of(annotation: Any) -> Any:
    annotation = _strip(annotation)
    args = get_args(annotation)
    return args[0] if get_origin(annotation) is list and args else None


def _annotated_info(annotation: Any) -> FieldInfo | None:
    while get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            return None
        annotation = members[0]
    if get_origin(annotation) is Annotated:
        return next((m for m in get_args(annotation)[1:] if isinstance(m, FieldInfo)), None)
    return None


def _validate(schema: type[BaseModel], payload: Any, limits: Limits) -> Any:
    """`schema.model_validate(payload)` with `limits` as the context; the first error -> APIError."""
    try:
        return schema.model_validate(payload, context={"limits": limits})
    except ValidationError as error:
        raise _api_error(schema, error.errors(include_url=False)[0], limits) from None


def _api_error(schema: type[BaseModel], error: dict, limits: Limits) -> APIError:
    kind, loc, context = error["type"], tuple(error["loc"]), error.get("ctx") or {}
    if "text" in context and "param" in context:  # a validator's own refusal (`_refusal`)
        param = _param(loc, context["param"])
        return APIError(400, context["text"].replace("{param}", param or ""), param=param, code=kind)
    param = _param(loc)
    if kind == "missing":
        return APIError(400, f"'{param}' is required", param=param, code="missing_required_parameter")
    expected = _expected(schema, loc, dataclasses.asdict(limits))
    if expected is None:
        if kind in _TYPE_WORDS:
            expected = _TYPE_WORDS[kind]
        elif kind in _BOUND_WORDS:
            bound = next(iter(context.values()), "")
            expected = f"{_BOUND_WORDS[kind]} {bound}"
        else:
            expected = error["msg"][0].lower() + error["msg"][1:]
    code = "invalid_type" if kind in _TYPE_WORDS else "invalid_value"
    got = _describe(error.get("input"))
    if param is None:
        return APIError(400, f"the request body must be {expected}, got {got}", code=code)
    return APIError(400, f"'{param}' must be {expected}, got {got}", param=param, code=code)


# --------------------------------------------------------------------------------------- the schema
class _Schema(BaseModel):
    """Unknown fields are ignored (as OpenAI's API does for forward compatibility)."""

    model_config = ConfigDict(extra="ignore")
    expected: ClassVar[str] = "an object"


Temperature = Annotated[StrictFloat, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[StrictFloat, Field(gt=0, le=1, allow_inf_nan=False)]
GuidanceScale = Annotated[StrictFloat, Field(ge=0, le=100, allow_inf_nan=False)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]  # int64: what torch's generators take
StopString = Annotated[StrictStr, Field(min_length=1, description="a non-empty string")]
_DECODINGS = ", ".join(repr(name) for name in DECODING_METHODS)
Decoding = Annotated[StrictStr, Field(description=f"one of {_DECODINGS}")]


def _known_decoding(value: str | None) -> str | None:
    """The extra field `decoding`: a name of `DECODING_METHODS` (or absent)."""
    if value is not None and value not in DECODING_METHODS:
        raise _refusal("invalid_value", f"'{{param}}' must be one of {_DECODINGS}, got {_describe(value)}")
    return value


def _at_most(value: int | None, cap: int, expected: str) -> int | None:
    if value is not None and value > cap:
        raise _refusal("invalid_value", f"'{{param}}' must be {expected}, got {_describe(value)}")
    return value


class ImageURL(_Schema):
    expected: ClassVar[str] = 'an object {"url": "data:image/png;base64,..."}'

    url: StrictStr = Field(description="a string (a data: URL)")
    detail: Any = None


class ContentPart(_Schema):
    """{"type": "text", "text"}, {"type": "image_url", "image_url": {"url"} or "<url>"}, or an earlier
    assistant turn's {"type": "refusal", "refusal"}; which fields a type needs is `ChatMessage`'s rule."""

    expected: ClassVar[str] = 'an object such as {"type": "text", "text": "..."}'

    type: StrictStr = Field(description='a string ("text" or "image_url")')
    text: StrictStr | None = Field(None, description="a string")
    refusal: StrictStr | None = Field(None, description="a string")
    image_url: ImageURL | None = Field(None, description='an object {"url": "data:image/png;base64,..."}')

    @model_validator(mode="before")
    @classmethod
    def _bare_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("image_url"), str):
            return {**data, "image_url": {"url": data["image_url"]}}
        return data


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatMessage(_Schema):
    """A message: role system, developer (= system), user or assistant; content a string, null
    (assistant only) or a non-empty array of content parts; no images in system messages."""

    expected: ClassVar[str] = 'an object {"role": ..., "content": ...}'

    role: StrictStr = Field(description="one of 'system', 'developer', 'user', 'assistant'")
    content: list[ContentPart] | None = Field(None, description="a string or an array of content parts")
    tool_calls: Any = None
    function_call: Any = None
    _text_content: bool = PrivateAttr(False)  # the client sent a string (errors then name "content")

    @model_validator(mode="wrap")
    @classmethod
    def _string_content(cls, data: Any, handler) -> ChatMessage:
        text = isinstance(data, dict) and isinstance(data.get("content"), str)
        if text:
            data = {**data, "content": [{"type": "text", "text": data["content"]}]}
        message = handler(data)
        message._text_content = text
        return message

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in _ROLES:
            extra = " (tool and function messages are not supported)" if role in ("tool", "function") else ""
            raise _refusal(
                "invalid_value",
                f"'{{param}}' must be one of 'system', 'developer', 'user', 'assistant', got "
                f"{_describe(role)}{extra}",
            )
        return role

    @model_validator(mode="after")
    def _content_rules(self) -> ChatMessage:
        for key in ("tool_calls", "function_call"):
            if getattr(self, key):
                raise _refusal(
                    "unsupported_parameter",
                    f"'{key}' in messages is not supported: this server does no tool calling",
                    key,
                )
        assistant = self.role == "assistant"
        if "content" not in self.model_fields_set and not assistant:
            raise _refusal("missing_required_parameter", "'{param}' is required", "content")
        if self.content is None:
            if not assistant:
                raise _refusal(
                    "invalid_type", "'{param}' must be a string or an array of content parts, got null", "content"
                )
            return self
        if not self.content:
            raise _refusal(
                "invalid_value", "'{param}' must be a non-empty array of content parts, got an array", "content"
            )
        for index, part in enumerate(self.content):
            where = f"content[{index}]"
            if part.type == "text":
                if part.text is None:
                    raise _refusal("invalid_type", "'{param}' must be a string, got null", f"{where}.text")
            elif part.type == "refusal" and assistant:
                if part.refusal is None:
                    raise _refusal("invalid_type", "'{param}' must be a string, got null", f"{where}.refusal")
            elif part.type == "image_url":
                if _ROLES[self.role] == "system":
                    raise _refusal(
                        "invalid_value", "system messages may only contain text; put images in a user message", where
                    )
                if part.image_url is None:
                    raise _refusal(
                        "invalid_type",
                        '\'{param}\' must be an object {"url": "data:image/png;base64,..."}, got null',
                        f"{where}.image_url",
                    )
            else:
                raise _refusal(
                    "invalid_value",
                    f"content part type {_describe(part.type)} is not supported; use 'text' or 'image_url' parts",
                    f"{where}.type",
                )
        return self


@dataclass
class _Part:
    """One content part before image decoding: text, or an image URL with the param it came from."""

    kind: str  # "text" | "image"
    value: str  # the text, or the image URL
    param: str


class StreamOptions(_Schema):
    expected: ClassVar[str] = 'an object such as {"include_usage": true}'

    include_usage: StrictBool | None = Field(None, description="a boolean")


_TOOLS = "is not supported: this server does not do function/tool calling"
# OpenAI parameters this server takes only in their "off" form: field -> (is it off?, what to tell the client).
_OFF_ONLY: dict[str, tuple[Any, str]] = {
    "tools": (lambda value: not value, f"'tools' {_TOOLS}"),
    "functions": (lambda value: not value, f"'functions' {_TOOLS}"),
    "tool_choice": (lambda value: value in (None, "none", "auto"), f"'tool_choice' {_TOOLS}; omit it"),
    "function_call": (lambda value: value in (None, "none", "auto"), f"'function_call' {_TOOLS}; omit it"),
    "logprobs": (lambda value: not value, "'logprobs' is not supported by this server; omit it or set it to false"),
    "top_logprobs": (lambda value: value is None or value == 0,
                     "'top_logprobs' is not supported by this server; omit it"),
    "audio": (lambda value: value is None, "audio output is not supported by this server; omit 'audio'"),
    "logit_bias": (lambda value: not value, "'logit_bias' is not supported by this server; omit it"),
    "web_search_options": (lambda value: value is None, "web search is not supported by this server; omit it"),
}


class ChatCompletionRequest(_Schema):
    """POST /v1/chat/completions. Caps that the server configures (`Limits`) are checked by validators
    reading the validation context; `messages` comes last, so a bad scalar field is reported first."""

    expected: ClassVar[str] = "a JSON object"

    # fields that would change the answer and that this server cannot honour
    tools: list[Any] | None = Field(None, description="an array")
    functions: list[Any] | None = Field(None, description="an array")
    tool_choice: Any = None
    function_call: Any = None
    logprobs: StrictBool | None = Field(None, description="a boolean")
    top_logprobs: Any = None
    response_format: dict[str, Any] | None = Field(None, description='an object such as {"type": "text"}')
    audio: Any = None
    modalities: list[StrictStr] | None = Field(None, description="an array of strings")
    logit_bias: dict[str, Any] | None = Field(None, description="an object")
    web_search_options: Any = None
    # honoured
    model: StrictStr | None = Field(None, description="a string")
    temperature: Temperature | None = Field(None, description="a number >= 0 and <= 2")
    top_p: TopP | None = Field(None, description="a number > 0 and <= 1")
    n: PositiveInt | None = Field(None, description="an integer between 1 and {max_n}")
    max_tokens: PositiveInt | None = Field(None, description="an integer between 1 and {max_tokens}")
    max_completion_tokens: PositiveInt | None = Field(None, description="an integer between 1 and {max_tokens}")
    seed: Seed | None = Field(None, description="a 64-bit signed integer")
    stop: list[StopString] | None = Field(
        None, description="a string or an array of at most {max_stop} strings"
    )
    stream: StrictBool | None = Field(None, description="a boolean")
    stream_options: StreamOptions | None = Field(None, description='an object such as {"include_usage": true}')
    guidance_scale: GuidanceScale | None = Field(None, description="a number >= 0 and <= 100")
    decoding: Decoding | None = Field(None, description=f"one of {_DECODINGS}")
    messages: list[ChatMessage] = Field(min_length=1, description="a non-empty array of messages")

    _parts: list[tuple[str, list[_Part]]] = PrivateAttr(default_factory=list)

    @field_validator(*_OFF_ONLY)
    @classmethod
    def _off_only(cls, value: Any, info: ValidationInfo) -> Any:
        is_off, message = _OFF_ONLY[info.field_name]
        if not is_off(value):
            raise _refusal("unsupported_parameter", message)
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict | None) -> dict | None:
        if value is not None and value.get("type", "text") != "text":
            raise _refusal(
                "unsupported_value",
                f"response_format {_describe(value.get('type'))} is not supported: this server only produces "
                'free text ({"type": "text"}); omit response_format',
            )
        return value

    @field_validator("modalities")
    @classmethod
    def _no_audio_modality(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and "audio" in value:
            raise _refusal(
                "unsupported_value", 'audio output is not supported by this server; use modalities ["text"]'
            )
        return value

    @field_validator("temperature")
    @classmethod
    def _tiny_is_greedy(cls, value: float | None) -> float | None:
        return None if value is None else effective_temperature(value)

    _decoding = field_validator("decoding")(_known_decoding)

    @field_validator("n")
    @classmethod
    def _n_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        cap = _limits(info).max_n
        return _at_most(value, cap, f"an integer between 1 and {cap}")

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _tokens_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        cap = _limits(info).max_tokens
        return _at_most(value, cap, f"an integer between 1 and {cap}")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = [value]
        cap = _limits(info).max_stop
        if isinstance(value, list) and len(value) > cap:
            raise _refusal("invalid_value", f"'{{param}}' may hold at most {cap} sequences, got {len(value)}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_length(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        cap = _limits(info).max_stop_chars
        for index, item in enumerate(value or []):
            if len(item) > cap:
                raise _refusal(
                    "invalid_value",
                    f"'{{param}}' has {len(item)} characters; this server accepts stop strings of at most {cap}",
                    f"[{index}]",
                )
        return value

    @field_validator("messages", mode="before")
    @classmethod
    def _message_count(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            raise _refusal("missing_required_parameter", "'{param}' is required")
        limits = _limits(info)
        if not isinstance(value, list):
            return value
        if len(value) > limits.max_messages:  # refused before any message is validated
            raise _refusal(
                "too_many_messages",
                f"this request has {len(value)} messages; this server accepts at most {limits.max_messages} per "
                "request",
            )
        parts = sum(len(m["content"]) for m in value if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > limits.max_content_parts:
            raise _refusal(
                "too_many_content_parts",
                f"this request has {parts} content parts; this server accepts at most {limits.max_content_parts} "
                "per request",
            )
        return value

    @model_validator(mode="after")
    def _images_and_text(self, info: ValidationInfo) -> ChatCompletionRequest:
        """Markdown images split out, then images and text counted: all before any image is touched."""
        limits = _limits(info)
        self._parts = [_message_parts(message, index) for index, message in enumerate(self.messages)]
        images = sum(1 for _, parts in self._parts for part in parts if part.kind == "image")
        if images > limits.max_images:
            raise _refusal(
                "too_many_images",
                f"this request has {images} images; this server accepts at most {limits.max_images} per "
                "request (markdown images in message text count too)",
                "messages",
            )
        chars = sum(len(part.value) for _, parts in self._parts for part in parts if part.kind == "text")
        if chars > limits.max_prompt_chars:
            raise _refusal(
                "context_length_exceeded",
                f"the messages hold {chars} characters of text, more than this server's limit of "
                f"{limits.max_prompt_chars}; shorten the conversation",
                "messages",
            )
        return self


def _message_parts(message: ChatMessage, index: int) -> tuple[str, list[_Part]]:
    """A validated message -> (processor role, parts), markdown data-URL images in user and assistant
    text split out as image parts."""
    role = _ROLES[message.role]
    split = role in ("user", "assistant")
    base = f"messages[{index}].content"
    parts: list[_Part] = []
    for number, part in enumerate(message.content or []):
        param = base if message._text_content else f"{base}[{number}]"
        if part.type == "image_url":
            assert part.image_url is not None
            parts.append(_Part("image", part.image_url.url, f"{param}.image_url"))
        elif part.type == "refusal":
            parts.append(_Part("text", part.refusal or "", f"{param}.refusal"))
        else:
            text = part.text or ""
            text_param = param if message._text_content else f"{param}.text"
            if not split:
                parts.append(_Part("text", text, text_param))
                continue
            for piece in split_markdown_images(text):
                if piece["type"] == "text":
                    parts.append(_Part("text", piece["text"], text_param))
                else:
                    parts.append(_Part("image", piece["image_url"]["url"], text_param))
    return role, parts


class ImageGenerationRequest(_Schema):
    """POST /v1/images/generations. `quality`, `style`, `user` and unknown fields are ignored."""

    expected: ClassVar[str] = "a JSON object"

    prompt: StrictStr = Field(description="a non-empty string")
    n: PositiveInt | None = Field(None, description="an integer between 1 and {max_n}")
    size: StrictStr | None = None  # "WxH" or "auto"; checked by `_size_form`
    response_format: StrictStr | None = Field(None, description="'b64_json'")
    guidance_scale: GuidanceScale | None = Field(None, description="a number >= 0 and <= 100")
    decoding: Decoding | None = Field(None, description=f"one of {_DECODINGS}")
    seed: Seed | None = Field(None, description="a 64-bit signed integer")
    model: StrictStr | None = Field(None, description="a string")
    stream: StrictBool | None = Field(None, description="a boolean")

    _decoding = field_validator("decoding")(_known_decoding)

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise _refusal("invalid_value", f"'{{param}}' must be a non-empty string, got {_describe(value)}")
        cap = _limits(info).max_prompt_chars
        if len(value) > cap:
            raise _refusal(
                "context_length_exceeded",
                f"'prompt' has {len(value)} characters, more than this server's limit of {cap}; shorten it",
            )
        return value

    @field_validator("n")
    @classmethod
    def _n_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        cap = _limits(info).max_n
        return _at_most(value, cap, f"an integer between 1 and {cap}")

    @field_validator("size", mode="before")
    @classmethod
    def _size_form(cls, value: Any) -> Any:
        if value is not None and value != "auto" and _parse_size(value) is None:
            code = "invalid_value" if isinstance(value, str) else "invalid_type"
            raise _refusal(code, f"'{{param}}' must be {_SIZE_EXPECTED}, got {_describe(value)}")
        return value

    @field_validator("response_format")
    @classmethod
    def _b64_only(cls, value: str | None) -> str | None:
        if value == "url":
            raise _refusal(
                "unsupported_value",
                "response_format 'url' is not supported: this server does not host image files; use "
                "response_format 'b64_json' (the default)",
            )
        if value is not None and value != "b64_json":
            raise _refusal("invalid_value", f"'{{param}}' must be 'b64_json', got {_describe(value)}")
        return value

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool | None) -> bool | None:
        if value:
            raise _refusal("unsupported_parameter", "streaming image generation is not supported; omit 'stream'")
        return value

    @model_validator(mode="after")
    def _output_pixels(self, info: ValidationInfo) -> ImageGenerationRequest:
        size = self.dimensions
        if size is not None:
            cap = _limits(info).max_output_pixels
            pixels = size[0] * size[1] * (self.n or 1)
            if pixels > cap:
                raise _refusal(
                    "invalid_value",
                    f"'size' x 'n' asks for {pixels} pixels; this server draws at most {cap} pixels per "
                    "request; ask for fewer or smaller images",
                    "size",
                )
        return self

    @property
    def dimensions(self) -> tuple[int, int] | None:
        """`size` as (width, height); None for "auto" or none."""
        return None if self.size in (None, "auto") else _parse_size(self.size)


_MAX_SIDE = 4096
_SIZE_RE = re.compile(r"\s*(\d{1,6})\s*[xX\u00d7]\s*(\d{1,6})\s*")
_SIZE_EXPECTED = f'"WIDTHxHEIGHT" with sides 1..{_MAX_SIDE} (e.g. "512x512"), or "auto"'


def _parse_size(value: Any) -> tuple[int, int] | None:
    match = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    width, height = int(match.group(1)), int(match.group(2))
    return (width, height) if 1 <= width <= _MAX_SIDE and 1 <= height <= _MAX_SIDE else None


# --------------------------------------------------------------------------------------------- chat
def read_chat_request(payload: Any, limits: Limits) -> ChatRequest:
    """A parsed /v1/chat/completions body -> ChatRequest whose image parts hold `ImageRef`s (nothing
    fetched or decoded yet), or APIError (400).

    Rules (`param` names the field):
    - `messages`: a non-empty array of at most `limits.max_messages` {"role", "content"} (and at most
      `limits.max_content_parts` content parts in all); roles system,
      developer (= system), user, assistant; content a string, null (assistant only) or a non-empty
      array of {"type": "text", "text": str} and {"type": "image_url", "image_url": {"url": str,
      "detail"?}} (or "image_url": "<url>") parts; no images in system messages. Markdown data-URL
      images in user/assistant text (`![alt](data:image/png;base64,...)`, as this server returns drawn
      images) become image parts.
    - at most `limits.max_images` images in all (param "messages"), at most `limits.max_prompt_chars`
      characters of text (code "context_length_exceeded").
    - image URLs: data: URLs (base64), or http(s) when `limits.allow_remote_images`; others refused.
    - `temperature` a number in [0, 2] (default `limits.default_temperature`; below `GREEDY_BELOW`:
      greedy); `top_p` in (0, 1]; `n` an integer in [1, max_n]; `max_completion_tokens` (preferred) /
      `max_tokens` an integer in [1, max_tokens]; `seed` an integer (int64); `stop` a string or up to
      `max_stop` non-empty strings of at most `max_stop_chars` characters; `stream` a boolean;
      `stream_options.include_usage` a boolean; `guidance_scale` (extra) a number in [0, 100],
      default DRAW_GUIDANCE_SCALE; `decoding` (extra) "auto", "jacobi" or "sequential", how images drawn in the
      reply are decoded, default `limits.default_decoding`; `model` a string. Booleans are not numbers.
    - unsupported fields that change the answer's meaning (tools, logprobs, response_format other
      than text, ...) are refused; harmless and unknown fields are ignored.
    """
    request: ChatCompletionRequest = _validate(ChatCompletionRequest, payload, limits)
    refs: list[ImageRef] = []
    messages = []
    for role, parts in request._parts:
        content: list[dict] = []
        for part in parts:
            if part.kind == "text":
                content.append({"type": "text", "text": part.value})
            else:
                _check_image_url(part.value, limits, part.param)
                refs.append(ImageRef(part.value.strip(), part.param))
                content.append({"type": "image", "image": refs[-1]})
        messages.append({"role": role, "content": content})
    default_temperature = 1.0 if limits.default_temperature is None else limits.default_temperature
    temperature = request.temperature if request.temperature is not None else default_temperature
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return ChatRequest(
        messages=messages,
        model=request.model,
        max_tokens=max_tokens,
        temperature=effective_temperature(float(temperature)),
        top_p=request.top_p,
        seed=request.seed,
        stop=list(request.stop or []),
        n=request.n if request.n is not None else 1,
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        guidance_scale=request.guidance_scale if request.guidance_scale is not None else DRAW_GUIDANCE_SCALE,
        decoding=request.decoding or limits.default_decoding,
        image_count=len(refs),
        image_refs=refs,
    )


def parse_chat_request(payload: Any, limits: Limits) -> ChatRequest:
    """A parsed /v1/chat/completions body -> ChatRequest with decoded RGB images, or APIError: the
    checks of `read_chat_request`, then remote images fetched (`fetch_remote_images`), every image's
    header checked (`check_image_headers`) and only then the images decoded (`decode_image`)."""
    request = read_chat_request(payload, limits)
    fetch_remote_images(request.image_refs, limits)
    check_image_headers(request.image_refs, limits)
    images = {id(ref): decode_image(ref, limits) for ref in request.image_refs}
    for message in request.messages:
        for part in message["content"]:
            if part["type"] == "image":
                part["image"] = images[id(part["image"])]
    return request


# ------------------------------------------------------------------------------- images/generations
def parse_image_request(payload: Any, limits: Limits) -> ImageRequest:
    """A parsed /v1/images/generations body -> ImageRequest, or APIError (400).

    `prompt` a non-empty string of at most `limits.max_prompt_chars` characters (code
    "context_length_exceeded" beyond); `n` an integer in [1, max_n] (default 1); `size` "WxH" with
    sides 1..4096, or "auto"/absent (None: the model's native size), and width * height * n at most
    `limits.max_output_pixels`; `response_format` "b64_json" (default) - "url" is refused, since this
    server stores no files; `guidance_scale` (extra) a number in [0, 100], default
    DRAW_GUIDANCE_SCALE; `decoding` (extra) "auto", "jacobi" or "sequential", default `limits.default_decoding`;
    `seed` an integer; `model` a string. `quality`, `style`, `user` and unknown
    fields are ignored; `stream: true` is refused.
    """
    request: ImageGenerationRequest = _validate(ImageGenerationRequest, payload, limits)
    return ImageRequest(
        prompt=request.prompt,
        n=request.n if request.n is not None else 1,
        size=request.dimensions,
        response_format=request.response_format or "b64_json",
        guidance_scale=request.guidance_scale if request.guidance_scale is not None else DRAW_GUIDANCE_SCALE,
        seed=request.seed,
        model=request.model,
        decoding=request.decoding or limits.default_decoding,
    )


# ------------------------------------------------------------------------------------ images/edits
_EDIT_GUIDANCES = ", ".join(repr(name) for name in EDIT_GUIDANCE_MODES)
# Form fields that carry numbers or booleans (a form sends text): converted before validation, so "2" is the
# integer 2 and "two" is refused as a string where an integer belongs.
_FORM_INTEGERS = ("n", "seed", "partial_images", "output_compression")
_FORM_NUMBERS = ("guidance_scale", "image_guidance_scale")
_FORM_BOOLEANS = ("stream",)
_IMAGE_FIELDS = ("image", "image[]")  # the `openai` client sends a list of images as image[]
_MAX_FORM_FIELDS = 64  # text fields of one edit request (OpenAI's client sends about 20 at most)
_INTEGER_RE = re.compile(r"\s*[+-]?\d{1,40}\s*")


class ImageEditRequest(ImageGenerationRequest):
    """POST /v1/images/edits, its fields once the form (or JSON body) is read; the image is `read_edit_form`'s
    and `read_edit_json`'s business. The fields of /v1/images/generations, with `prompt` the instruction, plus
    the extra fields `guidance` and `image_guidance_scale`; a `mask` and output formats other than PNG are
    refused; `background`, `quality`, `input_fidelity`, `user` and unknown fields are ignored."""

    expected: ClassVar[str] = "an object (or multipart/form-data fields)"

    guidance: StrictStr | None = Field(None, description=f"one of {_EDIT_GUIDANCES}")
    image_guidance_scale: GuidanceScale | None = Field(None, description="a number >= 0 and <= 100")
    mask: Any = None
    output_format: StrictStr | None = Field(None, description="'png'")

    @field_validator("guidance")
    @classmethod
    def _known_guidance(cls, value: str | None) -> str | None:
        if value is not None and value not in EDIT_GUIDANCE_MODES:
            raise _refusal("invalid_value", f"'{{param}}' must be one of {_EDIT_GUIDANCES}, got {_describe(value)}")
        return value

    @field_validator("mask")
    @classmethod
    def _no_mask(cls, value: Any) -> Any:
        if value is not None:
            raise _refusal(
                "unsupported_parameter",
                "'mask' is not supported: the model edits the whole image from the instruction; omit 'mask'",
            )
        return value

    @field_validator("output_format")
    @classmethod
    def _png_only(cls, value: str | None) -> str | None:
        if value is not None and value.lower() != "png":
            raise _refusal(
                "unsupported_value",
                f"output_format {_describe(value)} is not supported: this server returns PNG images; omit "
                "output_format",
            )
        return value


@dataclass
class _Upload:
    """A file part of a multipart form."""

    filename: str | None
    data: bytes


def read_edit_form(body: bytes, content_type: str, limits: Limits) -> EditRequest:
    """A multipart/form-data /v1/images/edits body, as the `openai` client's `images.edit` sends it ->
    EditRequest (the image not decoded yet), or APIError.

    The form is parsed by Starlette's multipart parser (python-multipart) from the body already read (the
    app caps its size): at most `_MAX_FORM_FIELDS` text fields, `limits.max_images` + 1 files, text fields
    of at most 4 bytes per `limits.max_prompt_chars` character. Fields: `image` (or `image[]`): one image
    file (PNG, JPEG, WEBP or GIF; a data: URL as a text field works too); `prompt`: the instruction; `n`,
    `size`, `response_format`, `model`, `user` and the extra fields `seed`, `guidance_scale`, `guidance`,
    `image_guidance_scale` and `decoding`, as in `parse_image_request` (numbers sent as text). Several images -> 400
    "too_many_images" (one image per request); a `mask` -> 400; a text field given twice -> 400; an image
    over `limits.max_image_bytes` -> 413. The image's pixels are the app's to check from its header
    (`check_image_headers`) before it is decoded.
    """
    fields: dict[str, Any] = {}
    refs: list[ImageRef] = []
    for name, value in _form_items(body, content_type, limits):
        if name in _IMAGE_FIELDS:
            if isinstance(value, _Upload):
                refs.append(ImageRef("", "image", value.data))
            else:
                _check_image_url(value, limits, "image")
                refs.append(ImageRef(value.strip(), "image"))
            continue
        if isinstance(value, _Upload):
            if name == "mask":
                fields["mask"] = "file"  # refused by the schema, naming the field
                continue
            raise APIError(400, f"unexpected file in the form field '{name}'; send the image to edit as 'image'",
                           param=name, code="invalid_value")
        if name in fields:
            raise APIError(400, f"the form field '{name}' is given more than once; send it once", param=name,
                           code="invalid_value")
        fields[name] = _form_value(name, value)
    return _edit_request(fields, refs, limits)


def read_edit_json(payload: Any, limits: Limits) -> EditRequest:
    """A JSON /v1/images/edits body -> EditRequest, or APIError: the fields of `read_edit_form`, with the
    image as `"image": "data:image/png;base64,..."` or, as OpenAI's JSON form has it, `"images":
    [{"image_url": "data:..."}]` (http(s) URLs when `limits.allow_remote_images`)."""
    if not isinstance(payload, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_describe(payload)}", code="invalid_type")
    fields = dict(payload)
    refs: list[ImageRef] = []
    image = fields.pop("image", None)
    images = fields.pop("images", None)
    if image is not None:
        if not isinstance(image, str):
            raise APIError(400, f"'image' must be a string (a data: URL), got {_describe(image)}", param="image",
                           code="invalid_type")
        _check_image_url(image, limits, "image")
        refs.append(ImageRef(image.strip(), "image"))
    if images is not None:
        if not isinstance(images, list):
            raise APIError(400, f"'images' must be an array, got {_describe(images)}", param="images",
                           code="invalid_type")
        if len(refs) + len(images) > 1:
            raise _too_many_images(len(refs) + len(images))
        for index, item in enumerate(images):
            param = f"images[{index}]"
            url = item.get("image_url") if isinstance(item, dict) else None
            if isinstance(url, dict):
                url = url.get("url")
            if not isinstance(url, str):
                raise APIError(400, f"'{param}' must be an object {{\"image_url\": \"data:image/png;base64,...\"}}",
                               param=param, code="invalid_type")
            _check_image_url(url, limits, f"{param}.image_url")
            refs.append(ImageRef(url.strip(), f"{param}.image_url"))
    return _edit_request(fields, refs, limits)


def _edit_request(fields: dict[str, Any], refs: list[ImageRef], limits: Limits) -> EditRequest:
    request: ImageEditRequest = _validate(ImageEditRequest, fields, limits)
    if not refs:
        raise APIError(400, "'image' is required: send the image to edit (a PNG, JPEG, WEBP or GIF file)",
                       param="image", code="missing_required_parameter")
    if len(refs) > 1:
        raise _too_many_images(len(refs))
    ref = refs[0]
    if ref.data is not None and len(ref.data) > limits.max_image_bytes:
        raise _image_too_large(len(ref.data), limits, ref.param)
    return EditRequest(
        image=ref,
        prompt=request.prompt,
        n=request.n if request.n is not None else 1,
        size=request.dimensions,
        response_format=request.response_format or "b64_json",
        guidance_scale=request.guidance_scale,
        guidance=request.guidance or EDIT_GUIDANCE,
        image_guidance_scale=request.image_guidance_scale,
        seed=request.seed,
        model=request.model,
        decoding=request.decoding or limits.default_decoding,
    )


def _too_many_images(count: int) -> APIError:
    return APIError(400, f"this request has {count} images; this server edits one image per request (send one "
                         "'image'; to ask about several images, use /v1/chat/completions)",
                    param="image", code="too_many_images")


def _form_value(name: str, text: str) -> Any:
    """A form field's text -> the JSON value it stands for (an integer, a number, a boolean), or the text
    itself when it is not one (then the schema refuses it, naming the field)."""
    if name in _FORM_INTEGERS and _INTEGER_RE.fullmatch(text):
        return int(text)
    if name in _FORM_NUMBERS:
        try:
            return float(text)
        except ValueError:
            return text
    if name in _FORM_BOOLEANS and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    return text


def _form_items(body: bytes, content_type: str, limits: Limits) -> list[tuple[str, str | _Upload]]:
    """The parts of a multipart/form-data body, in order: (name, text) or (name, _Upload). Starlette's parser
    (python-multipart underneath) runs to completion here, in the calling thread: the body is in memory, so
    uploads are kept in memory too (never spooled to disk)."""
    import asyncio

    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def chunks():
        yield bytes(body)

    parser = MultiPartParser(Headers({"content-type": content_type}), chunks(), max_files=limits.max_images + 1,
                             max_fields=_MAX_FORM_FIELDS, max_part_size=max(2**20, 4 * limits.max_prompt_chars + 1024))
    parser.spool_max_size = len(body) + 1
    try:
        form = asyncio.run(parser.parse())
    except MultiPartException as error:
        message = str(error)
        if "files" in message:
            raise APIError(400, f"too many files in the form ({message}); this server edits one image per request",
                           param="image", code="too_many_images") from None
        raise APIError(400, f"invalid multipart/form-data body: {message}", code="invalid_multipart") from None
    items: list[tuple[str, str | _Upload]] = []
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                value.file.seek(0)
                items.append((name, _Upload(value.filename, value.file.read())))
            else:
                items.append((name, value))
    finally:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                value.file.close()
    return items


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
_MAX_REDIRECTS = 5
_MAX_URL_CHARS = 8192  # for remote URLs; data: URLs are bounded by the body limit
# `load_image`'s refusal reasons -> (status, error code, what the client can do about it).
_IMAGE_REFUSALS = {
    "source": (400, "invalid_image_url", "send a data: URL (data:image/png;base64,...)"),
    "format": (400, "invalid_image_format", "send PNG, JPEG, WEBP or GIF"),
    "too_large": (413, "image_too_large", "send a smaller image"),
    "invalid": (400, "invalid_image", "send a complete PNG, JPEG, WEBP or GIF image"),
}


def _scheme(url: str) -> str:
    url = url.strip()
    return url[: url.find(":")].lower() if ":" in url[:16] else ""


def _check_image_url(url: str, limits: Limits, param: str) -> None:
    """The URL's form, before anything is fetched or decoded: a base64 data: URL, or an http(s) URL when
    remote images are allowed."""
    scheme = _scheme(url)
    if scheme == "data":
        if _percent_encoded(url.strip()):
            raise APIError(
                400,
                "data URLs must be base64-encoded (data:image/png;base64,<data>)",
                param=param,
                code="invalid_image_url",
            )
    elif scheme in ("http", "https"):
        if not limits.allow_remote_images:
            raise APIError(
                400,
                "remote image URLs are disabled; send a data: URL (or start the server with "
                "--allow-remote-images)",
                param=param,
                code="remote_images_disabled",
            )
        if len(url) > _MAX_URL_CHARS:
            raise APIError(
                400, f"image URL longer than {_MAX_URL_CHARS} characters", param=param, code="invalid_image_url"
            )
    else:
        raise APIError(
            400,
            f"unsupported image URL{f' scheme {scheme!r}' if scheme else ''}; send a data: URL "
            "(data:image/png;base64,...)",
            param=param,
            code="invalid_image_url",
        )


def decode_image_url(url: str, limits: Limits, param: str) -> Image.Image:
    """An image URL from a request -> an RGB PIL image, or APIError with `param`.

    - `data:<media type>;base64,<payload>`: a data URL without ";base64" -> 400 "invalid_image_url".
    - `http(s)://...`: 400 unless `limits.allow_remote_images`; then fetched by `fetch_image`
      (public addresses only, 10 s, `max_image_bytes`; every failure the same 400 "image_fetch_failed").
    - any other scheme (file:// and bare paths included) -> 400.
    Then the header is checked (`check_image_headers`) and the image decoded (`decode_image`).
    """
    if not isinstance(url, str):
        raise APIError(400, f"'{param}' must be a string (a data: URL), got {_describe(url)}", param=param,
                       code="invalid_type")
    _check_image_url(url, limits, param)
    ref = ImageRef(url.strip(), param)
    fetch_remote_images([ref], limits)
    check_image_headers([ref], limits)
    return decode_image(ref, limits)


def decode_image(ref: ImageRef, limits: Limits) -> Image.Image:
    """Decode one image with `tokenizer_vision.load_image`: formats PNG, JPEG, WEBP and GIF (the data
    URL's declared media type too), `max_bytes=limits.max_image_bytes` (judged from the base64 length,
    before decoding) and `max_pixels=limits.max_image_pixels` (read from the header, before any pixel is
    decoded). Its refusals become: too many bytes or pixels, or a decompression bomb -> 413
    "image_too_large"; another media type or format -> 400 "invalid_image_format"; a malformed data URL
    -> 400 "invalid_image_url"; bad base64, no data, not an image, truncated or corrupt data -> 400
    "invalid_image". GIF and animated WEBP: the first frame; EXIF orientation applied, transparency
    composited over white (as in training)."""
    from tokenizer_vision.image_processing import ImageError, load_image

    try:
        return load_image(
            ref.source, limits.max_image_pixels, max_bytes=limits.max_image_bytes, formats=_IMAGE_FORMATS
        )
    except ImageError as error:
        status, code, hint = _IMAGE_REFUSALS[error.reason]
        raise APIError(status, f"{error}; {hint}", param=ref.param, code=code) from None


def _percent_encoded(url: str) -> bool:
    """A data: URL in RFC 2397's %-escaped form: `load_image` reads it, this server takes base64 only."""
    comma = url.find(",")
    return comma >= 0 and "base64" not in (item.strip().lower() for item in url[5:comma].split(";")[1:])


# ------------------------------------------------------------------------------- image header check
def check_image_headers(refs: list[ImageRef], limits: Limits) -> None:
    """Every image's width x height from its header (no pixel decoded): 413 "image_too_large" for one
    above `max_image_pixels` (or alone above `max_request_pixels`), 413 "too_many_pixels" once the sum
    over the request passes `max_request_pixels`. An image whose header cannot be read is left to
    `decode_image`, which refuses it or checks it as it decodes."""
    total = 0
    for ref in refs:
        if isinstance(ref.source, str):
            payload = "".join(ref.source.partition(",")[2].split()).rstrip("=")
            if len(payload) * 3 // 4 > limits.max_image_bytes:  # judged from the base64 length alone
                raise APIError(
                    413,
                    f"the image is about {len(payload) * 3 // 4} bytes once decoded, above this server's limit "
                    f"of {limits.max_image_bytes} bytes; send a smaller image",
                    param=ref.param,
                    code="image_too_large",
                )
        size = _header_size(ref.source)
        if size is None:
            continue
        pixels = size[0] * size[1]
        cap = min(limits.max_image_pixels, limits.max_request_pixels)
        if pixels > cap:
            raise APIError(
                413,
                f"the image is {size[0]}x{size[1]} = {pixels} pixels, above this server's limit of {cap}; "
                "send a smaller image",
                param=ref.param,
                code="image_too_large",
            )
        total += pixels
        if total > limits.max_request_pixels:
            raise APIError(
                413,
                f"the images of this request hold more than {limits.max_request_pixels} pixels in all "
                f"(this one brings them to {total}); send fewer or smaller images",
                param=ref.param,
                code="too_many_pixels",
            )


_HEADER_BASE64_CHARS = 1 << 16  # what is decoded first to find a header (JPEG may need more)


def _header_size(source: str | bytes) -> tuple[int, int] | None:
    if isinstance(source, bytes):
        return _dimensions(source)
    _, comma, payload = source.partition(",")
    if not comma:
        return None
    payload = "".join(payload.split())
    for chars in (_HEADER_BASE64_CHARS, len(payload)):
        data = _lenient_b64(payload[: chars - chars % 4])
        size = _dimensions(data) if data else None
        if size is not None or chars >= len(payload):
            return size
    return None


def _lenient_b64(text: str) -> bytes | None:
    text = text.translate(str.maketrans("-_", "+/")).rstrip("=")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, WEBP or JPEG header, as PIL reports them; None when unknown."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                width, height = struct.unpack("<HH", data[26:30])
                return width & 0x3FFF, height & 0x3FFF
            if chunk == b"VP8L" and data[20] == 0x2F:
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
            return None
        if data.startswith(b"\xff\xd8"):
            return _jpeg_dimensions(data)
    except (struct.error, IndexError):
        return None
    return None


_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return width, height
        position += 2 + length
    return None


# ---------------------------------------------------------------------------------- remote fetching
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_FETCH_FAILED = "could not fetch the image URL; send the image as a data: URL instead"


def is_public_address(address: str) -> bool:
    """Whether a resolved address may be fetched from: a globally routable unicast address, not private,
    loopback, link-local, shared, reserved, multicast or unspecified; an IPv4 address embedded in IPv6
    (mapped, 6to4, Teredo, NAT64) is judged as itself."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(str(embedded))
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
        or ip.is_unspecified
    )


class _FetchError(Exception):
    """Why a fetch failed, for the server's log; the client gets the one generic message."""


def fetch_remote_images(refs: list[ImageRef], limits: Limits) -> None:
    """Fetch every remote image (`fetch_image`) into its `ImageRef.data`."""
    for ref in refs:
        if ref.remote and ref.data is None:
            ref.data = fetch_image(ref.url.strip(), limits, ref.param)


def fetch_image(url: str, limits: Limits, param: str) -> bytes:
    """GET an http(s) image safely: each hop's host resolved and every address checked with
    `is_public_address`, the connection made to that checked address (so a second DNS answer cannot
    point elsewhere), redirects (at most 5) followed by hand and checked the same way, 10 s in all, at
    most `max_image_bytes` (413 above). Any other failure - a refused address, DNS, connection, TLS,
    an HTTP status, a timeout - is the same 400 "image_fetch_failed" (logged with its reason)."""
    deadline = time.monotonic() + _FETCH_TIMEOUT_S
    try:
        for _ in range(_MAX_REDIRECTS + 1):
            status, location, body = _get(url, deadline, limits, param)
            if location is None:
                if status != 200:
                    raise _FetchError(f"HTTP {status}")
                return body
            url = urllib.parse.urljoin(url, location)
        raise _FetchError("too many redirects")
    except APIError:
        raise
    except (_FetchError, OSError, http.client.HTTPException, ValueError, UnicodeError) as error:
        logger.info("image fetch of %.200s refused or failed: %s: %s", url, type(error).__name__, error)
        raise APIError(400, _FETCH_FAILED, param=param, code="image_fetch_failed") from None


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to an address checked beforehand; TLS verifies the certificate against the
    URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, tls: ssl.SSLContext | None) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address, self._tls = address, tls

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host) if self._tls else sock


def _get(url: str, deadline: float, limits: Limits, param: str) -> tuple[int, str | None, bytes]:
    """One GET: (status, redirect location or None, body of a 200)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise _FetchError("not a plain http(s) URL")
    host = parts.hostname
    port = parts.port or (443 if scheme == "https" else 80)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    refused = [address for address in addresses if not is_public_address(address)]
    if not addresses or refused:
        raise _FetchError(f"{host} resolves to a non-public address {refused[:1]}")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _FetchError("timed out")
    tls = ssl.create_default_context() if scheme == "https" else None
    connection = _PinnedConnection(host, port, addresses[0], remaining, tls)
    try:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        connection.request("GET", target, headers={"Accept": "image/*", "Accept-Encoding": "identity",
                                                   "User-Agent": "mllm-serve", "Connection": "close"})
        response = connection.getresponse()
        if response.status in (301, 302, 303, 307, 308):
            location = response.getheader("Location")
            if not location:
                raise _FetchError(f"HTTP {response.status} without a Location")
            return response.status, location, b""
        if response.status != 200:
            return response.status, None, b""
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_image_bytes:
            raise _image_too_large(int(declared), limits, param)
        chunks, total = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _FetchError("timed out")
            if connection.sock is not None:
                connection.sock.settimeout(remaining)
            chunk = response.read(1 << 16)
            if not chunk:
                return 200, None, b"".join(chunks)
            total += len(chunk)
            if total > limits.max_image_bytes:
                raise _image_too_large(total, limits, param)
            chunks.append(chunk)
    finally:
        connection.close()


def _image_too_large(size: int, limits: Limits, param: str) -> APIError:
    return APIError(
        413,
        f"image is over {limits.max_image_bytes} bytes ({size} at least), above this server's limit; send a "
        "smaller image",
        param=param,
        code="image_too_large",
    )
