"""End-to-end test of the web chat page (`serve/static/`) in headless Chromium, driven with Selenium.

The server runs in-process (uvicorn in a thread, 127.0.0.1, a free port) on a tiny random model. Chromium and
chromedriver come from Debian's `chromium` / `chromium-driver` packages and `selenium` from PyPI; when they are
missing the `browser` fixture installs them (apt-get, with sudo when not root; pip into this interpreter) and
skips the test with the reason when that is impossible (no network, no permissions).
"""

import base64
import contextlib
import importlib
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
API_KEY = "sk-web-test"
WAIT_S = 90  # one model reply on CPU; generous


# ---------------------------------------------------------------------------------------------- install


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(cmd, 1, "", f"{type(exc).__name__}: {exc}")


def _tail(proc: subprocess.CompletedProcess, n: int = 400) -> str:
    return (proc.stderr or proc.stdout or "").strip()[-n:]


def _find_browser() -> tuple[str | None, str | None]:
    browser = next((path for name in BROWSER_NAMES if (path := shutil.which(name))), None)
    return browser, shutil.which("chromedriver")


def ensure_chromium() -> tuple[str, str]:
    """(browser, chromedriver) paths, installing Debian's chromium + chromium-driver when missing."""
    browser, driver = _find_browser()
    if browser and driver:
        return browser, driver
    if not shutil.which("apt-get"):
        pytest.skip("chromium/chromedriver not on PATH and no apt-get to install them")
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") and _run(["sudo", "-n", "true"], 30).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        pytest.skip("chromium/chromedriver not on PATH; installing them needs root or passwordless sudo")
    install = [*prefix, "apt-get", "install", "-y", "chromium", "chromium-driver"]
    proc = _run(install, 900)
    if proc.returncode != 0:  # stale package lists: refresh once and retry
        update = _run([*prefix, "apt-get", "update"], 600)
        proc = _run(install, 900)
        if proc.returncode != 0:
            pytest.skip(f"could not install chromium: {_tail(proc)} (apt-get update: {_tail(update, 200)})")
    browser, driver = _find_browser()
    if not (browser and driver):
        pytest.skip("apt-get installed chromium but chromium/chromedriver are still not on PATH")
    return browser, driver


def ensure_selenium():
    if importlib.util.find_spec("selenium") is not None:
        return importlib.import_module("selenium.webdriver")
    proc = _run([sys.executable, "-m", "pip", "install", "--quiet", "selenium"], 600)
    if proc.returncode != 0:
        pytest.skip(f"selenium is not installed and pip could not install it: {_tail(proc)}")
    importlib.invalidate_caches()
    try:
        return importlib.import_module("selenium.webdriver")
    except ImportError as exc:
        pytest.skip(f"selenium installed but not importable: {exc}")


# ---------------------------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serve(app):
    """Run an ASGI app with uvicorn in a daemon thread; yield its base URL."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="web-page-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # the app may load the model at startup
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _real_create_app():
    """`serve.app.create_app`, or None while serve/app.py does not exist yet (then the stand-in is used). An
    app module that exists but fails to import fails the test: the stand-in never hides a broken app."""
    if importlib.util.find_spec("serve.app") is None:
        return None
    return importlib.import_module("serve.app").create_app


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    create_app = _real_create_app()
    if create_app is not None:
        from mllm.init import init_model

        model_dir = init_model("tiny", "tiny", tmp_path_factory.mktemp("web") / "m", seed=0)
        app = create_app(str(model_dir), api_key=API_KEY, device="cpu")
    else:
        app = _stand_in_app()  # serve.app not written yet: canned answers, same routes and shapes
    with _serve(app) as url:
        request = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            model_id = json.load(response)["data"][0]["id"]
        yield url, model_id


# ---------------------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser():
    browser_path, driver_path = ensure_chromium()
    webdriver = ensure_selenium()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,900",
        "--disable-extensions",
        "--no-first-run",
    ):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except Exception as exc:  # noqa: BLE001 - a broken browser install is a skip, not a failure
        pytest.skip(f"could not start headless chromium: {exc}")
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _png_file(path: Path, colour: str = "blue") -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 56, 56), fill=colour)
    image.save(path)
    return path


# ---------------------------------------------------------------------------------------------- the test


def test_web_chat_page(browser, server, tmp_path):
    server_url, model_id = server
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1)

    def bubbles(kind: str):
        return driver.find_elements(By.CSS_SELECTOR, f"#messages .{kind}")

    def idle(_driver) -> bool:  # the page clears data-busy when a request is over
        return driver.find_element(By.ID, "messages").get_attribute("data-busy") != "true"

    def send(text: str) -> None:
        n = len(bubbles("assistant")) + len(bubbles("error"))
        box = driver.find_element(By.ID, "input")
        box.clear()
        box.send_keys(text)
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: idle(d) and len(bubbles("assistant")) + len(bubbles("error")) > n)

    driver.get(server_url + "/")
    # record the bodies of the chat requests the page sends
    driver.execute_script(
        "window.__sent = []; window.__edits = []; const fetch0 = window.fetch;"
        "window.fetch = (url, opts) => {"
        "  if (String(url).endsWith('/chat/completions')) window.__sent.push(opts.body);"
        "  if (String(url).endsWith('/images/edits')) window.__edits.push(opts.body);"
        "  return fetch0(url, opts); };"
    )
    key = driver.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(API_KEY)
    key.send_keys(Keys.TAB)  # change event: the page stores the key and reloads the model list
    wait.until(lambda d: d.find_element(By.ID, "model-name").get_attribute("data-state") == "ok")
    assert driver.find_element(By.ID, "model-name").text.strip() == model_id

    for field, value in (("max-tokens", "24"), ("temperature", "0")):  # short, greedy replies on CPU
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)

    # 1. a streamed text turn (stream is on by default): a user bubble, then an assistant bubble with text
    stream = driver.find_element(By.ID, "stream-toggle")
    assert stream.is_selected()
    send("hello there")
    assert not bubbles("error"), bubbles("error")[0].text
    assert bubbles("user")[-1].text.strip() == "hello there"
    assert bubbles("assistant")[-1].text.strip() or bubbles("assistant")[-1].find_elements(By.TAG_NAME, "img")

    # 2. attach an image (thumbnail shown), ask about it without streaming; the user bubble shows the image
    stream.click()
    assert not stream.is_selected()
    driver.find_element(By.ID, "attach").send_keys(str(_png_file(tmp_path / "blue.png")))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
    send("What colour is the circle?")
    assert not bubbles("error"), bubbles("error")[0].text
    user_img = bubbles("user")[-1].find_elements(By.TAG_NAME, "img")
    assert user_img and user_img[0].get_attribute("src").startswith("data:image/png;base64,")
    assert not driver.find_elements(By.CSS_SELECTOR, "#attachments img")  # sent, so cleared

    # 2b. several images in one message (the file input takes several): two thumbnails, then one user
    # message with both images, in the order picked, before the text
    pair = [_png_file(tmp_path / "first.png", "red"), _png_file(tmp_path / "second.png", "green")]
    driver.find_element(By.ID, "attach").send_keys("\n".join(str(path) for path in pair))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments img")) == 2)
    send("What differs between the two images?")
    assert not bubbles("error"), bubbles("error")[0].text
    assert len(bubbles("user")[-1].find_elements(By.TAG_NAME, "img")) == 2
    content = json.loads(driver.execute_script("return window.__sent.at(-1)"))["messages"][-1]["content"]
    assert [part["type"] for part in content] == ["image_url", "image_url", "text"]
    expected = ["data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() for path in pair]
    assert [part["image_url"]["url"] for part in content[:2]] == expected

    # 3. draw: the prompt goes to /v1/images/generations and the picture appears in the assistant bubble
    draw = driver.find_element(By.ID, "draw-toggle")
    if not draw.is_selected():
        draw.click()
    send("a red circle")
    assert not bubbles("error"), bubbles("error")[0].text
    images = bubbles("assistant")[-1].find_elements(By.TAG_NAME, "img")
    assert images, bubbles("assistant")[-1].get_attribute("innerHTML")[:300]
    src = images[0].get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    wait.until(
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", images[0])
    )

    # 3b. draw mode with one image attached: the text edits it (/v1/images/edits); the edit is an image reply
    driver.find_element(By.ID, "attach").send_keys(str(pair[0]))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
    assert "edit" in driver.find_element(By.ID, "input").get_attribute("placeholder")
    send("make the circle blue")
    assert not bubbles("error"), bubbles("error")[0].text
    edit_body = json.loads(driver.execute_script("return window.__edits.at(-1)"))
    assert edit_body["prompt"] == "make the circle blue" and edit_body["image"] == expected[0]
    edited = bubbles("assistant")[-1].find_elements(By.TAG_NAME, "img")
    assert edited and edited[0].get_attribute("src").startswith("data:image/png;base64,")
    assert len(bubbles("user")[-1].find_elements(By.TAG_NAME, "img")) == 1
    assert not driver.find_elements(By.CSS_SELECTOR, "#attachments img")
    draw.click()  # back to chat

    # 4. the next chat turn sends the whole conversation, the drawing as markdown in the assistant turn
    send("describe it")
    assert not bubbles("error"), bubbles("error")[0].text
    body = json.loads(driver.execute_script("return window.__sent.at(-1)"))
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant"] * 5 + ["user"], roles
    assert isinstance(body["messages"][1]["content"], str)  # replies go back as the text the server sent
    assert "](data:image/png;base64," in body["messages"][7]["content"]
    # the edit turn: the image and the instruction, then the edited image as markdown
    assert [part["type"] for part in body["messages"][8]["content"]] == ["image_url", "text"]
    assert "](data:image/png;base64," in body["messages"][9]["content"]
    image_parts = [p for p in body["messages"][2]["content"] if p["type"] == "image_url"]
    assert image_parts and image_parts[0]["image_url"]["url"].startswith("data:image/png;base64,")

    # 5. a request the API refuses (a wrong key): an inline .error bubble, no alert()
    key = driver.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys("sk-wrong")
    key.send_keys(Keys.TAB)
    send("this one is refused")
    errors = bubbles("error")
    assert errors and "key" in errors[-1].text.lower(), [e.text for e in errors]
    assert driver.execute_script("return document.querySelectorAll('[role=alert]').length") == len(errors)
    with pytest.raises(NoAlertPresentException):  # inline, not window.alert()
        driver.switch_to.alert.text  # noqa: B018

    # 6. reset clears the conversation
    driver.find_element(By.ID, "reset").click()
    wait.until(lambda d: not bubbles("assistant") and not bubbles("user") and not bubbles("error"))


# ---------------------------------------------------------------------------------------------- stand-in
# STAND-IN, used only while `serve.app.create_app` does not exist yet (it is being written in parallel): the
# three endpoints with canned responses in the OpenAI shapes, and the static page, so the page and the
# Selenium harness can be exercised. The real app replaces it automatically once it imports.


def _stand_in_app():
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles

    static = Path(__file__).resolve().parents[2] / "serve" / "static"
    app = FastAPI()
    app.mount("/static", StaticFiles(directory=static), name="static")

    def png_b64(color: str) -> str:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    def refuse(status: int, message: str, kind: str, code: str | None = None):
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return JSONResponse(body, status_code=status)

    def authorized(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {API_KEY}"

    @app.get("/")
    def index():
        return FileResponse(static / "index.html")

    @app.get("/v1/models")
    def models(request: Request):
        if not authorized(request):
            return refuse(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        return {"object": "list", "data": [{"id": "stand-in-tiny", "object": "model", "owned_by": "mllm"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if not authorized(request):
            return refuse(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        body = await request.json()
        last = body["messages"][-1]["content"]
        parts = last if isinstance(last, list) else [{"type": "text", "text": last}]
        n_images = sum(part.get("type") == "image_url" for part in parts)
        text = f"I see {n_images} image(s) and {len(body['messages'])} message(s)."
        if not body.get("stream"):
            return {
                "id": "chatcmpl-0",
                "object": "chat.completion",
                "created": 0,
                "model": "stand-in-tiny",
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }

        def events():
            head = {
                "id": "chatcmpl-0",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "stand-in-tiny",
            }
            yield (
                "data: "
                + json.dumps({**head, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
                + "\n\n"
            )
            for word in text.split(" "):
                chunk = {**head, "choices": [{"index": 0, "delta": {"content": word + " "}}]}
                yield "data: " + json.dumps(chunk) + "\n\n"
                time.sleep(0.02)
            done = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield "data: " + json.dumps(done) + "\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/images/generations")
    async def images(request: Request):
        if not authorized(request):
            return refuse(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        body = await request.json()
        n = int(body.get("n", 1))
        return {"created": 0, "data": [{"b64_json": png_b64("red")} for _ in range(n)]}

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        if not authorized(request):
            return refuse(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        body = await request.json()
        n = int(body.get("n", 1))
        return {"created": 0, "data": [{"b64_json": png_b64("blue")} for _ in range(n)]}

    return app
