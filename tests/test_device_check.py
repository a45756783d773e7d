"""scripts/device_check.sh: valid bash that names every part of the GPU check, writes under $OUT, never touches
the GPU's settings, and on a machine without CUDA stops after its environment part with a summary."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"


@pytest.fixture(scope="module")
def text() -> str:
    return SCRIPT.read_text()


def test_the_script_is_valid_bash_with_strict_mode(text):
    bash = shutil.which("bash")
    assert bash, "bash is needed"
    result = subprocess.run([bash, "-n", str(SCRIPT)], check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^set -euo pipefail$", text, re.MULTILINE)


def test_everything_goes_under_out_and_every_part_runs_under_a_timeout_within_8_minutes(text):
    assert 'OUT="${OUT:-./device-out}"' in text
    assert '"$OUT/summary.txt"' in text or 'SUMMARY="$OUT/summary.txt"' in text
    assert "timeout --kill-after=10" in text
    budget = int(re.search(r'BUDGET_S="\$\{BUDGET_S:-(\d+)\}"', text).group(1))
    assert budget <= 8 * 60
    # Every command of the check goes through `part` (timeout + log + status line) or is a quick read.
    parts = re.findall(r"^\s*(?:part|bench) ([\w-]+) ", text, re.MULTILINE)
    assert {"env", "install", "bench-demo-sdpa", "bench-100m-sdpa", "data", "pytest-gpu"} <= set(parts)
    # The tests run before the benchmarks and training steps, which can use up the budget.
    assert parts.index("pytest-gpu") < min(parts.index(p) for p in parts if p.startswith(("bench", "train")))


def test_the_parts_of_the_brief_are_there(text):
    assert "nvidia-smi" in text and "torch.version.cuda" in text
    assert "pip install --no-input --retries 0 --timeout 10 -e '.[dev]'" in text  # guarded: only when imports fail
    assert 'DEVICE="${DEVICE:-cuda}"' in text and "--dtype bf16" in text
    assert "scripts/bench_generate.py" in text and "--llama-100m" in text and "--attn sdpa" in text
    assert "import flash_attn" in text and "--attn flash_attention_2" in text
    assert "mllm data shapes" in text and "--max-steps 1" in text
    for command in ("train-teacher", "train-tokenizer", "pretokenize", "init", "train"):
        assert re.search(rf"\bmllm {command}\b", text), command
    # One step of each shipped shapes recipe, by name.
    shapes = sorted(p.stem for p in (ROOT / "training" / "configs").glob("*.yaml") if "shapes" in p.stem)
    assert len(shapes) >= 5
    for recipe in shapes:
        assert f"--recipe {recipe} " in text, recipe
    assert "-m pytest" in text and "torch\\.cuda\\.is_available" in text


def test_it_never_resets_or_reconfigures_the_gpu(text):
    commands = [line for line in text.splitlines() if "nvidia-smi" in line and not line.lstrip().startswith("#")]
    assert commands
    for line in commands:
        assert not re.search(r"nvidia-smi\s+(-r\b|--gpu-reset|-pm\b|-lgc|-rgc|-lmc|-ac\b|-rac|-pl\b|-c\b|-mig|"
                             r"--persistence|--compute-mode|--applications-clocks|--power-limit)", line), line
    assert "nvidia-smi --query-gpu=" in text


def test_without_cuda_it_stops_after_the_environment_with_a_summary(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("WORK", "KEEP_WORK", "BENCH_ARGS", "WHEELS")}
    env.update(OUT=str(out), PYTHON=sys.executable, DEVICE="cuda", BUDGET_S="60", KEEP_LOGS="0")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the whole check would run")
    result = subprocess.run(["bash", str(SCRIPT)], check=False, env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = (out / "summary.txt").read_text()
    assert "env: ok" in summary and "CUDA is not available" in summary and "FAILED" in summary
    assert "available False" in (out / "device-check.log").read_text()
    with tarfile.open(out / "logs.tar.gz") as logs:
        assert "logs/env.log" in logs.getnames()
    assert not (out / "logs").exists()  # packed, so few files come back
