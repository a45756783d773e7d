"""scripts/look_code_overlap.py and scripts/edit_code_overlap.py on a tiny tokenizer: the shares they print
are the code-by-code comparisons they describe."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import torch

    from tokenizer_vision import DualCodebookTokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tok")
    DualCodebookTokenizer.from_name("tiny", quantizer_mode="pixel", image_size=48).save_pretrained(folder)
    return folder


def test_look_overlap_compares_each_look_with_the_exact_render(tokenizer, monkeypatch):
    from mllm.data import shapes

    script = _load("look_code_overlap")
    result = script.main(["--tokenizer", str(tokenizer), "--n", "6"])
    assert set(result) == {"varied", "other"} and all(0.0 <= share < 1.0 for share in result.values())
    # Every look drawn as the exact render: every code equal.
    real_render = shapes.render
    monkeypatch.setattr(shapes, "render", lambda scene, size, look="exact": real_render(scene, size))
    assert script.main(["--tokenizer", str(tokenizer), "--n", "6"]) == {"varied": 1.0, "other": 1.0}


def test_edit_overlap_counts_equal_codes_and_changed_pixels(tokenizer):
    result = _load("edit_code_overlap").main(["--tokenizer", str(tokenizer), "--n", "12"])
    overall = result["all"]
    assert 0.0 < overall["equal"] < 1.0 and 0.0 < overall["changed_pixels"] < 0.2
    assert 0.0 <= overall["untouched"] <= 1.0 and 0.0 <= overall["untouched_kept"] <= 1.0
