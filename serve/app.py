"""The OpenAI-compatible HTTP API (FastAPI) and the web chat page.

    GET  /health                  liveness + the engine's counters (requests, batches, largest batch)
    GET  /v1/models               the one model served
    POST /v1/chat/completions     OpenAI chat completions: text and image_url parts, multi-turn, n, stop,
                                  seed, temperature, top_p, max_tokens, stream (SSE chunks, [DONE]);
                                  no temperature: the model's generation config (greedy unless it samples)
    POST /v1/images/generations   prompt -> n images, response_format b64_json
                                  (both POSTs: extra fields guidance_scale and decoding, for drawn images)
    POST /v1/images/edits         image + instruction (`prompt`) -> n edited images, as the `openai` client's
                                  `images.edit` sends it (multipart/form-data; JSON with a data: URL too);
                                  extra fields seed, guidance_scale, guidance, image_guidance_scale and
                                  decoding
    GET  /                        the web chat page (serve/static)

Images the model draws inside a chat come back two ways: appended to `message.content` as markdown
data-URL images (`![image 1](data:image/png;base64,...)`, which any client can show or store), and as
`message.images = [{"b64_json": ...}]` (an extra field; the official `openai` client keeps it in
`message.model_extra["images"]`). Sent back in a later turn, such markdown images are read as images.
`usage.prompt_tokens` and `completion_tokens` count image tokens (h*w codes + 2 per image).

No single request can stall the server: the event loop only moves bytes. Parsing a body, fetching,
checking and decoding images, resizing and PNG-encoding drawn images and serialising answers run in
small thread pools (parsing in its own, image work in `cpu_threads`, remote fetches in `fetch_threads`),
and a request is admitted to the engine's bounded queue (429 when full) before its images are decoded. A chat request
goes: body (413 above the limit, 408 when it does not arrive within `Limits.body_timeout_s`) -> JSON
and schema (`serve.protocol`) -> remote images fetched -> image headers checked (pixels per image and
per request) -> admission -> images decoded and shrunk -> the engine.

Every bad request is answered with a 4xx and an OpenAI error body `{"error": {"message", "type",
"param", "code"}}` (serve.protocol); a full queue is a 429; with an API key, a missing or wrong
`Authorization: Bearer` is a 401 (compared in constant time). A 500 never carries an exception's text
(the server's log has it). Served on loopback (`host`, the default), only loopback `Host` names are
answered (localhost, 127.0.0.1, [::1], any port, plus `allowed_hosts`), so a web page cannot reach the
server through DNS rebinding; request bodies must be JSON (`Content-Type: application/json`, else 415),
so a web page cannot post a form or plain text to it - except /v1/images/edits, which also takes
multipart/form-data (OpenAI's clients upload images that way) but refuses (403) a form a browser posts
from a page of another origin (its `Origin` / `Sec-Fetch-Site` headers). An edit goes: body -> form (or
JSON) and fields -> the image's header checked -> admission -> the image decoded and shrunk -> the engine.
A client that disconnects cancels its generation, and nothing is logged for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import hmac
import io
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mllm.config import DECODING_METHODS
from serve.engine import Cancelled, ChatJob, EditJob, Engine, ImageJob, QueueFull, Reservation
from serve.protocol import (
    APIError,
    ChatRequest,
    EditRequest,
    ImageRef,
    Limits,
    check_image_headers,
    decode_image,
    effective_temperature,
    fetch_remote_images,
    parse_image_request,
    parse_json_body,
    read_chat_request,
    read_edit_form,
    read_edit_json,
)
from serve.server import is_loopback_host

STATIC_DIR = Path(__file__).parent / "static"
ENGINES = ("builtin", "vllm")
POLL_S = 0.01
LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "[::1]")
logger = logging.getLogger("serve")


class ClientGone(Exception):
    """The client disconnected: there is no one to answer, and nothing worth logging."""


def generation_config_temperature(model) -> float:
    """The temperature the model's own generation config implies, as transformers' `generate` reads it:
    its `temperature` when it samples (`do_sample: true`), else 0 (greedy decoding, the default of a
    config that says nothing, like those `mllm train` writes)."""
    config = getattr(model.model.llm, "generation_config", None)
    if config is None or not config.do_sample:
        return 0.0
    return float(config.temperature if config.temperature is not None else 1.0)


def create_app(model_dir: str | None = None, *, model=None, adapter: str | None = None, api_key: str | None = None,
               limits: Limits | None = None, max_batch: int = 8, batch_window_s: float = 0.02,
               queue_size: int = 64, default_max_tokens: int = 256, device: str | None = None,
               model_name: str | None = None, host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
               cpu_threads: int = 2, fetch_threads: int = 4, engine: str | Any = "builtin",
               engine_options: dict[str, Any] | None = None) -> FastAPI:
    """The app for a model folder (or an already loaded `mllm.MLLM` as `model`).

    `engine`: "builtin" (`serve.engine.Engine`, the default), "vllm" (`serve.vllm_engine.VLLMEngine` on the
    folder's `llm/`; `engine_options` are its keyword arguments, e.g. `tensor_parallel_size`), or an engine
    instance with the same interface (reserve / submit / snapshot / close; its `model` is used).

    `host` is the address the server binds to: on a loopback address only loopback `Host` names (and
    `allowed_hosts`) are answered. `cpu_threads` bounds the threads that decode and encode images and
    parse bodies; `fetch_threads` those that fetch remote images."""
    engine_instance = None
    if not isinstance(engine, str):
        engine_instance, model = engine, engine.model
    elif engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if model is None:
        if model_dir is None:
            raise ValueError("create_app needs model_dir or model")
        if engine == "vllm":
            if adapter is not None:
                raise ValueError("--engine vllm serves a plain model folder: merge the adapter first (`mllm merge`)")
            from serve.vllm_engine import load_shell

            model = load_shell(model_dir, device="cpu")
        else:
            import mllm

            model = mllm.load(model_dir, adapter=adapter, device=device)
    limits = limits or Limits()
    if limits.default_decoding not in DECODING_METHODS:
        raise ValueError(f"default decoding must be one of {', '.join(DECODING_METHODS)}, got "
                         f"{limits.default_decoding!r}")
    default_temperature = limits.default_temperature
    if default_temperature is None:
        default_temperature = generation_config_temperature(model)
    limits = dataclasses.replace(limits, default_temperature=effective_temperature(default_temperature))
    name = model_name or (Path(model_dir).name if model_dir else "mllm")
    if engine_instance is not None:
        engine = engine_instance
    elif engine == "vllm":
        from serve.vllm_engine import VLLMEngine

        engine = VLLMEngine(model, queue_size=queue_size, default_max_tokens=default_max_tokens,
                            **(engine_options or {}))
    else:
        engine = Engine(model, max_batch=max_batch, batch_window_s=batch_window_s, queue_size=queue_size,
                        default_max_tokens=default_max_tokens)
    # Bodies are parsed apart from image work, so a small request never waits behind a large image's encoding.
    parse_pool = ThreadPoolExecutor(2, thread_name_prefix="mllm-parse")
    image_pool = ThreadPoolExecutor(cpu_threads, thread_name_prefix="mllm-image")
    fetch_pool = ThreadPoolExecutor(fetch_threads, thread_name_prefix="mllm-fetch")
    pools = (parse_pool, image_pool, fetch_pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mllm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.limits, app.state.model_name = engine, limits, name
    hosts = None
    if is_loopback_host(host):
        hosts = frozenset(LOOPBACK_HOST_NAMES) | {_host_name(h) for h in allowed_hosts}
    app.add_middleware(_RequestGuard, allowed_hosts=hosts)
    # The processor's own resize + crop, applied as soon as an image is decoded: a queued request then
    # holds S x S pixels per image, not the client's full-size upload (memory stays bounded).
    shrink = model.model.vision_tokenizer.processor.resize_and_crop

    async def parse(function: Callable, *args):
        """`function(*args)` in the parsing threads: never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(parse_pool, functools.partial(function, *args))

    async def cpu(function: Callable, *args):
        """`function(*args)` in the image threads (decode, resize, encode): never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(image_pool, functools.partial(function, *args))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=499)  # never sent: the client is gone

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": str(error.detail), "type": kind, "param": None,
                                       "code": None}}, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # The traceback goes to the server's log (Starlette re-raises it to uvicorn); the client gets no detail.
        return JSONResponse(_INTERNAL_ERROR, status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        valid = hmac.compare_digest(token.strip().encode(), api_key.encode())
        if scheme.lower() != "bearer" or not valid:
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "engine": engine.snapshot()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "mllm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await _read_body(request, limits)
        chat = await parse(_read_chat, body, limits)
        if any(ref.remote for ref in chat.image_refs):
            await asyncio.get_running_loop().run_in_executor(
                fetch_pool, fetch_remote_images, chat.image_refs, limits)
        if chat.image_refs:
            await parse(check_image_headers, chat.image_refs, limits)  # pixels judged from headers, not decoded
        created, completion_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        with _reserve(engine) as slot:  # admitted before any image is decoded
            await _decode_images(chat, limits, shrink, cpu)
            job = ChatJob(messages=chat.messages, max_tokens=chat.max_tokens, temperature=chat.temperature,
                          top_p=chat.top_p, seed=chat.seed, stop=chat.stop, n=chat.n,
                          guidance_scale=chat.guidance_scale, decoding=chat.decoding)
            if chat.stream:
                return await _stream(request, slot, job, chat, name, created, completion_id, cpu)
            slot.submit(job)
        await _wait(request, job)
        _raise_job_error(job)
        drawn = any(choice["images"] for choice in job.result)
        payload = await (cpu if drawn else parse)(_chat_completion_body, job, completion_id, created, name)
        return Response(payload, media_type="application/json")

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        authorize(request)
        body = await _read_body(request, limits)
        spec = await parse(_read_image_request, body, limits)
        job = ImageJob(prompt=spec.prompt, n=spec.n, guidance_scale=spec.guidance_scale, seed=spec.seed,
                       decoding=spec.decoding)
        with _reserve(engine) as slot:
            slot.submit(job)
        await _wait(request, job)
        _raise_job_error(job)
        # resize + PNG + base64 + JSON, off the loop
        payload = await cpu(_images_body, job.result, spec.size, spec.prompt)
        return Response(payload, media_type="application/json")

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        authorize(request)
        body = await _read_body(request, limits)
        spec = await parse(_read_edit_request, body, request.headers.get("content-type"), limits)
        if spec.image.remote:
            await asyncio.get_running_loop().run_in_executor(fetch_pool, fetch_remote_images, [spec.image], limits)
        await parse(check_image_headers, [spec.image], limits)  # pixels judged from the header, not decoded
        with _reserve(engine) as slot:  # admitted before the image is decoded
            image, _ = await cpu(_decode_shrunk, spec.image, limits, shrink)
            scale = spec.guidance_scale if spec.guidance_scale is not None else model.model.config.edit_guidance_scale
            job = EditJob(image=image, prompt=spec.prompt, n=spec.n, guidance_scale=scale,
                          guidance=spec.guidance, image_guidance_scale=spec.image_guidance_scale, seed=spec.seed,
                          decoding=spec.decoding)
            slot.submit(job)
        await _wait(request, job)
        _raise_job_error(job)
        payload = await cpu(_images_body, job.result, spec.size)
        return Response(payload, media_type="application/json")

    @app.get("/")
    async def index():
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise APIError(404, "the web chat page is not installed (serve/static/index.html)", code="not_found")
        return FileResponse(page)

    @app.get("/static/{name}")
    async def static(name: str):
        path = (STATIC_DIR / name).resolve()
        if path.parent != STATIC_DIR.resolve() or not path.is_file():
            raise APIError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(path)

    return app


# ---------------------------------------------------------------------------------------- guard
_INTERNAL_ERROR = {"error": {"message": "internal server error: the request could not be completed",
                             "type": "server_error", "param": None, "code": None}}
_BODY_METHODS = ("POST", "PUT", "PATCH")


def _host_name(host: str) -> str:
    """A Host header (or an allowed name) -> the lower-case name without port or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.split(":", 1)[0].rstrip(".")


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _is_json(content_type: str | None) -> bool:
    media_type = _media_type(content_type)
    return media_type == "application/json" or (media_type.startswith("application/")
                                                and media_type.endswith("+json"))


def _is_multipart(content_type: str | None) -> bool:
    return _media_type(content_type) == "multipart/form-data"


# The endpoints that also take multipart/form-data bodies (OpenAI's clients upload files that way).
_FORM_PATHS = frozenset({"/v1/images/edits"})


def _cross_origin(headers: Headers) -> str | None:
    """Why a form post comes from a web page of another origin (None: it does not): a browser sends `Origin`
    (and `Sec-Fetch-Site`) with every cross-origin POST, and API clients (curl, `openai`) send neither."""
    site = (headers.get("sec-fetch-site") or "").strip().lower()
    if site and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site {site[:40]!r}"
    origin = headers.get("origin")
    if origin is None:
        return None
    netloc = urllib.parse.urlsplit(origin.strip()).netloc.lower() if origin.strip() != "null" else ""
    if not netloc or netloc != (headers.get("host") or "").strip().lower():
        return f"Origin {origin[:100]!r}"
    return None


class _RequestGuard:
    """ASGI middleware, before any route: on loopback, only loopback Host names (400 "invalid_host"),
    so a page on another origin cannot reach the server by rebinding its DNS name to 127.0.0.1; request
    bodies only as JSON (415), so a page cannot send one without a CORS preflight (forms, text/plain) -
    except multipart/form-data on /v1/images/edits (`_FORM_PATHS`, how OpenAI's clients upload images),
    which a browser sends only from a page of this server's own origin (403 "cross_origin" otherwise)."""

    def __init__(self, app, allowed_hosts: frozenset[str] | None) -> None:
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host = headers.get("host")
            if self.allowed_hosts is not None and host is not None and _host_name(host) not in self.allowed_hosts:
                shown = host if len(host) <= 100 else host[:100] + "..."
                error = APIError(400, f"this server answers only on this machine (Host {shown!r} refused; "
                                      "use localhost, 127.0.0.1 or [::1], or start it with --allowed-host)",
                                 code="invalid_host")
                await JSONResponse(error.body(), status_code=400)(scope, receive, send)
                return
            content_type = headers.get("content-type")
            if scope["method"] in _BODY_METHODS and not _is_json(content_type):
                form_path = scope["path"] in _FORM_PATHS
                if not (form_path and _is_multipart(content_type)):
                    shown = (content_type or "none")[:100]
                    wanted = " or multipart/form-data" if form_path else ""
                    error = APIError(415, f"request bodies must be JSON (Content-Type: application/json){wanted}, "
                                          f"got {shown!r}", code="unsupported_media_type")
                    await JSONResponse(error.body(), status_code=415)(scope, receive, send)
                    return
                cross = _cross_origin(headers)
                if cross is not None:
                    error = APIError(403, f"form uploads from another web origin are refused ({cross}); send the "
                                          "request from an API client or from this server's own page",
                                     code="cross_origin")
                    await JSONResponse(error.body(), status_code=403)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------- helpers
def _read_chat(body: bytes, limits: Limits) -> ChatRequest:
    return read_chat_request(parse_json_body(body, limits), limits)


def _read_image_request(body: bytes, limits: Limits):
    return parse_image_request(parse_json_body(body, limits), limits)


def _read_edit_request(body: bytes, content_type: str | None, limits: Limits) -> EditRequest:
    if _is_multipart(content_type):
        return read_edit_form(body, content_type, limits)
    return read_edit_json(parse_json_body(body, limits), limits)  # the guard lets only these two through


def _decode_shrunk(ref: ImageRef, limits: Limits, shrink) -> tuple[Any, int]:
    image = decode_image(ref, limits)
    pixels = image.width * image.height
    return shrink(image), pixels


async def _decode_images(chat: ChatRequest, limits: Limits, shrink, cpu) -> None:
    """Each image decoded (and at once shrunk to the tokenizer's size) in the thread pool, one after the
    other; the decoded pixels are summed again, in case a header could not be read beforehand."""
    images, total = {}, 0
    for ref in chat.image_refs:
        image, pixels = await cpu(_decode_shrunk, ref, limits, shrink)
        total += pixels
        if total > limits.max_request_pixels:
            raise APIError(413, f"the images of this request hold more than {limits.max_request_pixels} pixels "
                                "in all; send fewer or smaller images", param=ref.param, code="too_many_pixels")
        images[id(ref)] = image
    for message in chat.messages:
        for part in message["content"]:
            if part["type"] == "image":
                part["image"] = images[id(part["image"])]


async def _read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused with a 413 as soon as it exceeds the limit (never read whole first; the server
    discards the rest, so the client still reads the answer), and with a 408 (closing the connection)
    when it has not arrived within `limits.body_timeout_s`."""
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"request body over {limits.max_body_bytes} bytes", param=None,
                       code="request_too_large")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout=limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                       code="request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone() from None


@contextlib.contextmanager
def _reserve(engine: Engine):
    try:
        slot = engine.reserve()
    except QueueFull as error:
        raise APIError(429, str(error), type="rate_limit_error", code="queue_full") from None
    with slot:
        yield slot


async def _wait(request: Request, job) -> None:
    """Until the job is done; a disconnected client cancels it (ClientGone: nothing is answered)."""
    checks = 0
    while not job.done.is_set():
        await asyncio.sleep(POLL_S)
        checks += 1
        if checks % 10 == 0 and await request.is_disconnected():
            job.cancel()
            raise ClientGone()


def _raise_job_error(job) -> None:
    error = job.error
    if error is None:
        return
    if isinstance(error, Cancelled):
        raise APIError(499, "the request was cancelled", code="cancelled")
    if isinstance(error, ValueError):  # from the processor / generation: the request itself is at fault
        message = str(error)
        code = "context_length_exceeded" if "context length" in message or "limit is" in message else None
        raise APIError(400, message, code=code)
    status = getattr(error, "status", None)
    if isinstance(status, int) and 500 <= status < 600:  # an engine's own, client-safe failure (e.g. vLLM's
        raise APIError(status, str(error), type="server_error", code=getattr(error, "code", None))  # lost pair)
    logger.error("generation failed", exc_info=error)
    raise APIError(500, _INTERNAL_ERROR["error"]["message"], type="server_error")


def _png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _content(text: str, encoded: list[str]) -> str:
    parts = [text] if text else []
    parts += [f"![image {k + 1}](data:image/png;base64,{b64})" for k, b64 in enumerate(encoded)]
    return "\n\n".join(parts)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chat_completion_body(job: ChatJob, completion_id: str, created: int, name: str) -> bytes:
    choices, completion_tokens = [], 0
    for index, choice in enumerate(job.result or []):
        encoded = [_png_b64(image) for image in choice["images"]]
        message: dict[str, Any] = {"role": "assistant", "content": _content(choice["text"], encoded)}
        if encoded:
            message["images"] = [{"b64_json": b64} for b64 in encoded]
        choices.append({"index": index, "message": message, "finish_reason": choice["finish_reason"],
                        "logprobs": None})
        completion_tokens += choice["completion_tokens"]
    return _json_bytes({"id": completion_id, "object": "chat.completion", "created": created, "model": name,
                        "choices": choices, "usage": _usage(job.prompt_tokens, completion_tokens)})


def _images_body(images: list, size: tuple[int, int] | None, revised_prompt: str | None = None) -> bytes:
    """The images endpoints' answer: each image resized to `size` (when given), PNG, base64."""
    data = []
    for image in images:
        if size is not None and image.size != size:
            from PIL import Image

            image = image.resize(size, Image.Resampling.LANCZOS)
        item = {"b64_json": _png_b64(image)}
        if revised_prompt is not None:
            item["revised_prompt"] = revised_prompt
        data.append(item)
    return _json_bytes({"created": int(time.time()), "data": data})


async def _stream(request: Request, slot: Reservation, job: ChatJob, chat: ChatRequest, name: str, created: int,
                  completion_id: str, cpu):
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    job.on_delta = lambda choice, text: loop.call_soon_threadsafe(deltas.put_nowait, (choice, text))
    slot.submit(job)
    # Hold the response until the job produced something or failed: a bad prompt (e.g. over the context
    # length) is still a proper 4xx, not an error inside a 200 stream.
    while deltas.empty() and not job.done.is_set():
        await asyncio.sleep(POLL_S)
        if await request.is_disconnected():
            job.cancel()
            raise ClientGone()
    _raise_job_error(job)

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": choices}
        if usage is not None or chat.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def events():
        try:
            for index in range(job.n):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            while True:
                try:
                    index, text = await asyncio.wait_for(deltas.get(), timeout=0.05)
                except asyncio.TimeoutError:
                    if job.done.is_set() and deltas.empty():
                        break
                    continue
                yield chunk([{"index": index, "delta": {"content": text}, "finish_reason": None}])
            if job.error is not None:
                if isinstance(job.error, ValueError):
                    error = {"message": str(job.error) or "invalid request", "type": "invalid_request_error",
                             "param": None, "code": None}
                elif isinstance(getattr(job.error, "status", None), int):  # an engine's client-safe failure
                    error = {"message": str(job.error), "type": "server_error", "param": None,
                             "code": getattr(job.error, "code", None)}
                else:
                    logger.error("generation failed", exc_info=job.error)
                    error = _INTERNAL_ERROR["error"]
                yield f"data: {json.dumps({'error': error})}\n\n"
                yield "data: [DONE]\n\n"
                return
            completion_tokens = 0
            for index, choice in enumerate(job.result):
                completion_tokens += choice["completion_tokens"]
                if choice["images"]:
                    encoded = await cpu(lambda images: [_png_b64(image) for image in images], choice["images"])
                    markdown = "".join(f"\n\n![image {k + 1}](data:image/png;base64,{b64})"
                                       for k, b64 in enumerate(encoded))
                    yield chunk([{"index": index, "delta": {"content": markdown,
                                                            "images": [{"b64_json": b64} for b64 in encoded]},
                                  "finish_reason": None}])
                yield chunk([{"index": index, "delta": {}, "finish_reason": choice["finish_reason"]}])
            if chat.include_usage:
                yield chunk([], _usage(job.prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            if not job.done.is_set():
                job.cancel()  # the client went away mid-stream

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["ClientGone", "create_app", "generation_config_temperature"]
