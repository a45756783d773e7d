"""Load and fault harness for `mllm serve`: N concurrent clients for T seconds, then a report and a gate.

Reproduce the recorded run (BENCHMARKS.md, "Serving under load"), from the repository root:

    .venv/bin/mllm init --llm shapes --vision-tokenizer shapes --out /tmp/load-model --overwrite
    .venv/bin/python scripts/load_test.py --model /tmp/load-model --device cpu --clients 32 --seconds 300 \
        --json /tmp/load-test.json

(or `--model runs/demo/model` when the demo's model exists). The harness starts `mllm serve` itself on a
free loopback port (`--url http://127.0.0.1:PORT` uses a server already running instead; only 127.0.0.1
and ::1 are accepted, nothing else is ever contacted), waits for /health, warms up with one request of
each good kind, runs `--clients` concurrent clients for `--seconds`, stops every client and the server
it started, prints a table and writes `--json OUT`.

Each client loops: pick a request kind (every kind with a weight once first, then at random by the
`--mix` weights), send it, wait for the whole answer, record it. Kinds:

  chat        small text chat (max_tokens --max-tokens)                                  expect 2xx
  image_chat  a question about a shapes scene, the PNG sent as a data: URL               expect 2xx
  stream      streamed chat (SSE), read to `data: [DONE]`                                 expect 2xx
  draw        /v1/images/generations, n=1, size 64x64                                    expect 2xx
  slow_body   a valid chat whose body is sent in --slow-pieces pieces, --slow-pause apart expect 2xx
  disconnect  a streamed chat the client drops after its first chunks (mid-stream)        expect 2xx
  bad         malformed JSON, wrong types, too many stop strings, too many images, ...           expect 4xx
  oversized   a body 1 MiB over --max-body-mb (declared or chunked)                      expect 413
  burst       (not in the mix) --bursts times, --burst-size concurrent small chats at once: more than
              the queue holds, fewer than the server's connection limit               expect 2xx or 429

Good requests (chat, image_chat, stream, draw, slow_body, disconnect) that get a 429 (queue full) are
retried like an OpenAI client does (up to --retries times, backing off, within the request's --timeout).
A good request is *lost* when it ends without a valid 2xx: an error status, a timeout, a reset, a
stream without [DONE] or with an error event, a malformed body (a burst request's 429 is not lost).

Exit status: 0 when the gate passes; 1 when any 5xx, any lost good request, or any unexpected answer
(a bad request not answered 4xx, an oversized one not 413, a disconnect stream that never started)
occurred, or the server exited during the run; 2 when the run could not start (bad options, the server
never became healthy).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import datetime
import io
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LOOPBACK_HOSTS = ("127.0.0.1", "::1")
MIX_KINDS = ("chat", "image_chat", "stream", "draw", "slow_body", "disconnect", "bad", "oversized")
KINDS = (*MIX_KINDS, "burst")
GOOD_KINDS = ("chat", "image_chat", "stream", "draw", "slow_body", "disconnect", "burst")
RETRIED_KINDS = ("chat", "image_chat", "stream", "draw", "slow_body", "disconnect")
DEFAULT_MIX = {"chat": 6.0, "image_chat": 3.0, "stream": 3.0, "draw": 1.0, "slow_body": 1.0,
               "disconnect": 1.0, "bad": 3.0, "oversized": 0.25}
BAD_VARIANTS = ("malformed_json", "max_tokens_string", "too_many_stops", "too_many_images", "messages_not_list",
                "not_an_object", "temperature_string", "invalid_image_data", "unsupported_tools", "n_too_large",
                "draw_bad_size", "unknown_route", "wrong_method")
TEXT_PROMPTS = ("hello", "What shapes do you know?", "Say something short.", "Name a colour.",
                "How many sides does a triangle have?", "Describe a red circle.")
DRAW_PROMPTS = ("a red circle at the top left", "a large blue square in the center",
                "a small green triangle at the bottom", "an orange triangle at the top right")
PNG_B64_PREFIX = "iVBORw0KGgo"  # base64 of the PNG signature
MAX_STREAM_LINES = 20_000  # a streamed answer of max_tokens <= 64 has far fewer lines
RSS_INTERVAL_S = 0.5
MiB = 2**20
DEFAULT_MAX_CONNECTIONS = 128  # `mllm serve --max-connections`' default


# ------------------------------------------------------------------------------------------ options
def parse_mix(text: str) -> dict[str, float]:
    """'chat=6,bad=3' -> the default mix with those weights replaced (0 turns a kind off)."""
    mix = dict(DEFAULT_MIX)
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, sep, weight = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in MIX_KINDS:
            raise argparse.ArgumentTypeError(f"{item!r}: expected KIND=WEIGHT with KIND one of {', '.join(MIX_KINDS)}")
        try:
            value = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be a number") from None
        if not value >= 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be finite and >= 0")
        mix[kind] = value
    if not any(mix.values()):
        raise argparse.ArgumentTypeError("every weight is 0: nothing to send")
    return mix


def loopback_url(text: str) -> str:
    """A server URL on this machine -> 'http://127.0.0.1:PORT' (or [::1]); anything else is refused."""
    parsed = urllib.parse.urlsplit(text.strip())
    if parsed.scheme != "http":
        raise argparse.ArgumentTypeError(f"{text!r}: only http:// URLs on 127.0.0.1 or [::1] are accepted")
    if parsed.hostname not in LOOPBACK_HOSTS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: host {parsed.hostname!r} refused; this harness only talks to 127.0.0.1 or [::1]")
    if parsed.username or parsed.password or parsed.query or parsed.fragment or parsed.path not in ("", "/"):
        raise argparse.ArgumentTypeError(f"{text!r}: give only scheme, host and port (http://127.0.0.1:8000)")
    try:
        port = parsed.port
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: bad port") from None
    host = "[::1]" if parsed.hostname == "::1" else "127.0.0.1"
    return f"http://{host}:{port or 80}"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 0")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be a number >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="load_test.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load and fault harness for `mllm serve` (loopback only). Starts the server (--model) or uses\n"
                    "a running one (--url), runs --clients concurrent clients for --seconds with a mix of good,\n"
                    "bad and faulty requests plus bursts beyond the queue, stops everything (the server too, if\n"
                    "it started it), prints a table and writes --json.",
        epilog="kinds in --mix (expected answer):\n"
               "  chat        small text chat (2xx)\n"
               "  image_chat  a question about a shapes scene sent as a PNG data: URL (2xx)\n"
               "  stream      streamed chat, SSE read to [DONE] (2xx)\n"
               "  draw        /v1/images/generations, n=1, 64x64 (2xx)\n"
               "  slow_body   a valid chat whose body comes in --slow-pieces pieces, --slow-pause apart (2xx)\n"
               "  disconnect  a streamed chat dropped after its first chunks (2xx, then the client leaves)\n"
               "  bad         malformed JSON, wrong types, too many stop strings, too many images, ... (4xx)\n"
               "  oversized   a body 1 MiB over --max-body-mb, declared or chunked (413)\n"
               "bursts (--bursts, --burst-size) are separate: many small chats at once (2xx or 429).\n"
               "Good requests answered 429 are retried (--retries) within --timeout; one that ends without\n"
               "a valid 2xx is a lost good request.\n\n"
               "exit status: 0 pass; 1 any 5xx, lost good request, unexpected answer (bad request not 4xx,\n"
               "oversized not 413, disconnect stream never started) or a server that exited; 2 could not run.\n"
               "The recorded run's command: the module docstring and BENCHMARKS.md 'Serving under load'.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", metavar="DIR",
                        help="model folder: start `mllm serve --model DIR` on a free 127.0.0.1 port, stop it at "
                             "the end, and sample its RSS")
    target.add_argument("--url", type=loopback_url, metavar="URL",
                        help="a server already running on this machine (http://127.0.0.1:PORT or "
                             "http://[::1]:PORT; any other host is refused); RSS figures are n/a")
    parser.add_argument("--clients", type=_positive_int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--seconds", type=_positive_float, default=300.0,
                        help="how long the clients start new requests (default 300)")
    parser.add_argument("--mix", type=parse_mix, default=dict(DEFAULT_MIX), metavar="KIND=W,...",
                        help="relative weights of the request kinds, replacing the defaults for the kinds named "
                             "(0 turns one off); default "
                             + ",".join(f"{k}={v:g}" for k, v in DEFAULT_MIX.items()))
    parser.add_argument("--timeout", type=_positive_float, default=60.0,
                        help="per-request limit in seconds, 429 retries included (default 60)")
    parser.add_argument("--retries", type=_non_negative_int, default=30,
                        help="how often a good request answered 429 (queue full) is retried, backing off up to 2 s "
                             "between tries, until its --timeout at the latest (default 30)")
    parser.add_argument("--max-tokens", type=_positive_int, default=8,
                        help="max_tokens of the small chat, image chat, stream and slow-body requests (default 8)")
    parser.add_argument("--disconnect-max-tokens", type=_positive_int, default=64,
                        help="max_tokens of the streams a client drops mid-way (default 64)")
    parser.add_argument("--bursts", type=_non_negative_int, default=None,
                        help="bursts beyond the queue, evenly spaced in the run (default: one per 60 s, at least 1; "
                             "0: none)")
    parser.add_argument("--burst-size", type=_positive_int, default=None,
                        help="concurrent small chats per burst (default 2 x --queue-size + --max-batch, but at most "
                             "--max-connections - --clients - 16, so that a burst overflows the queue (429) "
                             "without passing the server's connection limit (503))")
    parser.add_argument("--slow-pieces", type=_positive_int, default=4,
                        help="pieces a slow body is sent in (default 4)")
    parser.add_argument("--slow-pause", type=_non_negative_float, default=0.5,
                        help="seconds between the pieces of a slow body (default 0.5)")
    parser.add_argument("--warmup", type=_non_negative_int, default=1,
                        help="requests of each good kind sent one by one before the clients start, not in the "
                             "figures (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' choices (default 0)")
    parser.add_argument("--json", metavar="OUT", help="write every figure of the report to this JSON file")
    server = parser.add_argument_group(
        "server settings", "passed to the server the harness starts (--model); with --url, give the running\n"
                           "server's values, so that the faults are sized right")
    server.add_argument("--queue-size", type=_positive_int, default=64, help="the server's --queue-size (default 64)")
    server.add_argument("--max-batch", type=_positive_int, default=8, help="the server's --max-batch (default 8)")
    server.add_argument("--max-body-mb", type=_positive_float, default=32.0,
                        help="the server's --max-body-mb (default 32); oversized bodies are 1 MiB more")
    server.add_argument("--max-connections", type=_positive_int, default=None,
                        help="the server's --max-connections (beyond it: 503); sizes the default --burst-size "
                             "(default 128, the server's default; passed to the server only when given)")
    server.add_argument("--max-images", type=_positive_int, default=8,
                        help="the server's --max-images (default 8); 'too many images' sends one more")
    server.add_argument("--device", help="--model only: the server's --device (default: the server's own, cuda "
                                         "when available)")
    server.add_argument("--decoding", choices=("auto", "jacobi", "sequential"),
                        help="--model only: the server's --decoding, how drawings are decoded (default: the "
                             "server's own, auto)")
    server.add_argument("--api-key", help="--url only: the running server's key, sent as 'Authorization: Bearer'")
    server.add_argument("--startup-timeout", type=_positive_float, default=180.0,
                        help="--model only: seconds to wait for /health (default 180)")
    server.add_argument("--server-log", metavar="FILE",
                        help="--model only: keep the server's output here (default: a temporary file, its tail "
                             "printed when something failed)")
    return parser


# ----------------------------------------------------------------------------------------- records
@dataclass
class Record:
    kind: str
    variant: str = ""
    start: float = 0.0  # seconds since the load started
    latency: float = 0.0
    status: int | None = None  # the final HTTP status; None when no response came
    statuses: list[int] = field(default_factory=list)  # every response (retried 429s included)
    error: str | None = None  # no response / a bad body / a stream error: what happened
    ttft: float | None = None  # streams: seconds to the first content chunk
    outcome: str = ""  # "ok" | "lost" (a good request) | "unexpected" (a bad or faulty one)


def judge(record: Record) -> str:
    status, valid = record.status, record.error is None
    if record.kind == "bad":
        return "ok" if status is not None and 400 <= status < 500 else "unexpected"
    if record.kind == "oversized":
        return "ok" if status == 413 else "unexpected"
    if record.kind == "burst" and status == 429:
        return "ok"
    good = status is not None and 200 <= status < 300 and valid
    if record.kind == "disconnect":
        return "ok" if good else "unexpected"
    return "ok" if good else "lost"


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --------------------------------------------------------------------------------------- payloads
class Payloads:
    """Every request body the clients send, built once (the oversized body too)."""

    def __init__(self, args: argparse.Namespace, model_name: str = "") -> None:
        from mllm.data.shapes import make_sample  # imports torch: built while the server starts

        self.model, self.max_tokens = model_name, args.max_tokens
        self.scenes = []
        for seed in range(8):
            sample = make_sample(seed)
            buffer = io.BytesIO()
            sample["image"].save(buffer, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            self.scenes.append((url, sample["qa"][seed % len(sample["qa"])]["question"]))
        fill = int(args.max_body_mb * MiB) + MiB
        self.oversized = b'{"messages": [{"role": "user", "content": "' + b"a" * fill + b'"}]}'
        self.max_images = args.max_images
        # Variants are taken in turn (shared by all clients), so every one is sent as soon as a kind has
        # had as many requests as it has variants.
        self.variants = {"bad": itertools.cycle(BAD_VARIANTS), "oversized": itertools.cycle(("declared", "chunked")),
                         "slow_body": itertools.cycle(("chunked", "content_length"))}

    def chat(self, rng: random.Random, max_tokens: int | None = None, **extra) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": rng.choice(TEXT_PROMPTS)}],
                "max_tokens": max_tokens or self.max_tokens, **extra}

    def image_chat(self, rng: random.Random) -> dict:
        url, question = rng.choice(self.scenes)
        return {"model": self.model, "max_tokens": self.max_tokens, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}

    def draw(self, rng: random.Random) -> dict:
        return {"model": self.model, "prompt": rng.choice(DRAW_PROMPTS), "n": 1, "size": "64x64",
                "response_format": "b64_json", "seed": rng.randrange(2**31)}

    def bad(self, variant: str) -> tuple[str, str, bytes | None]:
        """(method, path, body) of one bad request."""
        chat = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        image = {"type": "image_url", "image_url": {"url": self.scenes[0][0]}}
        bodies = {
            "malformed_json": b'{"model": "x", "messages": [{"role": "user", "content": "hi"',
            "not_an_object": b"[1, 2, 3]",
            "messages_not_list": {**chat, "messages": "hello"},
            "max_tokens_string": {**chat, "max_tokens": "ten"},
            "temperature_string": {**chat, "temperature": "hot"},
            "too_many_stops": {**chat, "stop": [f"stop-{index}" for index in range(9)]},
            "too_many_images": {**chat, "messages": [{"role": "user", "content": [
                *[image] * (self.max_images + 1), {"type": "text", "text": "count them"}]}]},
            "invalid_image_data": {**chat, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!not-base64!!"}},
                {"type": "text", "text": "what is it?"}]}]},
            "unsupported_tools": {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]},
            "n_too_large": {**chat, "n": 1000},
            "draw_bad_size": {"model": self.model, "prompt": "a red circle", "n": 1, "size": "99999x1"},
        }
        if variant == "unknown_route":
            return "POST", "/v1/no-such-endpoint", json.dumps(chat).encode()
        if variant == "wrong_method":
            return "GET", "/v1/chat/completions", None
        body = bodies[variant]
        path = "/v1/images/generations" if variant == "draw_bad_size" else "/v1/chat/completions"
        return "POST", path, body if isinstance(body, bytes) else json.dumps(body).encode()


# ------------------------------------------------------------------------------------------ clients
@dataclass
class Context:
    client: httpx.AsyncClient
    payloads: Payloads
    args: argparse.Namespace
    t0: float = 0.0
    records: list[Record] = field(default_factory=list)
    server_gone: object = None  # () -> bool: the server the harness started has exited


def _check_chat(response: httpx.Response) -> str | None:
    try:
        message = response.json()["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "invalid_body"
    return None if isinstance(message.get("content"), str) else "invalid_body"


def _check_draw(response: httpx.Response) -> str | None:
    try:
        b64 = response.json()["data"][0]["b64_json"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "invalid_body"
    return None if isinstance(b64, str) and b64.startswith(PNG_B64_PREFIX) else "invalid_body"


JSON_HEADERS = {"content-type": "application/json"}


async def _post_json(ctx: Context, record: Record, path: str, body: dict, check) -> int:
    response = await ctx.client.post(path, content=json.dumps(body).encode(), headers=JSON_HEADERS)
    record.status = response.status_code
    record.error = check(response) if 200 <= response.status_code < 300 else None
    return response.status_code


async def _stream(ctx: Context, record: Record, body: dict, started: float, drop_after: int | None) -> int:
    """POST a streamed chat and read its SSE lines to [DONE] (or drop the connection after `drop_after`
    data lines). Records a missing [DONE], an error event or an unparsable chunk as the error."""
    async with ctx.client.stream("POST", "/v1/chat/completions", content=json.dumps(body).encode(),
                                 headers=JSON_HEADERS) as response:
        record.status = response.status_code
        if not 200 <= response.status_code < 300:
            await response.aread()
            return response.status_code
        data_lines, done, record.error = 0, False, None
        lines = response.aiter_lines()
        for _ in range(MAX_STREAM_LINES):
            try:
                line = await lines.__anext__()
            except StopAsyncIteration:
                break
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                break
            data_lines += 1
            try:
                chunk = json.loads(payload)
            except ValueError:
                record.error = "stream_invalid_chunk"
                break
            if "error" in chunk:
                record.error = "stream_error_event"
                break
            if record.ttft is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                record.ttft = time.monotonic() - started
            if drop_after is not None and data_lines >= drop_after:
                record.variant = "dropped_mid_stream"
                return response.status_code  # leaving the block closes the connection mid-stream
        if drop_after is not None:
            record.variant = "ended_before_drop"
            if data_lines == 0 and record.error is None:
                record.error = "stream_without_chunks"
        elif record.error is None and not done:
            record.error = "stream_without_done"
        return response.status_code


async def _slow_body(ctx: Context, record: Record, rng: random.Random) -> int:
    body = json.dumps(ctx.payloads.chat(rng)).encode()
    pieces = max(1, min(ctx.args.slow_pieces, len(body)))
    step = -(-len(body) // pieces)
    headers = dict(JSON_HEADERS)
    if record.variant == "content_length":
        headers["content-length"] = str(len(body))  # httpx then sends the pieces without chunked encoding

    async def parts():
        for index in range(0, len(body), step):
            if index:
                await asyncio.sleep(ctx.args.slow_pause)
            yield body[index:index + step]

    response = await ctx.client.post("/v1/chat/completions", content=parts(), headers=headers)
    record.status = response.status_code
    record.error = _check_chat(response) if 200 <= response.status_code < 300 else None
    return response.status_code


async def _oversized(ctx: Context, record: Record) -> int:
    big = ctx.payloads.oversized
    if record.variant == "declared":
        content: bytes | object = big
    else:
        async def chunks():
            for index in range(0, len(big), MiB):
                yield big[index:index + MiB]

        content = chunks()
    response = await ctx.client.post("/v1/chat/completions", content=content, headers=JSON_HEADERS)
    record.status = response.status_code
    return response.status_code


async def _attempt(ctx: Context, record: Record, rng: random.Random, started: float) -> int:
    kind, payloads = record.kind, ctx.payloads
    if kind in ("chat", "burst"):
        return await _post_json(ctx, record, "/v1/chat/completions", payloads.chat(rng), _check_chat)
    if kind == "image_chat":
        return await _post_json(ctx, record, "/v1/chat/completions", payloads.image_chat(rng), _check_chat)
    if kind == "draw":
        return await _post_json(ctx, record, "/v1/images/generations", payloads.draw(rng), _check_draw)
    if kind == "stream":
        body = payloads.chat(rng, stream=True, stream_options={"include_usage": True})
        return await _stream(ctx, record, body, started, drop_after=None)
    if kind == "disconnect":
        body = payloads.chat(rng, max_tokens=ctx.args.disconnect_max_tokens, stream=True)
        return await _stream(ctx, record, body, started, drop_after=2)
    if kind == "slow_body":
        return await _slow_body(ctx, record, rng)
    if kind == "oversized":
        return await _oversized(ctx, record)
    if kind == "bad":
        method, path, body = payloads.bad(record.variant)
        response = await ctx.client.request(method, path, content=body, headers=JSON_HEADERS if body else None)
        record.status = response.status_code
        return response.status_code
    raise ValueError(f"unknown kind {kind!r}")


async def _send(ctx: Context, record: Record, rng: random.Random, started: float) -> None:
    retries = ctx.args.retries if record.kind in RETRIED_KINDS else 0
    for attempt in range(retries + 1):
        status = await _attempt(ctx, record, rng, started)
        record.statuses.append(status)
        if status != 429 or attempt == retries:
            return
        await asyncio.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + rng.random()))


async def run_one(ctx: Context, kind: str, rng: random.Random, client: httpx.AsyncClient | None = None) -> Record:
    record = Record(kind=kind)
    if kind in ctx.payloads.variants:
        record.variant = next(ctx.payloads.variants[kind])
    if client is not None:
        ctx = Context(client=client, payloads=ctx.payloads, args=ctx.args, t0=ctx.t0, records=ctx.records,
                      server_gone=ctx.server_gone)
    started = time.monotonic()
    record.start = started - ctx.t0
    try:
        await asyncio.wait_for(_send(ctx, record, rng, started), timeout=ctx.args.timeout)
    except asyncio.TimeoutError:
        record.status, record.error = None, "timeout"
    except httpx.HTTPError as error:  # no (complete) response: reset, refused, protocol error, ...
        record.status, record.error = None, type(error).__name__
    except OSError as error:
        record.status, record.error = None, type(error).__name__
    record.latency = time.monotonic() - started
    record.outcome = judge(record)
    return record


async def client_loop(ctx: Context, index: int, deadline: float, pending: list[str], mix: dict[str, float]) -> None:
    rng = random.Random(ctx.args.seed * 100_003 + index)
    kinds = [k for k in MIX_KINDS if mix[k] > 0]
    weights = [mix[k] for k in kinds]
    # A client cannot finish more than ~100 requests a second (each is a loopback round trip at least).
    for _ in range(max(10, int(ctx.args.seconds * 100))):
        if time.monotonic() >= deadline or (ctx.server_gone is not None and ctx.server_gone()):
            return
        kind = pending.pop() if pending else rng.choices(kinds, weights)[0]
        record = await run_one(ctx, kind, rng)
        ctx.records.append(record)
        if record.error == "ConnectError":  # nobody listening (any more): do not spin
            await asyncio.sleep(0.5)


async def burst_loop(ctx: Context, bursts: int, size: int, args: argparse.Namespace, headers: dict) -> None:
    rng = random.Random(args.seed * 100_003 - 1)
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=0)
    for index in range(bursts):
        at = ctx.t0 + args.seconds * (index + 1) / (bursts + 1)
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        async with httpx.AsyncClient(base_url=str(ctx.client.base_url), timeout=args.timeout, limits=limits,
                                     trust_env=False, headers=headers) as burst_client:
            seeds = [rng.randrange(2**31) for _ in range(size)]
            records = await asyncio.gather(*(run_one(ctx, "burst", random.Random(s), burst_client) for s in seeds))
        for record in records:
            record.variant = f"burst_{index + 1}"
        ctx.records.extend(records)


def burst_size_of(args: argparse.Namespace) -> int:
    if args.burst_size:
        return args.burst_size
    connections = args.max_connections or DEFAULT_MAX_CONNECTIONS
    return max(1, min(2 * args.queue_size + args.max_batch, connections - args.clients - 16))


# ------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The server gets SIGTERM if the harness dies (Linux PR_SET_PDEATHSIG): it never outlives a killed run."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    script = Path(sys.executable).parent / "mllm"
    head = [str(script)] if script.is_file() else [sys.executable, "-c",
                                                     "import sys; from mllm.cli import main; sys.exit(main())"]
    command = [*head, "serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
               "--queue-size", str(args.queue_size), "--max-batch", str(args.max_batch),
               "--max-body-mb", f"{args.max_body_mb:g}", "--max-images", str(args.max_images)]
    if args.max_connections is not None:
        command += ["--max-connections", str(args.max_connections)]
    if args.decoding is not None:
        command += ["--decoding", args.decoding]
    return command + (["--device", args.device] if args.device else [])


class RssSampler:
    """VmRSS / VmHWM of a process from /proc/<pid>/status every RSS_INTERVAL_S, on a thread."""

    def __init__(self, pid: int, max_samples: int) -> None:
        self.pid, self.max_samples = pid, max_samples
        self.samples: list[tuple[float, float]] = []  # (monotonic time, VmRSS MiB)
        self.hwm_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def read(self) -> tuple[float, float] | None:
        """(VmRSS, VmHWM) in MiB, or None when the process is gone."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        fields = {}
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024  # kB -> MiB
        if len(fields) < 2:
            return None
        return fields["VmRSS"], fields["VmHWM"]

    def sample(self) -> float | None:
        reading = self.read()
        if reading is None:
            return None
        rss, hwm = reading
        self.hwm_mb = max(self.hwm_mb or 0.0, hwm)
        if len(self.samples) < self.max_samples:
            self.samples.append((time.monotonic(), rss))
        return rss

    def _run(self) -> None:
        for _ in range(self.max_samples):
            if self._stop.wait(RSS_INTERVAL_S):
                return
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def wait_healthy(base_url: str, timeout: float, process: subprocess.Popen | None) -> dict:
    deadline = time.monotonic() + timeout
    last = "no answer"
    with httpx.Client(base_url=base_url, timeout=2.0, trust_env=False) as client:
        for _ in range(int(timeout / 0.25) + 1):
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before /health answered")
            try:
                response = client.get("/health")
                if response.status_code == 200 and response.json().get("status") == "ok":
                    return response.json()
                last = f"HTTP {response.status_code}"
            except (httpx.HTTPError, ValueError) as error:
                last = type(error).__name__
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
    raise RuntimeError(f"/health did not answer ok within {timeout:g} s (last: {last})")


def stop_server(process: subprocess.Popen) -> int | None:
    """SIGINT (uvicorn's graceful shutdown), then SIGTERM, then SIGKILL: (the exit code, the last signal sent)."""
    sent = None
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            break
        process.send_signal(sig)
        sent = sig.name
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)
    return process.poll(), sent


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            return "\n".join(handle.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------- report
def summarize(records: list[Record], elapsed: float) -> dict:
    kinds = {}
    for kind in KINDS:
        mine = [r for r in records if r.kind == kind]
        ok = [r for r in mine if r.outcome == "ok"]
        latencies = [r.latency for r in ok]
        entry = {
            "requests": len(mine), "ok": len(ok),
            "lost": sum(r.outcome == "lost" for r in mine),
            "unexpected": sum(r.outcome == "unexpected" for r in mine),
            "final_status": _count(str(r.status) for r in mine if r.status is not None),
            "errors": _count(r.error for r in mine if r.error),
            "retried_429": sum(max(0, len(r.statuses) - 1) for r in mine),
            "throughput_rps": round(len(ok) / elapsed, 3) if elapsed > 0 else None,
            "latency_s": {name: _round(percentile(latencies, q)) for name, q in (("p50", 50), ("p95", 95), ("p99", 99))}
            | {"max": _round(max(latencies, default=None)), "mean": _round(sum(latencies) / len(latencies))
               if latencies else None},
        }
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        if kind in ("stream",):
            entry["ttft_s"] = {name: _round(percentile(ttfts, q)) for name, q in (("p50", 50), ("p95", 95), ("p99", 99))}
        if kind in ("bad", "oversized", "slow_body", "disconnect", "burst"):
            entry["variants"] = {
                variant: {"requests": sum(r.variant == variant for r in mine),
                          "final_status": _count(str(r.status) if r.status is not None else (r.error or "none")
                                                 for r in mine if r.variant == variant)}
                for variant in sorted({r.variant for r in mine})}
        kinds[kind] = entry
    every_response = Counter(s for r in records for s in r.statuses)
    bursts = [r for r in records if r.kind == "burst"]
    return {
        "kinds": kinds,
        "responses_by_status": {str(k): v for k, v in sorted(every_response.items())},
        "errors_without_response": _count(r.error for r in records if r.status is None and r.error),
        "totals": {
            "requests": len(records),
            "ok": sum(r.outcome == "ok" for r in records),
            "throughput_rps": round(len(records) / elapsed, 3) if elapsed > 0 else None,
            "5xx": sum(v for k, v in every_response.items() if k >= 500),
            "lost_good_requests": sum(r.outcome == "lost" for r in records),
            "unexpected_answers": sum(r.outcome == "unexpected" for r in records),
            "bad_requests_not_4xx": sum(r.kind == "bad" and r.outcome != "ok" for r in records),
            "burst_429": sum(r.status == 429 for r in bursts),
            "good_requests_429_retried": sum(max(0, len(r.statuses) - 1) for r in records),
        },
        "small_chat_p99_s": kinds["chat"]["latency_s"]["p99"],
    }


def _count(items) -> dict[str, int]:
    return dict(sorted(Counter(items).items()))


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def rss_report(sampler: RssSampler | None, start: float | None, after_warmup: float | None,
               end: float | None, t_load: float) -> dict:
    if sampler is None:
        return {"available": False, "why": "--url: the server is not this harness's process"}
    peak = sampler.hwm_mb
    sampled = [mb for _, mb in sampler.samples]
    timeline = sampler.samples[:: max(1, len(sampler.samples) // 60)]
    during = [(t, mb) for t, mb in sampler.samples if t >= t_load]
    middle = (during[0][0] + during[-1][0]) / 2 if during else 0.0
    first = [mb for t, mb in during if t < middle]
    second = [mb for t, mb in during if t >= middle]
    return {
        "available": True, "pid": sampler.pid, "interval_s": RSS_INTERVAL_S, "samples": len(sampler.samples),
        "start_mb": _round(start, 1), "after_warmup_mb": _round(after_warmup, 1), "end_mb": _round(end, 1),
        "peak_mb": _round(peak, 1), "peak_sampled_mb": _round(max(sampled, default=None), 1),
        "growth_mb": _round(end - start, 1) if end is not None and start is not None else None,
        "growth_after_warmup_mb": _round(end - after_warmup, 1) if end is not None and after_warmup else None,
        "peak_minus_start_mb": _round(peak - start, 1) if peak is not None and start is not None else None,
        # Leak indicator: the highest RSS of the load's first half against its second half.
        "load_first_half_max_mb": _round(max(first, default=None), 1),
        "load_second_half_max_mb": _round(max(second, default=None), 1),
        "timeline": [[round(t - t_load, 1), round(mb, 1)] for t, mb in timeline],
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def print_report(report: dict) -> None:
    print(f"\n{report['config']['clients']} clients, {report['duration_s']:.1f} s, server {report['server']['url']}"
          f" (model {report['server']['model_name']})")
    header = (f"{'kind':<11} {'requests':>8} {'ok':>6} {'lost':>5} {'unexp':>5} {'429s':>5} {'ok/s':>7} "
              f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}  final statuses")
    print(header)
    print("-" * len(header))
    for kind, entry in report["kinds"].items():
        lat = entry["latency_s"]
        statuses = " ".join(f"{k}:{v}" for k, v in entry["final_status"].items())
        errors = " ".join(f"{k}:{v}" for k, v in entry["errors"].items())
        print(f"{kind:<11} {entry['requests']:>8} {entry['ok']:>6} {entry['lost']:>5} {entry['unexpected']:>5} "
              f"{entry['retried_429']:>5} {entry['throughput_rps'] or 0:>7.2f} {_ms(lat['p50']):>7} "
              f"{_ms(lat['p95']):>7} {_ms(lat['p99']):>7}  {statuses}{'  ' + errors if errors else ''}")
    totals = report["totals"]
    print(f"\nall responses by status: {report['responses_by_status']}")
    if report["errors_without_response"]:
        print(f"no response: {report['errors_without_response']}")
    print(f"requests {totals['requests']} ({totals['throughput_rps']} /s), 5xx {totals['5xx']}, lost good requests "
          f"{totals['lost_good_requests']}, unexpected answers {totals['unexpected_answers']}, burst 429s "
          f"{totals['burst_429']}, 429s retried {totals['good_requests_429_retried']}")
    print(f"small chat under load: p99 {_ms(report['small_chat_p99_s'])} ms")
    rss = report["rss"]
    if rss["available"]:
        mb = {key: "n/a" if value is None else f"{value} MiB" for key, value in rss.items()}
        print(f"server RSS: start {mb['start_mb']}, after warm-up {mb['after_warmup_mb']}, end {mb['end_mb']}, peak "
              f"{mb['peak_mb']} (VmHWM); growth end-start {mb['growth_mb']}, peak-start {mb['peak_minus_start_mb']}; "
              f"highest in the load's first half {mb['load_first_half_max_mb']}, second half "
              f"{mb['load_second_half_max_mb']}")
    else:
        print("server RSS: n/a (--url)")
    if report["server"].get("stopped_with"):
        print(f"server stopped with {report['server']['stopped_with']}, exit code {report['server']['exit_code']}")
    engine = (report["server"].get("health_end") or {}).get("engine")
    if engine:
        print(f"engine: {engine}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    for failure in report["failures"]:
        print(f"FAIL: {failure}")
    print("PASS" if report["passed"] else "FAIL")


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) if head else None


# --------------------------------------------------------------------------------------------- main
async def load_phase(args: argparse.Namespace, base_url: str, payloads: Payloads, headers: dict,
                     on_warmed, server_gone) -> tuple[list[Record], list[Record], float, float]:
    limits = httpx.Limits(max_connections=args.clients * 2 + 8, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=args.timeout, limits=limits, trust_env=False,
                                 headers=headers) as client:
        ctx = Context(client=client, payloads=payloads, args=args, server_gone=server_gone)
        warm_rng = random.Random(args.seed)
        warmup = []
        for _ in range(args.warmup):
            for kind in ("chat", "image_chat", "stream", "draw"):
                warmup.append(await run_one(ctx, kind, warm_rng))
        on_warmed()
        mix = args.mix
        bursts = args.bursts if args.bursts is not None else max(1, int(args.seconds // 60))
        burst_size = burst_size_of(args)
        pending = [k for k in reversed(MIX_KINDS) if mix[k] > 0]
        ctx.t0 = time.monotonic()
        deadline = ctx.t0 + args.seconds
        tasks = [client_loop(ctx, i, deadline, pending, mix) for i in range(args.clients)]
        if bursts:
            tasks.append(burst_loop(ctx, bursts, burst_size, args, headers))
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.seconds + 2 * args.timeout + 30)
        except asyncio.TimeoutError:
            ctx.records.append(Record(kind="chat", error="load phase overran", outcome="lost"))
        return ctx.records, warmup, ctx.t0, time.monotonic() - ctx.t0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model and args.api_key:
        parser.error("--api-key is for --url (the server the harness starts has no key)")
    if args.url and (args.device or args.server_log):
        parser.error("--device and --server-log are for --model (the harness does not start a server with --url)")
    if args.model and not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: no such folder")
    started_at = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    process, sampler, log_path, temp_dir = None, None, None, None
    rss_start = rss_warm = rss_end = None
    failures: list[str] = []
    warnings: list[str] = []
    server_info: dict = {"started_by_harness": bool(args.model)}
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        if args.model:
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            if args.server_log:
                log_path = Path(args.server_log)
            else:
                temp_dir = tempfile.mkdtemp(prefix="mllm-load-test-")
                log_path = Path(temp_dir) / "server.log"
            command = server_command(args, port)
            server_info["command"] = " ".join(command)
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "NO_PROXY": "127.0.0.1,::1,localhost"}
            # No other thread runs yet (the RSS sampler starts later), so preexec_fn is safe here.
            with open(log_path, "wb") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509
            print(f"started: {server_info['command']} (pid {process.pid}, log {log_path})", flush=True)
        else:
            base_url = args.url
        server_info["url"] = base_url
        payloads = Payloads(args)
        try:
            health = wait_healthy(base_url, args.startup_timeout if process else 10.0, process)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            if log_path:
                print(log_tail(log_path), file=sys.stderr)
            return 2
        server_info["health_start"] = health
        with httpx.Client(base_url=base_url, timeout=10.0, trust_env=False, headers=headers) as sync_client:
            models = sync_client.get("/v1/models")
        if models.status_code != 200:
            print(f"error: GET /v1/models answered {models.status_code}: {models.text[:200]}", file=sys.stderr)
            return 2
        model_name = models.json()["data"][0]["id"]
        server_info["model_name"] = model_name
        if process is not None:
            sampler = RssSampler(process.pid, max_samples=int((args.seconds + 3 * args.timeout + 120) / RSS_INTERVAL_S))
            rss_start = sampler.sample()
            sampler.start()
        payloads.model = model_name
        print(f"server healthy at {base_url} (model {model_name}); {args.clients} clients for {args.seconds:g} s",
              flush=True)

        def on_warmed() -> None:
            nonlocal rss_warm
            rss_warm = sampler.sample() if sampler else None

        server_gone = (lambda: process.poll() is not None) if process is not None else None
        records, warmup, t_load, elapsed = asyncio.run(load_phase(args, base_url, payloads, headers, on_warmed,
                                                                  server_gone))
        if sampler is not None:
            rss_end = sampler.sample()
            sampler.stop()
        with httpx.Client(base_url=base_url, timeout=10.0, trust_env=False) as sync_client, \
                contextlib.suppress(httpx.HTTPError, ValueError):
            server_info["health_end"] = sync_client.get("/health").json()
        if process is not None and process.poll() is not None:
            failures.append(f"the server exited during the run (code {process.returncode})")
    finally:
        if process is not None:
            server_info["exit_code"], server_info["stopped_with"] = stop_server(process)
            if sampler is not None:
                sampler.stop()

    summary = summarize(records, elapsed)
    totals = summary["totals"]
    for record in warmup:
        if record.outcome != "ok":
            failures.append(f"warm-up {record.kind} failed: status {record.status}, {record.error}")
    if totals["5xx"]:
        failures.append(f"{totals['5xx']} responses with a 5xx status"
                        + (f" ({summary['responses_by_status']['503']} x 503: over the server's connection limit? "
                           "see --max-connections)" if "503" in summary["responses_by_status"] else ""))
    if totals["lost_good_requests"]:
        failures.append(f"{totals['lost_good_requests']} good requests lost (no valid 2xx)")
    if totals["unexpected_answers"]:
        failures.append(f"{totals['unexpected_answers']} unexpected answers (bad requests not 4xx, oversized not "
                        "413, disconnect streams that never started)")
    connections = args.max_connections or DEFAULT_MAX_CONNECTIONS
    if args.clients + (burst_size_of(args) if summary["kinds"]["burst"]["requests"] else 0) > connections - 8:
        warnings.append(f"clients + burst size come close to or pass the server's connection limit ({connections}): "
                        "expect 503s")
    for kind in MIX_KINDS:
        if args.mix[kind] > 0 and not summary["kinds"][kind]["requests"]:
            warnings.append(f"no {kind} request was sent (run longer or with more clients)")
    if summary["kinds"]["burst"]["requests"] and not totals["burst_429"] and not summary["errors_without_response"]:
        warnings.append("no burst request got a 429: the bursts never filled the queue (try a larger --burst-size)")
    report = {
        "tool": "scripts/load_test.py",
        "command": " ".join([Path(sys.argv[0]).name if argv is None else "load_test.py", *(sys.argv[1:] if argv is None
                                                                                          else argv)]),
        "date": started_at.isoformat(timespec="seconds"),
        "git": _git_revision(),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()], "python": sys.version.split()[0],
                    "httpx": httpx.__version__},
        "config": {"clients": args.clients, "seconds": args.seconds, "mix": args.mix, "timeout_s": args.timeout,
                   "retries": args.retries, "max_tokens": args.max_tokens,
                   "disconnect_max_tokens": args.disconnect_max_tokens,
                   "bursts": args.bursts if args.bursts is not None else max(1, int(args.seconds // 60)),
                   "burst_size": burst_size_of(args), "max_connections": args.max_connections,
                   "slow_pieces": args.slow_pieces, "slow_pause_s": args.slow_pause, "warmup": args.warmup,
                   "seed": args.seed, "queue_size": args.queue_size, "max_batch": args.max_batch,
                   "max_body_mb": args.max_body_mb, "max_images": args.max_images, "device": args.device},
        "server": server_info,
        "duration_s": round(elapsed, 3),
        "warmup": [{"kind": r.kind, "status": r.status, "latency_s": _round(r.latency), "error": r.error}
                   for r in warmup],
        **summary,
        "rss": rss_report(sampler, rss_start, rss_warm, rss_end, t_load),
        "failures": failures,
        "warnings": warnings,
        "passed": not failures,
    }
    print_report(report)
    if failures and log_path is not None:
        print(f"\nserver log tail ({log_path}):\n{log_tail(log_path)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if temp_dir is not None and not failures:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
