import json

import pytest
import torch

from training.components import LLMTrainConfig
from training.config import load_config
from training.train_ett import ETTTrainConfig, main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mllm.data.pretokenize import pretokenize_records
    from mllm.data.shapes import iter_samples
    from mllm.data.shards import DataStats, read_records, write_shards
    from mllm.init import init_model
    from tokenizer_vision import DualCodebookTokenizer

    root = tmp_path_factory.mktemp("ett")
    codebook = init_model("tiny", "tiny", root / "codebook", embedding="codebook", seed=0)
    learned = init_model("tiny", "tiny", root / "learned", seed=0)
    write_shards(iter_samples(24, size=32), root / "data", progress=False)
    tokenizer = DualCodebookTokenizer.from_pretrained(codebook / "vision_tokenizer")
    records = read_records(str(root / "data"), stats=DataStats(), split=False)
    write_shards(pretokenize_records(records, tokenizer, 8, "cpu", "fp32", DataStats()), root / "codes",
                 progress=False)
    held_out = [record["image"] for record in iter_samples(16, split="test", size=32)]
    return {"codebook": codebook, "learned": learned, "data": root / "data", "codes": root / "codes",
            "held_out": held_out}


def _config(setup, out, model="codebook", data="data", schema=ETTTrainConfig, **overrides):
    base = {"model": str(setup[model]), "data": str(setup[data]), "out": str(out),
            "tasks": {"caption": 1.0, "vqa": 1.0, "t2i": 0.5}, "num_samples": 16, "per_device_batch_size": 4,
            "max_steps": 6, "warmup_steps": 0, "logging_steps": 1, "save_steps": 3, "precision": "fp32",
            "learning_rate": 3e-3, "max_length": 256}
    if schema is ETTTrainConfig:
        base["ett"] = {"tokenizer_learning_rate": 3e-3}
    return load_config(schema, {**base, **overrides})


def _tokenizer_state(folder):
    from tokenizer_vision import DualCodebookTokenizer

    return DualCodebookTokenizer.from_pretrained(folder / "vision_tokenizer", codebook_update="loss", restart_every=0)


def _reconstruction_error(tokenizer, images) -> float:
    """Mean squared error (normalised pixels) of decode(encode(image)) over held-out scenes."""
    pixels = tokenizer.processor.preprocess(images)
    with torch.no_grad():
        return float((tokenizer.decode(tokenizer.encode(pixels)) - pixels).pow(2).mean())


def _changed(before: torch.nn.Module, after: torch.nn.Module, prefix: str) -> bool:
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    names = [name for name in old if name.startswith(prefix)]
    assert names, prefix
    return any(not torch.equal(old[name], new[name]) for name in names)


def test_ett_tunes_the_tokenizer_and_keeps_it_reconstructing(setup, tmp_path):
    from mllm.model import UnifiedMLLM

    final = main(_config(setup, tmp_path / "run"))
    before, after = _tokenizer_state(setup["codebook"]), _tokenizer_state(final)
    for part in ("pixel_encoder.", "semantic_encoder.", "quantizer.", "pixel_decoder.", "semantic_decoder."):
        assert _changed(before, after, part), part
    assert not _changed(before, after, "teacher.")  # the frozen distillation target never moves
    # The LLM's loss moved the tokenizer, and its reconstruction term kept the decoder faithful.
    error_before = _reconstruction_error(before, setup["held_out"])
    error_after = _reconstruction_error(after, setup["held_out"])
    assert error_after <= error_before * 1.05, (error_before, error_after)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for record in records:
        for key in ("loss_llm", "tokenizer_loss", "tokenizer_pixel_l1", "tokenizer_vq", "tokens_per_s"):
            assert key in record and record[key] >= 0, key
        assert record["loss"] == pytest.approx(record["loss_llm"] + record["tokenizer_loss"], rel=1e-5)
    assert records[-1]["loss_llm"] < records[0]["loss_llm"]

    # Saved baked: a plain learned-mode folder with the tuned tokenizer inside.
    model = UnifiedMLLM.from_pretrained(final, device="cpu")
    assert model.config.embedding_mode == "learned" and model.projector is None
    assert not _changed(after, model.vision_tokenizer, "pixel_decoder.")


def test_reconstruction_weight_zero_leaves_the_decoders_alone_and_lora_saves_an_adapter(setup, tmp_path):
    final = main(_config(setup, tmp_path / "run", lora={"r": 4, "alpha": 8, "dropout": 0.0},
                         ett={"reconstruction_weight": 0.0, "tokenizer_learning_rate": 3e-3, "bake": False}))
    before, after = _tokenizer_state(setup["codebook"]), _tokenizer_state(final)
    assert _changed(before, after, "pixel_encoder.") and _changed(before, after, "quantizer.")
    assert not _changed(before, after, "pixel_decoder.")  # only the reconstruction term reaches the decoder
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((final / "mllm_config.json").read_text())["embedding_mode"] == "codebook"
    assert (final / "projector.safetensors").is_file()


def test_frozen_tokenizer_baseline_trains_only_the_llm_and_projector(setup, tmp_path):
    from safetensors.torch import load_file

    final = main(_config(setup, tmp_path / "run", ett={"train_tokenizer": False, "bake": False}))
    before, after = _tokenizer_state(setup["codebook"]), _tokenizer_state(final)
    assert not any(_changed(before, after, part) for part in ("pixel_encoder.", "quantizer.", "pixel_decoder."))
    old, new = load_file(setup["codebook"] / "projector.safetensors"), load_file(final / "projector.safetensors")
    assert any(not torch.equal(old[name], new[name]) for name in old)


def test_killed_ett_run_resumes_exactly(setup, tmp_path, kill_after_checkpoint):
    straight = main(_config(setup, tmp_path / "straight", ett={"bake": False}))
    undo = kill_after_checkpoint(3)
    with pytest.raises(KeyboardInterrupt):
        main(_config(setup, tmp_path / "resumed", ett={"bake": False}))
    undo()
    resumed = main(_config(setup, tmp_path / "resumed", ett={"bake": False}), resume=True)
    from safetensors.torch import load_file

    for file in sorted(straight.rglob("*.safetensors")):
        expected, got = load_file(file), load_file(resumed / file.relative_to(straight))
        for name in expected:
            assert torch.equal(expected[name], got[name]), f"{file.name}:{name}"


def test_ett_refuses_learned_models_pretokenized_data_and_unknown_keys(setup, tmp_path):
    with pytest.raises(ValueError, match="codebook-mode model"):
        main(_config(setup, tmp_path / "a", model="learned"))
    with pytest.raises(ValueError, match="ETT needs image shards"):
        main(_config(setup, tmp_path / "b", data="codes"))
    with pytest.raises(ValueError, match="unknown config key 'ett.lambda' \\(known keys: ett.reconstruction_weight"):
        _config(setup, tmp_path / "c", ett={"lambda": 1.0})
    with pytest.raises(ValueError, match="ett"):
        _config(setup, tmp_path / "d", ett={}, quantization="4bit", lora={"r": 4})
    # and the LLM recipe points a codebook-mode model at ETT
    from training.train_llm import main as train_llm

    with pytest.raises(ValueError, match="codebook-mode model.*ETT recipe"):
        train_llm(_config(setup, tmp_path / "e", schema=LLMTrainConfig))
