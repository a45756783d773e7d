"""scripts/load_test.py: its option checks, and a few seconds of load through a real `mllm serve` process."""

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("load_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_only_loopback_urls_are_accepted(harness):
    assert harness.loopback_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert harness.loopback_url("http://[::1]:9000") == "http://[::1]:9000"
    for url in ("http://example.com:8000", "http://localhost:8000", "http://10.0.0.1:8000", "http://127.0.0.2:80",
                "https://127.0.0.1:8000", "http://127.0.0.1:8000/v1", "http://user@127.0.0.1:8000",
                "http://127.0.0.1:99999", "ftp://127.0.0.1:21"):
        with pytest.raises(argparse.ArgumentTypeError):
            harness.loopback_url(url)
    with pytest.raises(SystemExit):
        harness.build_parser().parse_args(["--url", "http://192.168.1.1:8000"])


def test_mix_weights_and_percentiles(harness):
    mix = harness.parse_mix("bad=0, draw=2.5")
    assert mix["bad"] == 0 and mix["draw"] == 2.5 and mix["chat"] == harness.DEFAULT_MIX["chat"]
    for text in ("nope=1", "chat", "chat=x", "chat=-1", ",".join(f"{k}=0" for k in harness.MIX_KINDS)):
        with pytest.raises(argparse.ArgumentTypeError):
            harness.parse_mix(text)
    assert harness.percentile([], 50) is None
    assert harness.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert harness.percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert harness.judge(harness.Record(kind="burst", status=429)) == "ok"
    assert harness.judge(harness.Record(kind="chat", status=429)) == "lost"
    assert harness.judge(harness.Record(kind="chat", status=200, error="invalid_body")) == "lost"
    assert harness.judge(harness.Record(kind="bad", status=200)) == "unexpected"
    assert harness.judge(harness.Record(kind="oversized", status=400)) == "unexpected"


def test_a_short_run_against_a_tiny_model(harness, tmp_path, capsys):
    from mllm.init import init_model

    model = init_model("tiny", "tiny", tmp_path / "model", seed=0)
    out = tmp_path / "report.json"
    # bad=12: enough bad requests in 5 s that every variant (taken in turn) is sent at least once.
    code = harness.main(["--model", str(model), "--device", "cpu", "--clients", "4", "--seconds", "5",
                         "--queue-size", "8", "--burst-size", "24", "--mix", "bad=12", "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    kinds, totals = report["kinds"], report["totals"]

    assert set(kinds) == set(harness.KINDS)
    for kind, entry in kinds.items():
        assert entry["requests"] > 0, kind
        assert entry["ok"] + entry["lost"] + entry["unexpected"] == entry["requests"], kind
    for kind in ("chat", "image_chat", "stream", "draw", "slow_body", "disconnect"):
        entry = kinds[kind]
        assert entry["ok"] == entry["requests"] and entry["final_status"] == {"200": entry["requests"]}, (kind, entry)
        latency = entry["latency_s"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"], (kind, latency)
        assert entry["throughput_rps"] > 0
    assert kinds["stream"]["ttft_s"]["p50"] > 0
    assert kinds["oversized"]["final_status"] == {"413": kinds["oversized"]["requests"]}
    assert set(kinds["burst"]["final_status"]) <= {"200", "429"} and totals["burst_429"] > 0
    assert totals["5xx"] == 0 and totals["lost_good_requests"] == 0
    assert not any(key.startswith("5") for key in report["responses_by_status"])
    assert report["small_chat_p99_s"] == kinds["chat"]["latency_s"]["p99"]
    assert report["duration_s"] >= 5 and report["config"]["clients"] == 4

    rss = report["rss"]
    assert rss["available"] and rss["samples"] >= 5
    assert 0 < rss["start_mb"] <= rss["peak_mb"] and 0 < rss["end_mb"] <= rss["peak_mb"]
    assert rss["peak_minus_start_mb"] == pytest.approx(rss["peak_mb"] - rss["start_mb"], abs=0.11)
    assert rss["growth_mb"] == pytest.approx(rss["end_mb"] - rss["start_mb"], abs=0.11)
    # It stopped the server it started, gracefully.
    assert report["server"]["started_by_harness"] and report["server"]["stopped_with"] == "SIGINT"
    assert not os.path.exists(f"/proc/{rss['pid']}")

    assert "small chat under load: p99" in printed and ("PASS" in printed or "FAIL" in printed)
    assert code == (0 if report["passed"] else 1)

    bad = kinds["bad"]["variants"]  # taken in turn: the first ones of BAD_VARIANTS, all of them in a long enough run
    assert set(bad) == set(harness.BAD_VARIANTS[:kinds["bad"]["requests"]])
    not_4xx = {variant: entry["final_status"] for variant, entry in bad.items()
               if any(not status.startswith("4") for status in entry["final_status"])}
    assert not not_4xx, not_4xx
    assert totals["unexpected_answers"] == 0 and report["passed"] and code == 0, report["failures"]
