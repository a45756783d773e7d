"""`POST /v1/images/edits` (the official `openai` client's `images.edit`, raw multipart and JSON) and several
images in one chat message, live on loopback with a tiny random model (untrained: these tests check the
plumbing, the caps, the seeds and the order of the images, not what the edits look like)."""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image

KEY = "test-key"
INSTRUCTION = "make the circle blue"


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

    return mllm.load(init_model("tiny", "tiny", tmp_path_factory.mktemp("edits") / "m", seed=0), device="cpu")


@pytest.fixture(scope="module")
def server(model):
    from serve.app import create_app

    live = _Server(create_app(model=model, api_key=KEY, model_name="tiny", batch_window_s=0.0))
    yield live
    live.stop()


@pytest.fixture()
def client(server):
    openai = pytest.importorskip("openai", reason="the official `openai` client is not installed (pip install openai)")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def scene(model) -> Image.Image:
    from mllm.data.shapes import make_scene, render

    return render(make_scene(1), model.model.vision_tokenizer.image_size)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny real PNG whose header claims width x height (the header a huge image has)."""
    data = bytearray(_png(Image.new("RGB", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def _edit(server, files=None, data=None, **headers) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/images/edits", files=files, data=data, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", **headers})


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    return error


@pytest.fixture()
def decodes(monkeypatch):
    """Counts `load_image` calls on encoded images (the one decoder; the live server runs in this process)."""
    import tokenizer_vision.image_processing as images

    calls = []
    real = images.load_image

    def counting(source, *args, **kwargs):
        if isinstance(source, (str, bytes)):
            calls.append(source[:20])
        return real(source, *args, **kwargs)

    monkeypatch.setattr(images, "load_image", counting)
    return calls


# ------------------------------------------------------------------------------ the openai client
def test_the_openai_client_edits_an_image(client, model, scene):
    png = _png(scene)
    result = client.images.edit(image=("scene.png", png, "image/png"), prompt=INSTRUCTION, n=2,
                                response_format="b64_json", extra_body={"seed": 1, "guidance_scale": 2.0})
    images = [_decoded(item.b64_json) for item in result.data]
    side = model.model.vision_tokenizer.image_size
    assert len(images) == 2 and all(image.size == (side, side) for image in images)
    # Same image, instruction and seed: the same edits, and the ones `MLLM.edit` makes (edit k: seed + k).
    again = client.images.edit(image=("scene.png", png, "image/png"), prompt=INSTRUCTION, n=2,
                               extra_body={"seed": 1, "guidance_scale": 2.0})
    assert [item.b64_json for item in again.data] == [item.b64_json for item in result.data]
    if os.environ.get("MLLM_TEST_ENGINE", "builtin") == "builtin":  # vLLM's sampler draws other (equally seeded) codes
        local = model.edit(scene, INSTRUCTION, n=2, seed=1, guidance_scale=2.0)
        assert [image.convert("RGB").tobytes() for image in images] == [image.tobytes() for image in local]
    other = client.images.edit(image=("scene.png", png, "image/png"), prompt=INSTRUCTION, n=2,
                               extra_body={"seed": 2, "guidance_scale": 2.0})
    assert [item.b64_json for item in other.data] != [item.b64_json for item in result.data]
    # the extra fields and `size`
    both = client.images.edit(image=("scene.png", png, "image/png"), prompt=INSTRUCTION, size="64x64",
                              extra_body={"seed": 1, "guidance": "both", "guidance_scale": 3.0,
                                          "decoding": "sequential"})
    assert _decoded(both.data[0].b64_json).size == (64, 64)
    if os.environ.get("MLLM_TEST_ENGINE", "builtin") == "builtin":  # both guidances at once: three rows an edit
        two = client.images.edit(image=("scene.png", png, "image/png"), prompt=INSTRUCTION, n=2,
                                 extra_body={"seed": 1, "guidance_scale": 2.0, "image_guidance_scale": 1.5})
        local = model.edit(scene, INSTRUCTION, n=2, seed=1, guidance_scale=2.0, image_guidance_scale=1.5)
        assert [_decoded(item.b64_json).convert("RGB").tobytes() for item in two.data] == \
            [image.tobytes() for image in local]
    else:
        import openai

        with pytest.raises(openai.BadRequestError, match="not served by the vLLM engine"):
            client.images.edit(image=("scene.png", png, "image/png"), prompt=INSTRUCTION,
                               extra_body={"guidance_scale": 2.0, "image_guidance_scale": 1.5})


@pytest.mark.skipif(os.environ.get("MLLM_TEST_ENGINE", "builtin") != "builtin",
                    reason="vLLM's sampler draws other (equally seeded) codes than MLLM.edit")
def test_an_edit_that_names_no_scale_gets_the_models_own(client, model, scene, monkeypatch):
    png = _png(scene)
    monkeypatch.setattr(model.model.config, "edit_guidance_scale", 1.0)  # e.g. a demo plan's measured best
    served = client.images.edit(image=("scene.png", png, "image/png"), prompt=INSTRUCTION, extra_body={"seed": 3})
    unguided = model.edit(scene, INSTRUCTION, seed=3, guidance_scale=1.0)
    guided = model.edit(scene, INSTRUCTION, seed=3, guidance_scale=1.5)
    got = _decoded(served.data[0].b64_json).convert("RGB").tobytes()
    assert got == unguided[0].tobytes() and got != guided[0].tobytes()


def test_the_openai_client_gets_typed_400s(client, scene):
    import openai

    png = _png(scene)
    upload = ("scene.png", png, "image/png")
    cases = [
        ({"image": ("bad.png", b"not an image at all", "image/png")}, "invalid_image"),
        ({"n": 100}, "invalid_value"),
        ({"image": [upload, ("b.png", png, "image/png")]}, "too_many_images"),
        ({"response_format": "url"}, "unsupported_value"),
        ({"mask": ("m.png", png, "image/png")}, "unsupported_parameter"),
        ({"extra_body": {"guidance": "image"}}, "invalid_value"),
        ({"extra_body": {"image_guidance_scale": -1}}, "invalid_value"),
    ]
    for change, code in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.edit(**{"image": upload, "prompt": INSTRUCTION, **change})
        assert caught.value.status_code == 400 and caught.value.code == code, (code, caught.value.body)
        assert caught.value.body["message"] and "\n" not in caught.value.body["message"]


# -------------------------------------------------------------------------------- raw multipart
def test_raw_multipart_and_json_edits(server, scene):
    png = _png(scene)
    response = _edit(server, files={"image": ("scene.png", png, "image/png")},
                     data={"prompt": INSTRUCTION, "n": "3", "seed": "4", "decoding": "sequential"})
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 3
    assert all(set(item) == {"b64_json"} for item in body["data"])
    # The same request as JSON, the image as a data: URL: the same edits.
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    as_json = httpx.post(f"{server.url}/v1/images/edits", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                         json={"image": data_url, "prompt": INSTRUCTION, "n": 3, "seed": 4, "decoding": "sequential"})
    assert as_json.status_code == 200 and as_json.json()["data"] == body["data"]
    openai_json = httpx.post(f"{server.url}/v1/images/edits", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                             json={"images": [{"image_url": data_url}], "prompt": INSTRUCTION, "n": 3, "seed": 4,
                                   "decoding": "sequential"})
    assert openai_json.status_code == 200 and openai_json.json()["data"] == body["data"]


def test_raw_multipart_mistakes_are_one_line_4xx(server, scene):
    png = _png(scene)
    image = {"image": ("scene.png", png, "image/png")}
    cases = [
        (image, {"n": "2"}, 400, "prompt", "missing_required_parameter"),
        ({"prompt": (None, INSTRUCTION)}, None, 400, "image", "missing_required_parameter"),  # multipart, no file
        (image, {"prompt": "   "}, 400, "prompt", "invalid_value"),
        (image, {"prompt": INSTRUCTION, "n": "two"}, 400, "n", "invalid_type"),
        (image, {"prompt": INSTRUCTION, "n": "9"}, 400, "n", "invalid_value"),
        (image, {"prompt": INSTRUCTION, "seed": "1.5"}, 400, "seed", "invalid_type"),
        (image, {"prompt": INSTRUCTION, "guidance_scale": "nan"}, 400, "guidance_scale", "invalid_value"),
        (image, {"prompt": INSTRUCTION, "decoding": "fast"}, 400, "decoding", "invalid_value"),
        (image, {"prompt": INSTRUCTION, "size": "8x8", "n": "8"}, 200, None, None),
        (image, {"prompt": INSTRUCTION, "size": "4096x4096", "n": "8"}, 400, "size", "invalid_value"),
        (image, {"prompt": INSTRUCTION, "stream": "true"}, 400, "stream", "unsupported_parameter"),
        (image, {"prompt": INSTRUCTION, "output_format": "jpeg"}, 400, "output_format", "unsupported_value"),
        (image, {"prompt": "x" * 200_001}, 400, "prompt", "context_length_exceeded"),
        ([("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))], {"prompt": INSTRUCTION},
         400, "image", "too_many_images"),
        ([("image[]", ("a.png", png, "image/png"))] * 12, {"prompt": INSTRUCTION}, 400, "image", "too_many_images"),
        ({"image": ("bad.png", png[: len(png) // 2], "image/png")}, {"prompt": INSTRUCTION}, 400, "image",
         "invalid_image"),
        ({"other": ("x.png", png, "image/png")}, {"prompt": INSTRUCTION}, 400, "other", "invalid_value"),
    ]
    for files, data, status, param, code in cases:
        response = _edit(server, files=files, data=data)
        if status == 200:
            assert response.status_code == 200 and len(response.json()["data"]) == 8, response.text[:300]
            continue
        error = _error(response, status)
        assert (error["param"], error["code"]) == (param, code), (data, error)
    # a field twice, a broken body, no key
    twice = _edit(server, files=[("prompt", (None, "a")), ("prompt", (None, "b")), ("image", ("a.png", png))])
    assert _error(twice, 400)["param"] == "prompt"
    broken = httpx.post(f"{server.url}/v1/images/edits", content=b"--x\r\nnot a form", timeout=60,
                        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=x"})
    assert _error(broken, 400)["code"] == "invalid_multipart"
    assert _error(httpx.post(f"{server.url}/v1/images/edits", files=image, data={"prompt": INSTRUCTION}), 401)


def test_edit_images_are_judged_from_their_header_and_admitted_before_decoding(server, scene, decodes):
    from serve.engine import QueueFull

    huge = _edit(server, files={"image": ("huge.png", _png_claiming(5000, 5000), "image/png")},
                 data={"prompt": INSTRUCTION})
    assert _error(huge, 413)["code"] == "image_too_large" and decodes == []
    engine = server.app.state.engine
    slots = []
    try:
        while True:
            try:
                slots.append(engine.reserve())
            except QueueFull:
                break
        busy = _edit(server, files={"image": ("scene.png", _png(scene), "image/png")}, data={"prompt": INSTRUCTION})
        assert _error(busy, 429)["code"] == "queue_full" and decodes == []
    finally:
        for slot in slots:
            slot.release()
    ok = _edit(server, files={"image": ("scene.png", _png(scene), "image/png")}, data={"prompt": INSTRUCTION})
    assert ok.status_code == 200 and len(decodes) == 1


def test_form_bodies_only_on_the_edits_endpoint_and_only_from_this_origin(server, scene):
    files, data = {"image": ("scene.png", _png(scene), "image/png")}, {"prompt": INSTRUCTION}
    # a web page of another origin posting a form (no preflight needed for multipart): refused
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": f"http://localhost:{server.port}"}):
        assert _error(_edit(server, files, data, **headers), 403)["code"] == "cross_origin", headers
    # this server's own page
    same = _edit(server, files, data, Origin=server.url, **{"Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200
    # every other endpoint still takes JSON only; a text body on the edits endpoint is a 415 naming both forms
    chat = httpx.post(f"{server.url}/v1/chat/completions", files=files, data=data, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})
    assert _error(chat, 415)["code"] == "unsupported_media_type"
    text = httpx.post(f"{server.url}/v1/images/edits", content=b"prompt=x", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"})
    assert "multipart/form-data" in _error(text, 415)["message"]


def test_edit_jobs_share_one_pass_and_keep_their_seeds(model, scene):
    from serve.engine import EditJob, Engine

    engine = Engine(model, max_batch=8, batch_window_s=0.2)
    try:
        first = EditJob(scene, INSTRUCTION, n=2, seed=5, guidance_scale=2.0, decoding="sequential")
        second = EditJob(scene, "remove the square", n=1, seed=9, guidance_scale=2.0, decoding="sequential")
        other = EditJob(scene, INSTRUCTION, n=1, seed=5, guidance_scale=2.0, guidance="both", decoding="sequential")
        for job in (first, second, other):
            engine.submit(job)
        for job in (first, second, other):
            assert job.done.wait(120) and job.error is None
        assert engine.stats["batches"] == 2 and engine.stats["max_batch"] == 3  # another guidance: its own pass
        alone = model.edit(scene, INSTRUCTION, n=2, seed=5, guidance_scale=2.0, decoding="sequential")
        assert [image.tobytes() for image in first.result] == [image.tobytes() for image in alone]
        assert len(second.result) == 1 and len(other.result) == 1
    finally:
        engine.close()


# ------------------------------------------------------------------------ several images per message
def _data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(image)).decode()


def test_several_images_reach_the_model_in_order(server, model, client):
    """Two images in one user message (and images over several messages) arrive as image parts, in the
    order sent, and each costs its image tokens in the prompt."""
    side = model.model.vision_tokenizer.image_size
    red, blue, green = (Image.new("RGB", (side, side), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0)))
    engine = server.app.state.engine
    seen = []
    real_put = engine._put

    def spy(job):
        seen.append(job)
        real_put(job)

    engine._put = spy
    try:
        def part(image):
            return {"type": "image_url", "image_url": {"url": _data_url(image)}}

        one = client.chat.completions.create(model="tiny", max_tokens=1, temperature=0, messages=[
            {"role": "user", "content": [part(red), {"type": "text", "text": "Compare the images."}]}])
        two = client.chat.completions.create(model="tiny", max_tokens=1, temperature=0, messages=[
            {"role": "user", "content": [part(red), part(blue), {"type": "text", "text": "Compare the images."}]}])
        spread = client.chat.completions.create(model="tiny", max_tokens=1, temperature=0, messages=[
            {"role": "user", "content": [part(green), {"type": "text", "text": "Compare the images."}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [part(red), part(blue), {"type": "text", "text": "and these?"}]}])
    finally:
        del engine._put

    def colours(message):
        return [part["image"].getpixel((side // 2, side // 2)) for part in message["content"]
                if part["type"] == "image"]

    message = seen[1].messages[0]
    assert [part["type"] for part in message["content"]] == ["image", "image", "text"]
    assert colours(message) == [(255, 0, 0), (0, 0, 255)]
    assert [colours(m) for m in seen[2].messages] == [[(0, 255, 0)], [], [(255, 0, 0), (0, 0, 255)]]
    processor = model.model.processor

    def prompt_tokens(messages) -> int:
        return int(processor(messages, add_generation_prompt=True)["attention_mask"].sum())

    assert [one.usage.prompt_tokens, two.usage.prompt_tokens, spread.usage.prompt_tokens] == [
        prompt_tokens(job.messages) for job in seen]
    per_image = model.model.config.image_tokens_per_image + 2  # <|boi|>, the codes, <|eoi|>
    assert two.usage.prompt_tokens - one.usage.prompt_tokens >= per_image
    assert spread.usage.prompt_tokens - two.usage.prompt_tokens >= per_image
