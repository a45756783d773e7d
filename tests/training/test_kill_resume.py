"""`mllm train` killed with SIGKILL mid-run and resumed reproduces the uninterrupted run (weights and log)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.components import complete_checkpoints

ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 120, 10


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mllm.data.shapes import iter_samples
    from mllm.data.shards import write_shards
    from mllm.init import init_model

    root = tmp_path_factory.mktemp("kill_resume")
    model_dir = init_model("tiny", "tiny", root / "model", seed=0)
    write_shards(iter_samples(24, size=32), root / "data", progress=False)
    return model_dir, root / "data"


def _command(inputs, out: Path, *extra: str) -> list[str]:
    model_dir, data = inputs
    return [sys.executable, "-m", "mllm.cli", "train", "--recipe", "shapes-pretrain", "--model", str(model_dir),
            "--data", str(data), "--out", str(out), "--max-steps", str(STEPS), *extra,
            "--set", "per_device_batch_size=4", "num_samples=24", "logging_steps=1", f"save_steps={SAVE_EVERY}",
            "save_total_limit=3", "max_length=256", "warmup_steps=5"]


def _env() -> dict[str, str]:
    # One thread in every run: a different thread count may change the order of float reductions.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.relative_to(folder)}:{k}": v for f in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def _log(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def test_sigkilled_cli_run_resumes_to_the_uninterrupted_result(inputs, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_command(inputs, straight), env=_env(), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(inputs, killed), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        # Until the first checkpoint is complete by the rule resuming uses (its trainer_state.json reads back
        # whole): a file that exists but is half-written (seen on a loaded machine) would leave none.
        while not complete_checkpoints(killed) and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)  # whatever it was doing: a step, a log line, a checkpoint
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model").exists()

    rerun = subprocess.run(_command(inputs, killed), env=_env(), capture_output=True, text=True, timeout=300,
                           check=False)
    assert rerun.returncode != 0 and "--resume" in rerun.stderr  # never silently overwritten

    resumed = subprocess.run(_command(inputs, killed, "--resume"), env=_env(), capture_output=True, text=True, check=False,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout

    expected, got = _weights(straight / "model"), _weights(killed / "model")
    assert expected and expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert _log(killed) == _log(straight)
    assert [record["step"] for record in _log(killed)] == list(range(1, STEPS + 1))
