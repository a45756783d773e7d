"""eval-tokenizer computes its figures from what the tokenizer really returns."""

import json

import numpy as np
import pytest
import torch

from eval.tokenizer_metrics import evaluate_tokenizer
from mllm.cli import main as mllm_main
from mllm.data.shapes import iter_samples
from mllm.data.shards import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout")
    write_shards(iter_samples(20, "test", base_seed=0, size=32), out, progress=False)
    return out


def test_metrics_match_a_direct_computation(shards):
    from mllm.data.arrays import load_image_arrays, to_pixel_values
    from tokenizer_vision import DualCodebookTokenizer

    torch.manual_seed(0)
    tokenizer = DualCodebookTokenizer.from_name("tiny").eval()
    results = evaluate_tokenizer(tokenizer, str(shards), batch_size=8, precision="fp32", progress=False)

    arrays = load_image_arrays(str(shards), 32, progress=False)
    pixels = to_pixel_values(arrays.images, tokenizer.config.image_mean, tokenizer.config.image_std)
    with torch.no_grad():
        codes = tokenizer.encode(pixels)
        recon = np.stack([np.asarray(im) for im in tokenizer.decode_images(codes)]).astype(np.float64) / 255
    original = arrays.images.astype(np.float64) / 255
    mse = ((recon - original) ** 2).reshape(len(original), -1).mean(1)
    assert results["images"] == 20
    assert results["psnr"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), abs=1e-3)
    assert results["codes_used"] == len(torch.unique(codes))
    assert results["codebook_usage"] == pytest.approx(results["codes_used"] / tokenizer.codebook_size)
    assert 0 < results["ssim"] <= 1
    assert "judge_agreement" in results and 0 <= results["judge_agreement"] <= 1
    assert -1 <= results["semantic_cosine"] <= 1


def test_cli_writes_results_and_examples(shards, tmp_path, capsys):
    from tokenizer_vision import DualCodebookTokenizer

    DualCodebookTokenizer.from_name("tiny").save_pretrained(tmp_path / "tok")
    assert mllm_main(["eval-tokenizer", "--tokenizer", str(tmp_path / "tok"), "--data", str(shards), "--out",
                      str(tmp_path / "eval"), "--precision", "fp32", "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["images"] == 20 and "psnr" in results
    assert (tmp_path / "eval" / "examples.png").is_file()
    assert "PSNR (dB)" in capsys.readouterr().out
