"""The server against the official `openai` client and raw HTTP, live on loopback with a tiny model."""

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    def __init__(self, app) -> None:
        import uvicorn

        self.app, self.port = app, _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import mllm
    from mllm.init import init_model

    return mllm.load(init_model("tiny", "tiny", tmp_path_factory.mktemp("serve") / "m", seed=0), device="cpu")


@pytest.fixture(scope="module")
def server(model):
    from serve.app import create_app

    live = _Server(create_app(model=model, api_key=KEY, model_name="tiny", batch_window_s=0.05))
    yield live
    live.stop()


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _png_data_url(size: int = 32) -> str:
    from mllm.data.shapes import make_scene, render

    buffer = io.BytesIO()
    render(make_scene(3), size).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _image_message(text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_data_url()}},
                                        {"type": "text", "text": text}]}


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and "batches" in health["engine"]


def test_chat_with_an_image_counts_image_tokens(client, model):
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=5, temperature=0)
    reply = client.chat.completions.create(model="tiny", messages=[_image_message("Describe the image.")],
                                           max_tokens=5, temperature=0)
    assert reply.object == "chat.completion" and isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    image_tokens = model.config.image_tokens_per_image + 2
    assert reply.usage.prompt_tokens >= plain.usage.prompt_tokens + image_tokens - 8
    assert reply.usage.prompt_tokens > image_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert 0 < reply.usage.completion_tokens <= 5


def test_multi_turn_n_and_seed(client):
    messages = [_image_message("What colour is the circle?"), {"role": "assistant", "content": "red"},
                {"role": "user", "content": "And the square?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, n=3, temperature=0.9,
                                           seed=7)
    assert len(reply.choices) == 3 and [c.index for c in reply.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, n=3, temperature=0.9,
                                           seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]


def test_temperature_defaults_to_the_models_generation_config(client, model):
    from serve.app import generation_config_temperature

    # `mllm init` / `mllm train` write a generation config that does not sample: greedy, as `generate` would.
    assert generation_config_temperature(model) == 0.0
    messages = [_image_message("Describe the image.")]
    greedy = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    default = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, n=3)
    assert [c.message.content for c in default.choices] == [greedy.choices[0].message.content] * 3
    sampled = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, n=3, temperature=1.5,
                                             seed=3)
    assert len({c.message.content for c in sampled.choices}) > 1  # a request's own temperature still samples

    config = model.model.llm.generation_config
    before = config.do_sample, config.temperature
    try:
        config.do_sample, config.temperature = True, 0.8
        assert generation_config_temperature(model) == 0.8
    finally:
        config.do_sample, config.temperature = before


def test_streaming_matches_the_plain_reply_and_reports_usage(client):
    messages = [_image_message("Describe the image.")]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain.choices[0].message.content
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_image_generation(client, model):
    result = client.images.generate(model="tiny", prompt="a red circle", n=2, response_format="b64_json",
                                    extra_body={"seed": 3, "guidance_scale": 2.0})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    side = model.model.vision_tokenizer.image_size
    assert len(images) == 2 and all(image.size == (side, side) for image in images)
    resized = client.images.generate(model="tiny", prompt="a red circle", n=1, size="64x64",
                                     extra_body={"seed": 3, "guidance_scale": 2.0})
    assert Image.open(io.BytesIO(base64.b64decode(resized.data[0].b64_json))).size == (64, 64)
    same = client.images.generate(model="tiny", prompt="a red circle", n=2, extra_body={"seed": 3, "guidance_scale": 2.0})
    assert [d.b64_json for d in same.data] == [d.b64_json for d in result.data]


def test_errors_are_the_clients_typed_exceptions(client, server):
    import openai

    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    bad_image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[bad_image])
    assert caught.value.status_code == 400 and caught.value.body["message"]
    long_text = "red circle " * 2000  # ~4000 tokens; the tiny model's context is 512
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long_text}])
    assert caught.value.code == "context_length_exceeded"


def _post(server, path: str, content: bytes, **headers) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers})


def test_bad_requests_get_a_4xx_json_error_and_the_server_lives_on(server):
    import json

    truncated = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(truncated, format="PNG")
    half = base64.b64encode(truncated.getvalue()[: len(truncated.getvalue()) // 2]).decode()

    def chat(content):
        return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": content}]}).encode()

    cases = [
        ("/v1/chat/completions", b"{not json", 400),
        ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400),
        ("/v1/chat/completions", chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                                          base64.b64encode(b"hello").decode()}}]), 400),
        ("/v1/chat/completions", chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + half}}]),
         400),
        ("/v1/chat/completions", chat([{"type": "image_url", "image_url": {"url": _png_data_url()}}] * 20), 400),
        ("/v1/chat/completions", chat([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]), 400),
        ("/v1/chat/completions", b"{" + b" " * (40 * 2**20) + b"}", 413),
        ("/v1/images/generations", json.dumps({"prompt": ""}).encode(), 400),
        ("/v1/images/generations", json.dumps({"prompt": "a red circle", "n": 1000}).encode(), 400),
        ("/v1/nope", b"{}", 404),
    ]
    for path, body, status in cases:
        response = _post(server, path, body)
        assert response.status_code == status, (path, body[:80], response.status_code, response.text[:200])
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert _post(server, "/v1/chat/completions", chat("hello")).status_code == 200


def test_concurrent_requests_are_batched(server, client):
    before = httpx.get(f"{server.url}/health").json()["engine"]["max_batch"]
    prompts = [f"What colour is object {i}?" for i in range(16)]

    def ask(text):
        return client.chat.completions.create(model="tiny", messages=[_image_message(text)], max_tokens=6,
                                              temperature=0)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, prompts))
    assert all(r.choices[0].message.content is not None for r in replies)
    # batched answers are the answers each request gets alone
    alone = ask(prompts[5])
    assert replies[5].choices[0].message.content == alone.choices[0].message.content
    stats = httpx.get(f"{server.url}/health").json()["engine"]
    assert max(stats["max_batch"], before) > 1 and stats["max_batch"] > 1


def test_a_disconnected_stream_stops_its_generation(server):
    import json

    cancelled = server.app.state.engine.stats["cancelled"]
    # 8 greedy rows of up to ~490 tokens each: seconds of work on the tiny model, so the hang-up comes first.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2000, "n": 8,
            "stream": True, "temperature": 0, "stop": ["zzzzzz"]}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("choices"):
                break  # first chunk: hang up
    deadline = time.time() + 30
    while server.app.state.engine.stats["cancelled"] <= cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert server.app.state.engine.stats["cancelled"] > cancelled


def test_a_full_queue_answers_429(model):
    from serve.app import create_app

    live = _Server(create_app(model=model, queue_size=1, max_batch=1, batch_window_s=0.0))
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 60, "seed": 1,
                "temperature": 1.0}
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{live.url}/v1/chat/completions", json=body,
                                                       timeout=120).status_code, range(8)))
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    finally:
        live.stop()


@pytest.mark.builtin_engine
def test_decoding_field_chooses_how_images_are_drawn(server, client, model):
    import json

    import openai

    def generated(**extra) -> list[bytes]:
        result = client.images.generate(model="tiny", prompt="a red circle", n=2,
                                        extra_body={"seed": 3, "guidance_scale": 2.0, **extra})
        return [Image.open(io.BytesIO(base64.b64decode(d.b64_json))).convert("RGB").tobytes() for d in result.data]

    def drawn(decoding: str) -> list[bytes]:
        return [im.tobytes() for im in model.draw("a red circle", n=2, seed=3, guidance_scale=2.0, decoding=decoding)]

    # Sampled (the default temperature): each method draws its own images, as MLLM.draw does with it.
    assert generated() == generated(decoding="jacobi") == drawn("jacobi")  # the default, auto: jacobi for 2 images
    assert generated(decoding="sequential") == drawn("sequential") != drawn("jacobi")
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Draw: a red circle"}],
                                           max_tokens=4, extra_body={"decoding": "sequential"})
    assert reply.choices[0].message.content is not None

    for path, payload in (("/v1/images/generations", {"prompt": "a red circle", "decoding": "fast"}),
                          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                    "decoding": "fast"})):
        response = _post(server, path, json.dumps(payload).encode())
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "decoding" and "'jacobi', 'sequential'" in error["message"]
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="tiny", prompt="a red circle", extra_body={"decoding": 1})


def test_serve_decoding_flag_sets_the_servers_default(model, monkeypatch, tmp_path):
    import argparse
    from types import SimpleNamespace

    import mllm.model
    import serve.app
    import serve.server
    from mllm.commands import serve as serve_command
    from serve.protocol import Limits

    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    seen = []
    real_create_app = serve.app.create_app

    def fake_create_app(model_dir, **kwargs):
        seen.append(kwargs["limits"].default_decoding)
        return SimpleNamespace(state=SimpleNamespace(model_name="tiny"))

    monkeypatch.setattr(serve.app, "create_app", fake_create_app)
    monkeypatch.setattr(serve.server, "make_server", lambda app, options: SimpleNamespace(run=lambda sockets: None))
    monkeypatch.setattr(mllm.model, "check_model_folder", lambda folder: None)
    for argv in ([], ["--decoding", "sequential"]):
        assert serve_command.run(parser.parse_args(["--model", str(tmp_path), "--port", "0", *argv])) == 0
    assert seen == ["auto", "sequential"]
    with pytest.raises(ValueError, match="default decoding must be one of"):
        real_create_app(model=model, limits=Limits(default_decoding="fast"))
