"""`mllm tune-encoder`: only the encoders move, the result is saved in place or into a copy with its figures,
and bad settings fail with a message."""

import json

import numpy as np
import pytest
import torch

from mllm.data import shapes


@pytest.fixture
def tiny_tokenizer(tmp_path):
    from tokenizer_vision import DualCodebookTokenizer

    torch.manual_seed(0)
    folder = tmp_path / "tok"
    DualCodebookTokenizer.from_name("tiny").save_pretrained(folder)
    return folder


def _small(**overrides):
    from training.tune_encoder import EncoderTuneConfig

    return EncoderTuneConfig(**{"steps": 3, "batch_size": 8, "scenes": 16, "check_scenes": 6,
                                "learning_rate": 1e-2, "preference_margin": None, **overrides})


def test_only_the_encoders_change_and_figures_are_written(tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from training.tune_encoder import RESULT_NAME, tune_encoder

    before = load_file(str(tiny_tokenizer / "model.safetensors"))
    out = tmp_path / "tuned"
    figures = tune_encoder(tiny_tokenizer, _small(), out=out, progress=False)
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "the encoder did not move"
    assert all("encoder" in name for name in changed), sorted(n for n in changed if "encoder" not in n)
    assert any(name.startswith("quantizer.codebook") for name in before)  # frozen, and present
    # the source is untouched when --out names a copy
    assert all(torch.equal(before[n], load_file(str(tiny_tokenizer / "model.safetensors"))[n]) for n in before)
    written = json.loads((out / RESULT_NAME).read_text())
    assert written == json.loads(json.dumps(figures))
    for key in ("anywhere_judge_agreement", "exact_codes_kept", "varied_codes_of_exact"):
        assert 0.0 <= figures[key] <= 100.0
    assert figures["config"]["steps"] == 3


def test_same_seed_same_weights_and_in_place(tiny_tokenizer, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from training.tune_encoder import tune_encoder

    copy = tmp_path / "copy"
    shutil.copytree(tiny_tokenizer, copy)
    tune_encoder(tiny_tokenizer, _small(), progress=False)  # in place
    tune_encoder(copy, _small(), progress=False)
    first, second = load_file(str(tiny_tokenizer / "model.safetensors")), load_file(str(copy / "model.safetensors"))
    assert all(torch.equal(first[n], second[n]) for n in first)


def _with_code_counts(folder):
    from tokenizer_vision import DualCodebookTokenizer

    tokenizer = DualCodebookTokenizer.from_pretrained(folder)
    tokenizer.quantizer.code_preference.fill_(1.0)
    tokenizer.save_pretrained(folder)


def test_margin_that_would_merge_contents_is_refused(tiny_tokenizer):
    from training.tune_encoder import MarginTooWide, tune_encoder

    with pytest.raises(ValueError, match="keeps no code counts"):
        tune_encoder(tiny_tokenizer, _small(preference_margin=0.001), progress=False)
    _with_code_counts(tiny_tokenizer)
    before = (tiny_tokenizer / "model.safetensors").read_bytes()
    with pytest.raises(MarginTooWide, match="would merge cell contents"):  # the demo falls back on it
        tune_encoder(tiny_tokenizer, _small(preference_margin=100.0), progress=False)
    assert (tiny_tokenizer / "model.safetensors").read_bytes() == before  # refused before anything was written


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "steps must be positive"),
    ({"max_jitter": 0.7}, "max_jitter"),
    ({"anywhere_share": 0.8, "varied_share": 0.5}, "sum to at most 1"),
])
def test_bad_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        _small(**overrides).validate()


def test_not_a_tokenizer(tmp_path):
    from training.tune_encoder import tune_encoder

    with pytest.raises(FileNotFoundError, match="neither a tokenizer folder"):
        tune_encoder(tmp_path, _small(), progress=False)


def test_max_jitter_moves_objects_and_keeps_the_rest():
    scene = shapes.make_scene(shapes.scene_seed("train", 5))
    default = np.asarray(shapes.render(scene, 96, look="varied"), dtype=float)
    assert np.array_equal(default, np.asarray(shapes.render(scene, 96, look="varied",
                                                            max_jitter=shapes.VARIED_MAX_JITTER)))
    centred = np.asarray(shapes.render(scene, 96, look="varied", max_jitter=0.0), dtype=float)
    anywhere = np.asarray(shapes.render(scene, 96, look="varied", max_jitter=0.5), dtype=float)
    assert not np.array_equal(centred, anywhere)
    # the same objects (area of non-background pixels within a few percent), only moved
    ink = [(np.abs(image - 250).sum(-1) > 60).sum() for image in (centred, anywhere)]
    assert abs(ink[0] - ink[1]) <= 0.05 * ink[0]
    with pytest.raises(ValueError, match="max_jitter"):
        shapes.render(scene, 96, look="exact", max_jitter=0.2)


def test_the_preference_margin_is_saved_with_the_weights(tiny_tokenizer):
    from tokenizer_vision import DualCodebookTokenizer
    from training.tune_encoder import tune_encoder

    _with_code_counts(tiny_tokenizer)
    tune_encoder(tiny_tokenizer, _small(preference_margin=0.001), progress=False)
    assert json.loads((tiny_tokenizer / "config.json").read_text())["code_preference_margin"] == 0.001
    assert DualCodebookTokenizer.from_pretrained(tiny_tokenizer).quantizer.preference_margin == 0.001
