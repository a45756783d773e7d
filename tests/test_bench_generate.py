"""scripts/bench_generate.py: its --quick path on a tiny model runs every available method, counts the
sequential forward passes each makes and reports positive timings; the Janus peer and --llama-100m have the
sizes the docstring gives."""

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_generate.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as `python scripts/bench_generate.py` has it: scripts/perf.py
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # --threads 1 below must not change the other tests' setting


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from mllm.init import init_model

    return init_model("tiny", "tiny", tmp_path_factory.mktemp("bench_generate") / "model", seed=0)


def _quick(bench, model_dir, *extra: str) -> dict:
    # One thread: on a busy 2-core machine two OpenMP threads can stall a tiny model's step for a second.
    return bench.main(["--model", str(model_dir), "--device", "cpu", "--quick", "--bandwidth-mib", "16",
                       "--threads", "1", *extra])


def _api() -> set[str]:
    from mllm.generation import generate_images

    return set(inspect.signature(generate_images).parameters)


def test_quick_runs_every_available_method_and_counts_its_forwards(bench, tiny_model_dir, capsys):
    summary = _quick(bench, tiny_model_dir)
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(summary))  # the last line is the JSON summary
    assert any(line.startswith("| method | batch | forwards / image |") for line in out)

    steps = summary["tokens_per_image"]
    rows = {r["method"]: r for r in summary["results"]}
    expected = {"generate", "sequential"}
    expected |= {"janus"} if bench.unsupported("janus") is None else set()
    expected |= {"static"} if "cache" in _api() else set()
    expected |= {"jacobi"} if "decoding" in _api() else set()
    assert set(rows) == expected, summary["notes"]
    assert all(r["batch_size"] == 1 for r in rows.values())  # --quick: batch 1 only
    # transformers' unbatched CFG runs the unconditional branch as a second forward per token.
    assert rows["generate"]["forwards_per_image"] == 2 * steps
    if "janus" in rows:
        assert rows["janus"]["forwards_per_image"] == steps  # Janus batches its CFG rows: one forward a token
    assert rows["sequential"]["forwards_per_image"] == steps  # prefill + h*w - 1 decode steps
    if "static" in rows:
        assert rows["static"]["forwards_per_image"] == steps
    if "jacobi" in rows:
        assert 1 <= rows["jacobi"]["forwards_per_image"] <= steps
    for row in rows.values():
        for key in ("seconds", "ms_per_image", "images_per_s", "ms_per_forward", "fraction_of_bandwidth_bound"):
            assert row[key] > 0, (row["method"], key)
        assert row["ms_per_forward"] == pytest.approx(1000 * row["seconds"] / row["forwards_per_image"])
        assert row["speedup_vs_generate"] == pytest.approx(rows["generate"]["seconds"] / row["seconds"])
        assert row["speedup_vs_sequential"] == pytest.approx(rows["sequential"]["seconds"] / row["seconds"])


def test_without_guidance_generate_makes_one_forward_per_token_and_janus_is_skipped(bench, tiny_model_dir):
    summary = _quick(bench, tiny_model_dir, "--guidance", "1", "--methods", "generate", "janus", "sequential")
    steps = summary["tokens_per_image"]
    rows = {r["method"]: r for r in summary["results"]}
    assert set(rows) == {"generate", "sequential"}
    assert rows["generate"]["forwards_per_image"] == steps
    assert rows["sequential"]["forwards_per_image"] == steps
    assert any(note.startswith("janus: skipped") for note in summary["notes"])


@pytest.mark.parametrize(("version", "runs"), [("5.17.0", False), ("5.18.0", True), ("5.25.0.dev0", True),
                                               ("6.0.0", True)])
def test_janus_is_skipped_with_a_reason_where_transformers_image_generate_is_broken(bench, monkeypatch,
                                                                                     version, runs):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    reason = bench.unsupported("janus")
    assert (reason is None) == runs
    if not runs:
        assert version in reason and "transformers>=5.18" in reason


def test_the_janus_peer_has_our_llm_size_image_tokens_and_codebook(bench, tiny_model_dir):
    from mllm.model import UnifiedMLLM

    model = UnifiedMLLM.from_pretrained(tiny_model_dir)
    janus = bench.build_janus(model)
    ours, theirs = model.llm.config, janus.model.language_model.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size"):
        assert getattr(theirs, key) == getattr(ours, key), key
    assert janus.config.vision_config.num_image_tokens == model.config.image_tokens_per_image
    assert janus.model.generation_head.vision_head.out_features == model.config.codebook_size
    assert theirs._attn_implementation == ours._attn_implementation
    layers = janus.model.language_model.layers
    assert sum(p.numel() for p in layers.parameters()) == sum(p.numel() for p in model.llm.model.layers.parameters())


def test_llama_100m_has_at_least_100m_parameters_without_its_embeddings(bench):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # sizes only: no memory, no initialisation
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=1600, tie_word_embeddings=False, **bench.LLAMA_100M))
    body = sum(p.numel() for name, p in llm.named_parameters() if "embed_tokens" not in name and "lm_head" not in name)
    assert body >= 100e6


@pytest.mark.slow
def test_llama_100m_quick_run(bench):
    summary = bench.main(["--llama-100m", "--device", "cpu", "--quick", "--bandwidth-mib", "64",
                          "--methods", "sequential", "--threads", "1"])
    assert summary["llm_parameters"] >= 100e6 and summary["dtype"] == "bfloat16"
    assert summary["results"][0]["forwards_per_image"] == summary["tokens_per_image"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/device_check.sh runs it there)")
def test_quick_on_cuda_in_bf16_counts_the_same_forwards(bench, tiny_model_dir):
    summary = bench.main(["--model", str(tiny_model_dir), "--device", "cuda", "--dtype", "bf16", "--quick"])
    steps = summary["tokens_per_image"]
    rows = {r["method"]: r for r in summary["results"]}
    assert summary["device"].startswith("cuda") and summary["dtype"] == "bfloat16"
    assert rows["generate"]["forwards_per_image"] == 2 * steps
    assert rows["sequential"]["forwards_per_image"] == steps
    if bench.unsupported("janus") is None:
        assert rows["janus"]["forwards_per_image"] == steps
    assert all(r["seconds"] > 0 for r in rows.values())
