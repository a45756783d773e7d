"""`mllm caption | ask | draw` through the CLI entry point, on a tiny model folder."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from mllm.cli import main


@pytest.fixture(scope="module")
def model_dir(model_tiny_dir):
    return model_tiny_dir


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    from mllm.data.shapes import make_scene, render

    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed in (1, 2):
        path = folder / f"scene{seed}.png"
        render(make_scene(seed), 48).save(path)
        paths.append(str(path))
    return paths


def test_draw_writes_pngs_of_the_tokenizer_size(model_dir, tmp_path, capsys):
    out = tmp_path / "drawn.png"
    assert (
        main(
            [
                "draw",
                "--model",
                str(model_dir),
                "a red circle at the top left",
                "--out",
                str(out),
                "--seed",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.split() == [str(out)]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 32)  # the tiny tokenizer's image size

    assert (
        main(
            [
                "draw",
                "--model",
                str(model_dir),
                "a blue square",
                "--out",
                str(tmp_path / "many.png"),
                "--n",
                "3",
                "--guidance",
                "2",
                "--temperature",
                "0.9",
                "--top-k",
                "10",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / f"many-{i}.png") for i in range(3)]
    assert all(Image.open(path).size == (32, 32) for path in printed)


def test_draw_is_reproducible_with_a_seed(model_dir, tmp_path, capsys):
    for name in ("a.png", "b.png"):
        assert (
            main(
                [
                    "draw",
                    "--model",
                    str(model_dir),
                    "a green triangle",
                    "--out",
                    str(tmp_path / name),
                    "--seed",
                    "5",
                ]
            )
            == 0
        )
    capsys.readouterr()
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_draw_decoding_reaches_the_generator_and_greedy_methods_agree(model_dir, tmp_path, capsys, decodings_seen):

    seen = decodings_seen("generate_images")
    for name, extra in (("default.png", []), ("jacobi.png", ["--decoding", "jacobi"]),
                        ("sequential.png", ["--decoding", "sequential"])):
        argv = ["draw", "--model", str(model_dir), "a red circle", "--out", str(tmp_path / name), "--n", "2",
                "--temperature", "0", "--seed", "0", *extra]
        assert main(argv) == 0
    capsys.readouterr()
    assert seen == ["auto", "jacobi", "sequential"]
    for i in range(2):  # greedy: both methods draw the same images
        assert (tmp_path / f"jacobi-{i}.png").read_bytes() == (tmp_path / f"sequential-{i}.png").read_bytes()


def test_a_bad_decoding_name_is_one_line(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["draw", "--model", str(model_dir), "a red circle", "--out", str(tmp_path / "x.png"),
              "--decoding", "jacobbi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mllm draw: error: argument --decoding: invalid choice 'jacobbi'; did you mean jacobi?")
    assert len(err.strip().splitlines()) == 1


def test_caption_and_ask_print_text(model_dir, image_files, capsys):
    assert main(["caption", "--model", str(model_dir), image_files[0], "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1

    assert main(["caption", "--model", str(model_dir), *image_files, "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == image_files

    assert (
        main(
            [
                "ask",
                "--model",
                str(model_dir),
                image_files[1],
                "What colour is the circle?",
                "--max-new-tokens",
                "4",
                "--temperature",
                "0.7",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_clear_errors(model_dir, image_files, tmp_path, capsys):
    assert main(["caption", "--model", str(tmp_path / "missing"), image_files[0]]) == 2
    assert "does not exist" in capsys.readouterr().err

    assert main(["ask", "--model", str(tmp_path), image_files[0], "What?"]) == 2
    assert "mllm_config.json is missing" in capsys.readouterr().err

    assert main(["caption", "--model", str(model_dir), str(tmp_path / "nope.png")]) == 2
    assert "nope.png does not exist" in capsys.readouterr().err

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["ask", "--model", str(model_dir), str(broken), "What?"]) == 2
    assert "cannot read image" in capsys.readouterr().err

    assert (
        main(["draw", "--model", str(tmp_path / "missing"), "a red circle", "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_command_modules_import_nothing_heavy():
    code = (
        "import sys, mllm.commands.caption, mllm.commands.ask, mllm.commands.draw; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
