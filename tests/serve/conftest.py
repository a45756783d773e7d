"""`MLLM_TEST_ENGINE=vllm` (what `make test-vllm` sets): the HTTP suites of this folder (test_api,
test_edits, test_hardening) run against `serve.vllm_engine.VLLMEngine` instead of the built-in engine.

Every app those tests build with `create_app(model=...)` or `create_app(model_dir)` then gets a vLLM engine
on the same folder (one engine per folder and queue size, kept for the session: vLLM starts in seconds,
not milliseconds). The tiny LLM gets a head dimension of 32 (vLLM's CPU attention refuses 16). Tests that
check the built-in engine's own workings (its decoding methods, its worker internals, its exact sampler)
carry `@pytest.mark.builtin_engine` and are skipped then."""

from __future__ import annotations

import os

import pytest

ENGINE = os.environ.get("MLLM_TEST_ENGINE", "builtin")
VLLM_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "max_position_embeddings": 512, "text_vocab_size": 256}
HTTP_SUITES = ("test_api.py", "test_edits.py", "test_hardening.py")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "builtin_engine: checks the built-in engine's own workings")


def pytest_collection_modifyitems(config, items) -> None:
    if ENGINE != "vllm":
        return
    skip = pytest.mark.skip(reason="MLLM_TEST_ENGINE=vllm: checks the built-in engine's own workings")
    for item in items:
        if "builtin_engine" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _vllm_engine_for_http_suites(request):
    if ENGINE != "vllm":
        yield
        return
    pytest.importorskip("vllm", reason="MLLM_TEST_ENGINE=vllm needs vLLM (make test-vllm)")
    import mllm
    import serve.app
    from mllm.config import LLM_SIZES
    from serve.vllm_engine import VLLMEngine, load_shell

    saved_size, saved_load, saved_create = LLM_SIZES["tiny"], mllm.load, serve.app.create_app
    LLM_SIZES["tiny"] = VLLM_TINY
    engines: dict[tuple, VLLMEngine] = {}

    def load(path, *args, **kwargs):
        model = saved_load(path, *args, **kwargs)
        model._vllm_folder = str(path)  # where vLLM finds llm/
        return model

    def create_app(model_dir=None, *, model=None, **kwargs):
        folder = str(model_dir or model._vllm_folder)
        key = (folder, kwargs.get("queue_size", 64), kwargs.get("default_max_tokens", 256))
        if key not in engines:
            engine = VLLMEngine(load_shell(folder), dtype="float32", kv_cache_gib=0.25, max_num_seqs=32,
                                queue_size=key[1], default_max_tokens=key[2])
            engine.close_for_good, engine.close = engine.close, lambda: None  # kept across apps
            engines[key] = engine
        kwargs = {k: v for k, v in kwargs.items() if k not in ("device", "adapter", "max_batch", "batch_window_s")}
        return saved_create(model_dir, engine=engines[key], **kwargs)

    mllm.load, serve.app.create_app = load, create_app
    try:
        yield
    finally:
        mllm.load, serve.app.create_app, LLM_SIZES["tiny"] = saved_load, saved_create, saved_size
        for engine in engines.values():
            engine.close_for_good()
