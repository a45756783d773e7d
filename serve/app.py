"""The OpenAI-compatible HTTP API (FastAPI) and the web chat page.

    GET  /health                  liveness + the engine's counters (requests, batches, largest batch)
    GET  /v1/models               the one model served
    POST /v1/chat/completions     OpenAI chat completions: text and image_url parts, multi-turn, n, stop,
                                  seed, temperature, top_p, max_tokens, stream (SSE chunks, [DONE]);
                                  no temperature: the model's generation config (greedy unless it samples)
    POST /v1/images/generations   prompt -> n images, response_format b64_json
    GET  /                        the web chat page (serve/static)

Images the model draws inside a chat come back two ways: appended to `message.content` as markdown
data-URL images (`![image 1](data:image/png;base64,...)`, which any client can show or store), and as
`message.images = [{"b64_json": ...}]` (an extra field; the official `openai` client keeps it in
`message.model_extra["images"]`). Sent back in a later turn, such markdown images are read as images.
`usage.prompt_tokens` and `completion_tokens` count image tokens (h*w codes + 2 per image).

Every bad request is answered with a 4xx and an OpenAI error body `{"error": {"message", "type",
"param", "code"}}` (serve.protocol); a full queue is a 429; with an API key, a missing or wrong
`Authorization: Bearer` is a 401. A client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.engine import Cancelled, ChatJob, Engine, ImageJob, QueueFull
from serve.protocol import APIError, Limits, parse_chat_request, parse_image_request, parse_json_body

STATIC_DIR = Path(__file__).parent / "static"
POLL_S = 0.01


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
               model_name: str | None = None) -> FastAPI:
    """The app for a model folder (or an already loaded `mllm.MLLM` as `model`)."""
    if model is None:
        if model_dir is None:
            raise ValueError("create_app needs model_dir or model")
        import mllm

        model = mllm.load(model_dir, adapter=adapter, device=device)
    limits = limits or Limits()
    if limits.default_temperature is None:
        limits = dataclasses.replace(limits, default_temperature=generation_config_temperature(model))
    name = model_name or (Path(model_dir).name if model_dir else "mllm")
    engine = Engine(model, max_batch=max_batch, batch_window_s=batch_window_s, queue_size=queue_size,
                    default_max_tokens=default_max_tokens)
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="mllm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.limits, app.state.model_name = engine, limits, name
    tokens_per_image = model.model.config.image_tokens_per_image + 2
    # The processor's own resize + crop, applied as soon as an image is decoded: a queued request then
    # holds S x S pixels per image, not the client's full-size upload (memory stays bounded).
    shrink = model.model.vision_tokenizer.processor.resize_and_crop

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": str(error.detail), "type": kind, "param": None,
                                       "code": None}}, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": {"message": f"internal error: {type(error).__name__}: {error}",
                                       "type": "server_error", "param": None, "code": None}}, status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != api_key:
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
        payload = parse_json_body(await _read_body(request, limits), limits)
        # Image decoding (and a remote fetch, when allowed) blocks: off the event loop.
        chat = await asyncio.to_thread(_parse_chat, payload, limits, shrink)
        job = ChatJob(messages=chat.messages, max_tokens=chat.max_tokens, temperature=chat.temperature,
                      top_p=chat.top_p, seed=chat.seed, stop=chat.stop, n=chat.n, guidance_scale=chat.guidance_scale)
        created, completion_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return await _stream(request, engine, job, chat, name, created, completion_id, tokens_per_image)
        _submit(engine, job)
        await _wait(request, job)
        _raise_job_error(job)
        choices, completion_tokens = [], 0
        for index, choice in enumerate(job.result):
            message: dict[str, Any] = {"role": "assistant", "content": _content(choice)}
            if choice["images"]:
                message["images"] = [{"b64_json": _png_b64(image)} for image in choice["images"]]
            choices.append({"index": index, "message": message, "finish_reason": choice["finish_reason"],
                            "logprobs": None})
            completion_tokens += choice["completion_tokens"]
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": name,
                "choices": choices, "usage": _usage(job.prompt_tokens, completion_tokens)}

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        authorize(request)
        spec = parse_image_request(parse_json_body(await _read_body(request, limits), limits), limits)
        job = ImageJob(prompt=spec.prompt, n=spec.n, guidance_scale=spec.guidance_scale, seed=spec.seed)
        _submit(engine, job)
        await _wait(request, job)
        _raise_job_error(job)
        images = job.result
        if spec.size is not None:
            from PIL import Image

            images = [image if image.size == spec.size else image.resize(spec.size, Image.Resampling.LANCZOS)
                      for image in images]
        return {"created": int(time.time()),
                "data": [{"b64_json": _png_b64(image), "revised_prompt": spec.prompt} for image in images]}

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


# ---------------------------------------------------------------------------------------- helpers
def _parse_chat(payload, limits: Limits, shrink):
    chat = parse_chat_request(payload, limits)
    for message in chat.messages:
        for part in message["content"]:
            if part.get("type") == "image":
                part["image"] = shrink(part["image"])
    return chat


async def _read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused with a 413 as soon as it exceeds the limit (never read whole first)."""
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"request body over {limits.max_body_bytes} bytes", param=None,
                       code="request_too_large")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _submit(engine: Engine, job) -> None:
    try:
        engine.submit(job)
    except QueueFull as error:
        raise APIError(429, str(error), type="rate_limit_error", code="queue_full") from None


async def _wait(request: Request, job) -> None:
    """Until the job is done; a disconnected client cancels it."""
    checks = 0
    while not job.done.is_set():
        await asyncio.sleep(POLL_S)
        checks += 1
        if checks % 10 == 0 and await request.is_disconnected():
            job.cancel()
            return


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
    raise error


def _png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _content(choice: dict) -> str:
    parts = [choice["text"]] if choice["text"] else []
    parts += [f"![image {k + 1}](data:image/png;base64,{_png_b64(image)})" for k, image in enumerate(choice["images"])]
    return "\n\n".join(parts)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(request: Request, engine: Engine, job: ChatJob, chat, name: str, created: int,
                  completion_id: str, tokens_per_image: int):
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    job.on_delta = lambda choice, text: loop.call_soon_threadsafe(deltas.put_nowait, (choice, text))
    _submit(engine, job)
    # Hold the response until the job produced something or failed: a bad prompt (e.g. over the context
    # length) is still a proper 4xx, not an error inside a 200 stream.
    while deltas.empty() and not job.done.is_set():
        await asyncio.sleep(POLL_S)
        if await request.is_disconnected():
            job.cancel()
            return Response(status_code=499)
    _raise_job_error(job)

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        import json

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
                import json

                message = str(job.error) or type(job.error).__name__
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            completion_tokens = 0
            for index, choice in enumerate(job.result):
                completion_tokens += choice["completion_tokens"]
                if choice["images"]:
                    encoded = [_png_b64(image) for image in choice["images"]]
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


__all__ = ["create_app"]
