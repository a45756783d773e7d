"""`mllm serve --model DIR`: the OpenAI-compatible server (serve.app) under uvicorn, on loopback by default."""

from __future__ import annotations

import argparse

from mllm.commands.types import non_negative_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (`mllm init` / `mllm train` / `mllm merge`)")
    parser.add_argument("--adapter", help="a peft adapter folder to load onto the model")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--model-name", help="the model id clients see (default: the folder's name)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (default: only data: URLs are accepted)")
    parser.add_argument("--max-batch", type=positive_int, default=8,
                        help="most sequences generated together in one batch (default 8)")
    parser.add_argument("--batch-window-ms", type=float, default=20.0,
                        help="how long a batch waits for more requests to join (default 20 ms)")
    parser.add_argument("--queue-size", type=positive_int, default=64,
                        help="requests that may wait; more are refused with 429 (default 64)")
    parser.add_argument("--max-tokens", type=positive_int, default=256,
                        help="reply length when a request gives no max_tokens (default 256)")
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32 MB)")
    parser.add_argument("--max-images", type=positive_int, default=8, help="images per request (default 8)")
    parser.add_argument("--default-temperature", type=non_negative_float, default=None, metavar="T",
                        help="temperature of chat requests that give none (default: the model's generation "
                             "config, as transformers' generate reads it: greedy unless it sets do_sample)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from serve.app import create_app
    from serve.protocol import Limits

    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_images=args.max_images,
                    allow_remote_images=args.allow_remote_images, default_temperature=args.default_temperature)
    app = create_app(args.model, adapter=args.adapter, api_key=args.api_key, limits=limits,
                     max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000,
                     queue_size=args.queue_size, default_max_tokens=args.max_tokens, device=args.device,
                     model_name=args.model_name)
    print(f"serving {app.state.model_name} on http://{args.host}:{args.port} (web chat at /, API at /v1)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0

