"""Training past one process with parameters sharded: `accelerate launch --config_file
training/configs/accelerate/fsdp_cpu.yaml -m mllm.cli train` runs two CPU processes (gloo) under FSDP2.

Each process holds half of every parameter, gradient and optimizer state; checkpoints are saved sharded
(one .distcp file per process) and `--resume` reads them back; the final folder is whole and loads as usual.
Stated tolerance: per-step losses within 1e-4 (relative) of one process that trains the same global batch,
and final weights within 1e-4 (absolute): the two runs sum the same numbers in a different order."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from training.config import CONFIG_DIR

CONFIG = CONFIG_DIR / "accelerate" / "fsdp_cpu.yaml"
STEPS = ["max_steps=4", "save_steps=2", "logging_steps=1", "warmup_steps=0", "precision=fp32", "num_samples=8",
         "learning_rate=3e-3"]


def _single(tiny, recipe, out, *sets):
    from training.recipes import run_recipe

    model, data = tiny
    return run_recipe(recipe, [f"model={model}", f"data={data}", f"out={out}", "per_device_batch_size=4",
                               *STEPS, *sets])


def _sharded(tiny, recipe, out, *sets, resume=False):
    """Two processes, 2 examples each: the global batch of `_single`."""
    model, data = tiny
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
               "-m", "mllm.cli", "train", "--recipe", recipe, "--model", str(model), "--data", str(data),
               "--out", str(out), *(["--resume"] if resume else []),
               "--set", "per_device_batch_size=2", *STEPS, *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_close(expected: dict, got: dict, atol: float) -> None:
    assert expected and expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.allclose(value, got[name], rtol=0, atol=atol), name


def test_shapes_pretrain_sharded_over_two_processes_matches_one_and_resumes(tiny, tmp_path):
    from mllm.model import UnifiedMLLM

    single = _single(tiny, "shapes-pretrain", tmp_path / "single")
    out = tmp_path / "fsdp"
    proc = _sharded(tiny, "shapes-pretrain", out)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # sharded: each checkpoint holds one shard file per process and no whole-model weights
    shards = out / "checkpoint-2" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list((out / "checkpoint-2").glob("*.safetensors"))
    assert _losses(out) == pytest.approx(_losses(tmp_path / "single"), rel=1e-4)
    weights = load_file(out / "model" / "llm" / "model.safetensors")
    _assert_close(load_file(single / "llm" / "model.safetensors"), weights, atol=1e-4)
    assert any(not torch.equal(weights[k], v) for k, v in load_file(tiny[0] / "llm" / "model.safetensors").items())

    # a run killed after checkpoint-2 resumes from its shards and ends where the uninterrupted run did
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "checkpoint-4")
    proc = _sharded(tiny, "shapes-pretrain", resumed, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(resumed) == pytest.approx(_losses(out), rel=1e-6)
    _assert_close(weights, load_file(resumed / "model" / "llm" / "model.safetensors"), atol=1e-6)

    # the whole folder loads as usual and answers like the single-process model
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    with torch.no_grad():
        a = UnifiedMLLM.from_pretrained(single, device="cpu").llm(ids).logits
        b = UnifiedMLLM.from_pretrained(out / "model", device="cpu").llm(ids).logits
    assert torch.allclose(a, b, atol=1e-3)


def test_lora_sft_sharded_over_two_processes_matches_one(tiny, tmp_path):
    from mllm.model import UnifiedMLLM

    single = _single(tiny, "shapes-sft", tmp_path / "single")
    out = tmp_path / "fsdp"
    proc = _sharded(tiny, "shapes-sft", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((out / "checkpoint-4" / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert _losses(out) == pytest.approx(_losses(tmp_path / "single"), rel=1e-4)
    adapter = out / "adapter"
    _assert_close(load_file(single / "adapter_model.safetensors"), load_file(adapter / "adapter_model.safetensors"),
                  atol=1e-4)
    model = UnifiedMLLM.from_pretrained(tiny[0], adapter=adapter, device="cpu")  # loads as usual
    assert model.llm is not None


def test_a_recipe_that_cannot_be_sharded_is_refused_with_what_to_do(tiny, tmp_path):
    proc = _sharded(tiny, "shapes-pretrain", tmp_path / "out", "freeze_llm=true", "max_steps=1")
    assert proc.returncode != 0
    assert "freeze_llm masks the gradients" in proc.stderr and "without an FSDP config" in proc.stderr
