import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval import runner
from eval.suites import get_suite, suite_names

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mllm.init import init_model

    return init_model("tiny", "tiny", tmp_path_factory.mktemp("eval") / "model", seed=0)


def _args(model_dir, out, **overrides):
    settings = {"model": str(model_dir), "suite": "shapes-vqa", "out": str(out), "limit": 24, "batch_size": 5,
                "progress": False, **overrides}
    return runner.EvalSettings(**settings)


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_registry_finds_suites_by_name():
    assert {"shapes-vqa", "shapes-caption"} <= set(suite_names())
    assert get_suite("shapes-vqa").kind == "answer"
    with pytest.raises(ValueError, match="unknown suite 'nope'; did you mean pope\\? \\(choose from: coco-caption, "):
        get_suite("nope")


def test_a_misspelled_suite_option_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="unknown shapes-t2i option key 'seed' \\(did you mean seeds\\?\\)"):
        runner.evaluate(_args(tmp_path / "no-model", tmp_path / "out", suite="shapes-t2i", options={"seed": "3"}))
    with pytest.raises(ValueError, match="unknown shapes-vqa option key 'seeds' \\(it takes none\\)"):
        runner.score_file("shapes-vqa", tmp_path / "none.jsonl", options={"seeds": "3"})


def test_interrupted_run_resumes_with_every_id_once(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_predict, calls = runner._predict, []

    def predict_then_die(suite, model, batch, out_dir, args):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while the third batch was being generated
        return real_predict(suite, model, batch, out_dir, args)

    monkeypatch.setattr(runner, "_predict", predict_then_die)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(_args(model_dir, out))
    monkeypatch.setattr(runner, "_predict", real_predict)
    predictions = out / runner.PREDICTIONS_NAME
    assert len(_ids(predictions)) == 10  # two batches of 5 made it to disk
    with open(predictions, "a") as handle:  # and a line cut short by the kill
        handle.write('{"id": "00000000-0", "ans')

    results = runner.evaluate(_args(model_dir, out))
    assert "10 predictions already in" in capsys.readouterr().out
    ids = _ids(predictions)
    items = get_suite("shapes-vqa").load_items(None, 24)
    assert sorted(ids) == sorted(item.id for item in items)  # each once: none lost, none duplicated
    assert results["count"] == 24
    saved = json.loads((out / runner.RESULTS_NAME).read_text())
    assert saved["suite"] == "shapes-vqa" and saved["count"] == 24
    assert (out / runner.TABLE_NAME).read_text().startswith("### shapes-vqa")

    # a finished run restarted does nothing but score again
    runner.evaluate(_args(model_dir, out))
    assert sorted(_ids(predictions)) == sorted(ids)


def test_eval_score_rescoring_matches_and_prints_the_primary_metric_last(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    results = runner.evaluate(_args(model_dir, out))
    # Replace half the answers by the truth: the score must follow the file, not the model.
    items = {item.id: item for item in get_suite("shapes-vqa").load_items(None, 24)}
    lines = [json.loads(line) for line in (out / runner.PREDICTIONS_NAME).read_text().splitlines()]
    for record in lines[:12]:
        record["answer"] = items[record["id"]].meta["answer"].upper() + "."  # case and period do not count
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in lines))
    capsys.readouterr()

    rescored = runner.score_file("shapes-vqa", edited)
    printed = capsys.readouterr().out.strip().splitlines()
    correct = sum(str(r["answer"]).lower().rstrip(".") == items[r["id"]].meta["answer"] for r in lines)
    assert rescored["metrics"]["accuracy"] == pytest.approx(100 * correct / 24)
    assert correct >= 12 and rescored["metrics"]["accuracy"] >= results["metrics"]["accuracy"]
    assert printed[-1] == f"accuracy {100 * correct / 24:.2f}"


def test_shapes_caption_reads_captions_back_with_the_judge():
    from eval.suites.shapes import caption_matches

    scene = {"seed": 0, "objects": [{"color": "red", "shape": "circle", "size": "large", "cell": "top left"},
                                    {"color": "blue", "shape": "square", "size": "small", "cell": "center"}]}
    assert caption_matches("a large red circle at the top left and a small blue square at the center", scene) \
        == (True, True)
    assert caption_matches("a small blue square in the middle and a small red circle at the top left.", scene) \
        == (True, False)  # order free; a wrong size only spoils the exact match
    assert caption_matches("a large red circle at the top left", scene) == (False, False)  # one missing
    assert caption_matches("a red circle at the top right and a blue square at the center", scene) \
        == (False, False)
    assert caption_matches("two shapes", scene) == (False, False)
    # an object named without its size (seen from a trained model): right, not exact, and no crash sorting
    # a missing size among the others
    assert caption_matches("a red circle at the top left and a small blue square at the center", scene) \
        == (True, False)


def test_two_processes_share_the_work_and_the_file(model_dir, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mllm.cli", "eval", "--model", str(model_dir), "--suite", "shapes-vqa", "--out", str(out),
               "--limit", "14", "--batch-size", "3", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = _ids(out / runner.PREDICTIONS_NAME)
    assert len(ids) == 14 and len(set(ids)) == 14
    assert json.loads((out / runner.RESULTS_NAME).read_text())["count"] == 14


def test_sigkilled_eval_restarts_and_scores_every_id_once(model_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "mllm.cli", "eval", "--model", str(model_dir), "--suite", "shapes-vqa",
               "--out", str(out), "--limit", "600", "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = out / runner.PREDICTIONS_NAME
    try:
        deadline = time.time() + 120
        while process.poll() is None and time.time() < deadline:
            if predictions.is_file() and predictions.read_text().count("\n") >= 20:
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / runner.RESULTS_NAME).exists()
    before = len(predictions.read_text().splitlines())
    assert 0 < before < 600

    restarted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    ids = _ids(predictions)
    assert len(ids) == 600 and len(set(ids)) == 600
    assert json.loads((out / runner.RESULTS_NAME).read_text())["count"] == 600
    assert restarted.stdout.strip().splitlines()[-1].startswith("accuracy ")


def test_draw_suites_take_the_sampling_settings_and_record_them(model_dir, tmp_path):
    from PIL import Image

    from mllm.config import DRAW_GUIDANCE_SCALE, DRAW_TEMPERATURE

    def drawn(out: Path) -> list[bytes]:
        record = json.loads((out / runner.PREDICTIONS_NAME).read_text().splitlines()[0])
        return [Image.open(out / name).tobytes() for name in record["images"]]

    default = _args(model_dir, tmp_path / "default", suite="shapes-t2i", limit=1, options={"seeds": "3"})
    assert (default.temperature, default.guidance_scale, default.top_k) == (DRAW_TEMPERATURE, DRAW_GUIDANCE_SCALE, None)
    runner.evaluate(default)
    saved = json.loads((tmp_path / "default" / runner.RESULTS_NAME).read_text())
    assert (saved["temperature"], saved["guidance_scale"], saved["seed"]) == (DRAW_TEMPERATURE, DRAW_GUIDANCE_SCALE, 0)
    assert len(set(drawn(tmp_path / "default"))) > 1  # sampled: the seeds differ

    runner.evaluate(_args(model_dir, tmp_path / "greedy", suite="shapes-t2i", limit=1, options={"seeds": "3"},
                          temperature=0.0))
    assert len(set(drawn(tmp_path / "greedy"))) == 1  # greedy: every seed draws the same codes
    assert json.loads((tmp_path / "greedy" / runner.RESULTS_NAME).read_text())["temperature"] == 0.0
    assert saved["decoding"] == "auto"

    runner.evaluate(_args(model_dir, tmp_path / "sequential", suite="shapes-t2i", limit=1, options={"seeds": "3"},
                          temperature=0.0, decoding="sequential"))
    assert drawn(tmp_path / "sequential") == drawn(tmp_path / "greedy")  # greedy: either method, the same codes
    assert json.loads((tmp_path / "sequential" / runner.RESULTS_NAME).read_text())["decoding"] == "sequential"
