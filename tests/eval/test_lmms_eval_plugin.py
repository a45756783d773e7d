"""lmms-eval support (eval/lmms_eval_plugin, docs/lmms-eval.md).

The export and the task hooks need no lmms-eval and run everywhere. The rest needs lmms-eval, which lives in
`.venv-lmms` (`make test-lmms-eval`), and is skipped without it: our model as lmms-eval's `mllm` model, run
by the `lmms-eval` command offline on exported shapes-vqa items (its predictions are `mllm eval`'s and its
score is our scorer's), lmms-eval's own `openai_compatible` model against `mllm serve`, and lmms-eval's
aggregation of our hooks on scripted replies with a score that is not 0.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.lmms_eval_plugin import export as lmms_export
from eval.lmms_eval_plugin.tasks import utils as hooks
from eval.suites import ScoreContext, get_suite

LIMIT = 10  # shapes-vqa items run through lmms-eval
BATCH = 5
NEEDS_LMMS = "lmms-eval is not installed here; `make test-lmms-eval` runs these tests in .venv-lmms"


@pytest.fixture(scope="module")
def lmms_eval():
    return pytest.importorskip("lmms_eval", reason=NEEDS_LMMS)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from mllm.init import init_model

    return init_model("tiny", "tiny", tmp_path_factory.mktemp("lmms") / "model", seed=0)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms-tasks")
    lmms_export.export_tasks(out, limit=LIMIT)
    return out


@pytest.fixture(scope="module")
def mllm_eval_predictions(tiny_model, tmp_path_factory):
    """`mllm eval --suite shapes-vqa --limit LIMIT --batch-size BATCH` on the tiny model: {id: answer}."""
    from eval import runner

    out = tmp_path_factory.mktemp("mllm-eval")
    runner.evaluate(runner.EvalSettings(suite="shapes-vqa", out=out, model=str(tiny_model), limit=LIMIT,
                                        batch_size=BATCH, progress=False))
    return {key: record["answer"] for key, record in runner.read_predictions(out / "predictions.jsonl").items()}


def _read_parquet(path: Path) -> list[dict]:
    import datasets

    return list(datasets.Dataset.from_parquet(str(path), cache_dir=str(path.parent / ".cache")))


# ---------------------------------------------------------------------------------------- export and hooks
def test_export_writes_the_suites_items_in_order_with_their_images(tasks_dir):
    vqa_items = get_suite("shapes-vqa").load_items(None, LIMIT)
    rows = _read_parquet(tasks_dir / "shapes_vqa.parquet")
    assert [row["id"] for row in rows] == [item.id for item in vqa_items]
    assert [row["question"] for row in rows] == [item.prompt for item in vqa_items]
    assert [(row["answer"], row["type"]) for row in rows] == [(item.meta["answer"], item.meta["type"])
                                                              for item in vqa_items]
    assert rows[0]["image"].tobytes() == vqa_items[0].image.convert("RGB").tobytes()  # PNG: lossless

    caption_items = get_suite("shapes-caption").load_items(None, LIMIT)
    rows = _read_parquet(tasks_dir / "shapes_caption.parquet")
    assert [row["id"] for row in rows] == [item.id for item in caption_items]
    assert [json.loads(row["scene"]) for row in rows] == [item.meta["scene"] for item in caption_items]
    assert {row["prompt"] for row in rows} == {"Describe the image."}

    # Another folder gets the task YAMLs, reading the file beside them; the shipped ones read tasks/data/.
    for task in ("shapes_vqa", "shapes_caption"):
        text = (tasks_dir / f"{task}.yaml").read_text()
        assert f"test: {task}.parquet" in text and f"test: data/{task}.parquet" not in text
        assert f"test: data/{task}.parquet" in (lmms_export.TASKS_DIR / f"{task}.yaml").read_text()
    manifest = json.loads((tasks_dir / "export.json").read_text())
    assert manifest["counts"] == {"shapes_vqa": LIMIT, "shapes_caption": LIMIT} and manifest["limit"] == LIMIT


def test_export_command_line_refuses_a_bad_limit_and_names_the_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lmms_export.main(["export", "--out", str(tmp_path), "--limit", "0"])
    assert exit_info.value.code == 2
    assert lmms_export.main(["export", "--out", str(tmp_path), "--limit", "2", "--suite", "shapes-vqa"]) == 0
    out = capsys.readouterr().out
    assert f"--include_path {tmp_path}" in out and (tmp_path / "shapes_vqa.yaml").is_file()
    assert not (tmp_path / "shapes_caption.parquet").exists()


def test_the_hooks_score_as_our_suites_do():
    vqa = get_suite("shapes-vqa")
    items = vqa.load_items(None, 12)
    replies = {}
    for k, item in enumerate(items):  # right, right after normalisation, wrong, ...
        answer = item.meta["answer"]
        replies[item.id] = [answer, f" {answer.upper()}.", "a hexagon"][k % 3]
    docs = [{"id": item.id, "question": item.prompt, "answer": item.meta["answer"], "type": item.meta["type"]}
            for item in items]
    per_doc = [hooks.vqa_process_results(doc, [replies[doc["id"]]])["accuracy"] for doc in docs]
    ours = vqa.score({key: {"id": key, "answer": value} for key, value in replies.items()}, items, ScoreContext())
    assert per_doc == [100.0, 100.0, 0.0] * 4
    assert sum(per_doc) / len(per_doc) == pytest.approx(ours["metrics"]["accuracy"])
    assert hooks.vqa_doc_to_text(docs[0], {"pre_prompt": "", "post_prompt": ""}) == items[0].prompt

    caption = get_suite("shapes-caption")
    items = caption.load_items(None, 6)
    replies = {item.id: item.meta["caption"] if k % 2 == 0 else "a large red circle at the top left"
               for k, item in enumerate(items)}
    docs = [{"id": item.id, "prompt": item.prompt, "caption": item.meta["caption"],
             "scene": json.dumps(item.meta["scene"])} for item in items]
    results = [hooks.caption_process_results(doc, [replies[doc["id"]]]) for doc in docs]
    ours = caption.score({key: {"id": key, "answer": value} for key, value in replies.items()}, items,
                         ScoreContext())["metrics"]
    for metric in ("objects_right", "exact"):
        assert sum(r[metric] for r in results) / len(results) == pytest.approx(ours[metric])
    assert hooks.cider_aggregate([r["cider"] for r in results]) == pytest.approx(ours["cider"])
    assert 0 < ours["objects_right"] < 100


# ---------------------------------------------------------------------------------------- with lmms-eval
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf"), "MLLM_WORKER": "0", "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost", "TOKENIZERS_PARALLELISM": "false"}


def _lmms_eval(tmp_path: Path, *args: str, timeout: int = 600) -> dict:
    """Run the `lmms-eval` command; returns its results.json (with "samples": {task: {doc_id: reply}})."""
    script = Path(sys.executable).with_name("lmms-eval")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lmms_eval"]
    out = tmp_path / "lmms-out"
    proc = subprocess.run([*command, *args, "--output_path", str(out), "--log_samples"], capture_output=True,
                          text=True, timeout=timeout, env=_env(tmp_path), cwd=tmp_path, check=False)
    log = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, log
    # lmms-eval exits 0 even when the evaluation failed: its results file is the proof that it ran.
    found = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert len(found) == 1, log
    results = json.loads(Path(found[0]).read_text())
    results["samples"] = {}
    for path in glob.glob(str(out / "**" / "*_samples_*.jsonl"), recursive=True):
        task = Path(path).stem.split("_samples_", 1)[1]
        replies = {}
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            reply = record["filtered_resps"]
            replies[int(record["doc_id"])] = reply[0] if isinstance(reply, list) else reply
        results["samples"][task] = replies
    return results


def _our_accuracy(replies: dict[int, str]) -> float:
    items = get_suite("shapes-vqa").load_items(None, LIMIT)
    predictions = {items[doc_id].id: {"id": items[doc_id].id, "answer": reply} for doc_id, reply in replies.items()}
    return get_suite("shapes-vqa").score(predictions, items, ScoreContext())["metrics"]["accuracy"]


def test_the_model_is_found_by_its_entry_point(lmms_eval):
    from lmms_eval.models import get_model, list_available_models

    from eval.lmms_eval_plugin.models.mllm import MLLMLmms

    assert "mllm" in list_available_models() and get_model("mllm") is MLLMLmms


def test_lmms_eval_runs_our_model_offline_as_mllm_eval_does(lmms_eval, tiny_model, tasks_dir, mllm_eval_predictions,
                                                            tmp_path):
    results = _lmms_eval(tmp_path, "--model", "mllm", "--model_args",
                         f"pretrained={tiny_model},batch_size={BATCH},device=cpu", "--tasks", "shapes_vqa",
                         "--include_path", str(tasks_dir), "--limit", str(LIMIT))
    replies = results["samples"]["shapes_vqa"]
    items = get_suite("shapes-vqa").load_items(None, LIMIT)
    assert sorted(replies) == list(range(LIMIT))
    # The same items, batches and greedy decoding as `mllm eval`: the same answers, string for string.
    assert {items[doc_id].id: reply for doc_id, reply in replies.items()} == mllm_eval_predictions
    assert results["results"]["shapes_vqa"]["accuracy,none"] == pytest.approx(_our_accuracy(replies))


def test_openai_compatible_model_against_mllm_serve(lmms_eval, tiny_model, tasks_dir, mllm_eval_predictions,
                                                    tmp_path):
    import httpx

    port = _free_port()
    mllm = Path(sys.executable).with_name("mllm")
    command = [str(mllm)] if mllm.exists() else [sys.executable, "-m", "mllm.cli"]
    server = subprocess.Popen([*command, "serve", "--model", str(tiny_model), "--port", str(port), "--device", "cpu",
                               "--model-name", "tiny"], env=_env(tmp_path), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "mllm serve did not start in 120 s"
            time.sleep(0.5)
        results = _lmms_eval(tmp_path, "--model", "openai_compatible", "--model_args",
                             f"model_version=tiny,base_url=http://127.0.0.1:{port}/v1,api_key=none,max_retries=1",
                             "--tasks", "shapes_vqa", "--include_path", str(tasks_dir), "--limit", str(LIMIT))
    finally:
        server.terminate()
        server.wait(timeout=30)
    replies = results["samples"]["shapes_vqa"]
    assert not any("LMMS_EVAL_REQUEST_FAILED" in reply for reply in replies.values()), replies
    assert results["results"]["shapes_vqa"]["accuracy,none"] == pytest.approx(_our_accuracy(replies))
    # The server batches requests as they arrive, not as `mllm eval` does; on CPU the greedy answers agree.
    items = get_suite("shapes-vqa").load_items(None, LIMIT)
    same = sum(replies[doc_id] == mllm_eval_predictions[items[doc_id].id] for doc_id in replies)
    assert same == LIMIT, {items[k].id: (v, mllm_eval_predictions[items[k].id]) for k, v in replies.items()}


def test_lmms_eval_aggregates_our_hooks_to_our_suites_scores(lmms_eval, tasks_dir, tmp_path, monkeypatch):
    """Scripted replies (some right, some right after normalisation, some wrong) through lmms-eval's own
    evaluator and aggregation: every metric equals the suite's score of the same replies."""
    from lmms_eval.api.model import lmms
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))  # not ~/.cache
    replies: dict[str, dict[int, str]] = {"shapes_vqa": {}, "shapes_caption": {}}

    class Scripted(lmms):
        def generate_until(self, requests):
            out = []
            for request in requests:
                _, _, _, doc_id, task, split = request.args
                doc = self.task_dict[task][split][doc_id]
                if task == "shapes_vqa":
                    reply = [doc["answer"], doc["answer"].title() + ".", "no idea"][doc_id % 3]
                else:
                    reply = doc["caption"] if doc_id % 2 == 0 else "a small red circle at the center"
                replies[task][doc_id] = reply
                out.append(reply)
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

    results = simple_evaluate(model=Scripted(), tasks=["shapes_vqa", "shapes_caption"], limit=LIMIT,
                              task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                              log_samples=False)["results"]
    assert results["shapes_vqa"]["accuracy,none"] == pytest.approx(_our_accuracy(replies["shapes_vqa"]))
    assert 0 < results["shapes_vqa"]["accuracy,none"] < 100
    suite = get_suite("shapes-caption")
    items = suite.load_items(None, LIMIT)
    ours = suite.score({items[k].id: {"id": items[k].id, "answer": v} for k, v in replies["shapes_caption"].items()},
                       items, ScoreContext())["metrics"]
    for metric in ("objects_right", "exact", "cider"):
        assert results["shapes_caption"][f"{metric},none"] == pytest.approx(ours[metric]), metric
    assert 0 < ours["objects_right"] < 100


def _instance(request_type: str, arguments: tuple, doc_id: int):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=request_type, arguments=arguments, idx=0,
                    metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_generate_until_honours_until_and_max_new_tokens(lmms_eval, tiny_model):
    import mllm
    from eval.lmms_eval_plugin.models.mllm import MLLMLmms

    lm = MLLMLmms(pretrained=str(tiny_model), batch_size=2, device="cpu")
    items = get_suite("shapes-vqa").load_items(None, 3)
    lm.task_dict = {"t": {"test": [{"image": item.image} for item in items]}}

    def requests(gen_kwargs):
        return [_instance("generate_until", (item.prompt, dict(gen_kwargs), hooks.doc_to_visual, k, "t", "test"), k)
                for k, item in enumerate(items)]

    plain = lm.generate_until(requests({"max_new_tokens": 6, "until": []}))
    model = mllm.load(str(tiny_model), device="cpu")
    direct = model.generate_text([[{"role": "user", "content": [{"type": "image", "image": item.image.convert("RGB")},
                                                                  {"type": "text", "text": item.prompt}]}]
                                  for item in items], max_new_tokens=6)
    assert plain == direct
    stop = plain[0][1:3]
    assert stop.strip(), plain
    cut = lm.generate_until(requests({"max_new_tokens": 6, "until": [stop], "do_sample": False}))
    assert cut[0] == plain[0][: plain[0].find(stop)].strip()
    shorter = lm.generate_until(requests({"max_new_tokens": 1}))
    assert all(len(a) <= len(b) for a, b in zip(shorter, plain))
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until(requests({"num_beams": 3}))


def test_loglikelihood_is_the_replys_log_probability(lmms_eval, tiny_model):
    import torch

    from eval.lmms_eval_plugin.models.mllm import MLLMLmms, user_turn

    items = get_suite("shapes-vqa").load_items(None, 3)
    docs = [{"image": item.image} for item in items]
    continuations = [" red", " yes", " 2"]
    requests = [_instance("loglikelihood", (item.prompt, continuation, hooks.doc_to_visual, k, "t", "test"), k)
                for k, (item, continuation) in enumerate(zip(items, continuations))]
    batched = MLLMLmms(pretrained=str(tiny_model), batch_size=3, device="cpu")
    batched.task_dict = {"t": {"test": docs}}
    one_by_one = MLLMLmms(pretrained=str(tiny_model), batch_size=1, device="cpu")
    one_by_one.task_dict = {"t": {"test": docs}}
    scores = batched.loglikelihood(requests)
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in one_by_one.loglikelihood(requests)], abs=1e-4)

    # Independently: the processor's own label span of the reply (without its end of turn), summed.
    model = batched.model
    for (score, greedy), item, continuation in zip(scores, items, continuations):
        conversation = user_turn([item.image.convert("RGB")], item.prompt) + [
            {"role": "assistant", "content": continuation.strip()}]
        batch = model.processor([conversation], padding_side="right")
        labels = batch["labels"][0]
        positions = [k for k in range(len(labels)) if labels[k] != -100
                     and int(labels[k]) != model.config.end_of_turn_token_id]
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0].float()
        logits[:, model.config.image_offset:] = float("-inf")
        logprobs = torch.log_softmax(logits, dim=-1)
        expected = sum(float(logprobs[k - 1, batch["input_ids"][0, k]]) for k in positions)
        assert score == pytest.approx(expected, abs=1e-4) and score < 0
        assert isinstance(greedy, bool)
