"""`mllm edit` through the CLI entry point, on a tiny random model folder (the plumbing, the files and the
seeds; what an untrained model draws is noise)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mllm.cli import main
from mllm.config import EDIT_GUIDANCE, EDIT_TEMPERATURE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mllm.init import init_model

    return init_model("tiny", "tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> str:
    from mllm.data.shapes import make_scene, render

    path = tmp_path_factory.mktemp("images") / "scene.png"
    render(make_scene(1), 48).save(path)  # not the tokenizer's size: the model resizes it
    return str(path)


def _edit(model_dir, image, out, *extra) -> int:
    return main(["edit", "--model", str(model_dir), str(image), "make the circle blue", "--out", str(out),
                 "--device", "cpu", *extra])


def test_edit_writes_pngs_of_the_tokenizer_size(model_dir, scene_png, tmp_path, capsys):
    out = tmp_path / "edited.png"
    assert _edit(model_dir, scene_png, out, "--seed", "0") == 0
    assert capsys.readouterr().out.split() == [str(out)]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 32)  # the tiny tokenizer's image size

    # --n > 1: FILE-0.png, FILE-1.png, ... as `mllm draw` writes them; every sampling option reaches MLLM.edit
    many = tmp_path / "sub" / "many"
    assert _edit(model_dir, scene_png, many, "--n", "3", "--seed", "1", "--guidance", "both", "--guidance-scale",
                 "2", "--temperature", "0.9", "--top-k", "10", "--top-p", "0.9", "--decoding", "sequential") == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "sub" / f"many-{i}.png") for i in range(3)]
    assert all(Image.open(path).format == "PNG" and Image.open(path).size == (32, 32) for path in printed)


def test_edit_is_reproducible_with_a_seed(model_dir, scene_png, tmp_path, capsys):
    for name in ("a.png", "b.png"):
        assert _edit(model_dir, scene_png, tmp_path / name, "--seed", "5") == 0
    assert _edit(model_dir, scene_png, tmp_path / "c.png", "--seed", "6") == 0
    capsys.readouterr()
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


def test_the_options_reach_mllm_edit(model_dir, scene_png, tmp_path, capsys, monkeypatch):
    from mllm.api import MLLM

    seen = {}
    real = MLLM.edit

    def spy(self, image, instruction, **kwargs):
        seen.update(kwargs, instruction=instruction, size=image.size)
        return real(self, image, instruction, **kwargs)

    monkeypatch.setattr(MLLM, "edit", spy)
    assert _edit(model_dir, scene_png, tmp_path / "x.png", "--n", "2", "--seed", "3", "--guidance", "both",
                 "--guidance-scale", "2.5", "--temperature", "0", "--top-k", "4", "--top-p", "0.5",
                 "--decoding", "jacobi", "--image-guidance-scale", "1.25") == 0
    capsys.readouterr()
    assert seen == {"instruction": "make the circle blue", "size": (48, 48), "n": 2, "seed": 3, "guidance": "both",
                    "guidance_scale": 2.5, "temperature": 0.0, "top_k": 4, "top_p": 0.5, "decoding": "jacobi",
                    "image_guidance_scale": 1.25}


@pytest.mark.parametrize("case, expected", [
    ("corrupt", "cannot read image"),
    ("missing", "does not exist"),
    ("folder", "is a folder"),
    ("empty", "instruction is empty"),
    ("suffix", "unknown image file extension '.xyz'"),
])  # fmt: skip
def test_user_mistakes_are_one_line_and_exit_2(model_dir, scene_png, tmp_path, capsys, case, expected):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    image = {"corrupt": corrupt, "missing": tmp_path / "nope.png", "folder": tmp_path}.get(case, scene_png)
    instruction = "  " if case == "empty" else "make the circle blue"
    out = tmp_path / ("out.xyz" if case == "suffix" else "out.png")
    code = main(["edit", "--model", str(model_dir), str(image), instruction, "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("mllm edit: error: ") and expected in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_option_mistakes_are_one_line(model_dir, scene_png, tmp_path, capsys):
    for extra, expected in ((["--guidance", "instructions"], "did you mean instruction?"),
                            (["--n", "0"], "--n"), (["--decoding", "jacobbi"], "did you mean jacobi?")):
        with pytest.raises(SystemExit) as exit_info:
            _edit(model_dir, scene_png, tmp_path / "x.png", *extra)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("mllm edit: error: argument ") and expected in err, err


def test_help_explains_the_instructions(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for phrase in ("make the circle blue", "move the square to the top left", "make the triangle large",
                   "remove the circle", "add a small red square", "turn the circle into a triangle",
                   "--guidance {instruction,both}", "--guidance-scale", "FILE-0.png", "docs/editing.md"):
        assert phrase in out, phrase


# ------------------------------------------------------------------- `mllm chat`: several images, /edit
@pytest.fixture(scope="module")
def model(model_dir):
    import mllm

    return mllm.load(model_dir, device="cpu")


@pytest.fixture()
def session(model, tmp_path):
    import io

    from mllm import terminal_chat as chat

    options = chat.ChatOptions(save_dir=tmp_path / "saved", max_new_tokens=4, seed=0)
    return chat.ChatSession(model, options, out=io.StringIO(), err=io.StringIO(), stamp="t")


def test_image_paths_of_the_image_command(tmp_path):
    from mllm.terminal_chat import image_paths

    spaced = tmp_path / "my scene.png"
    spaced.write_bytes(b"")
    assert image_paths(str(spaced)) == [spaced]  # alone, a path with spaces needs no quotes
    assert image_paths(f'"{spaced}"') == [spaced]
    assert image_paths(f'a.png "{spaced}" b.png') == [Path("a.png"), spaced, Path("b.png")]
    assert image_paths("a.png 'b.png") is None  # unbalanced quotes
    assert image_paths("   ") == []


def test_one_message_holds_several_images_in_order(session, tmp_path):
    from mllm.data.shapes import make_scene, render

    paths = []
    for seed, name in ((1, "one.png"), (2, "two words.png"), (3, "three.png")):
        render(make_scene(seed), 32).save(tmp_path / name)
        paths.append(tmp_path / name)
    assert session.handle(f'/image {paths[0]} "{paths[1]}"') and session.handle(f"/image {paths[2]}")
    assert len(session.pending) == 3 and session.err.getvalue().count("[image attached:") == 3
    assert session.handle("What changed between the images?")
    content = session.history[-2]["content"]
    assert [part["type"] for part in content] == ["image", "image", "image", "text"]
    expected = [Image.open(path).convert("RGB").tobytes() for path in paths]
    assert [part["image"].tobytes() for part in content[:3]] == expected
    # one unreadable path attaches none of them
    assert session.handle(f"/image {paths[0]} {tmp_path / 'missing.png'}") and session.pending == []
    assert "missing.png does not exist" in session.err.getvalue() and "[no image attached]" in session.err.getvalue()
    assert session.handle("/image 'a.png") and "unbalanced quotes" in session.err.getvalue()


def test_an_image_and_an_instruction_get_an_image_back(session, scene_png, monkeypatch):
    """A message of an image and an instruction goes to `chat`; the image it answers with (an edit, for a
    trained model; forced here, the tiny model is random) is saved like a drawing."""
    from mllm.api import MLLM

    edited = Image.new("RGB", (32, 32), (40, 90, 220))
    seen = []

    def fake_chat(self, messages, **options):
        seen.append(messages[-1])
        return {"text": "", "images": [edited]}

    monkeypatch.setattr(MLLM, "chat", fake_chat)
    session.handle(f"/image {scene_png}")
    session.handle("make the circle blue")
    assert [part["type"] for part in seen[0]["content"]] == ["image", "text"]
    saved = [line for line in session.out.getvalue().splitlines() if line.startswith("[image saved: ")]
    assert len(saved) == 1
    with Image.open(saved[0][len("[image saved: "):-1]) as image:
        assert image.convert("RGB").tobytes() == edited.tobytes()
    assert session.history[-1]["content"][0]["image"] is edited


def test_the_edit_command(session, model, scene_png, monkeypatch):
    from mllm.api import MLLM

    calls = []
    real = MLLM.edit

    def spy(self, image, instruction, **kwargs):
        calls.append((image, instruction, kwargs))
        return real(self, image, instruction, **kwargs)

    monkeypatch.setattr(MLLM, "edit", spy)
    session.handle("/edit make the circle blue")
    assert "needs an image" in session.err.getvalue() and not calls
    session.handle(f"/image {scene_png}")
    session.handle("/edit make the circle blue")
    image, instruction, kwargs = calls[-1]
    assert image.size == (48, 48) and instruction == "make the circle blue"
    assert kwargs == {"seed": 0, "guidance_scale": None, "guidance": EDIT_GUIDANCE,  # None: the model's own
                      "temperature": EDIT_TEMPERATURE, "decoding": "auto"}
    user, assistant = session.history[-2:]
    assert [part["type"] for part in user["content"]] == ["image", "text"]
    first = assistant["content"][0]["image"]
    assert [part["type"] for part in assistant["content"]] == ["image"] and first.size == (32, 32)
    assert session.out.getvalue().splitlines()[-1].startswith("[image saved: ")
    # no image attached: the last image of the conversation (the edit) is edited again
    session.handle("/edit remove the square")
    assert calls[-1][0] is first and calls[-1][2]["seed"] == 1
    assert session.history[-2]["content"] == [{"type": "text", "text": "remove the square"}]
    # several attached: refused, nothing sent
    session.handle(f"/image {scene_png} {scene_png}")
    session.handle("/edit make the circle blue")
    assert "/edit edits one image, and 2 are attached" in session.err.getvalue() and len(calls) == 2
    assert session.handle("/edit") and "needs an instruction" in session.err.getvalue()
    assert "Traceback" not in session.err.getvalue()


def test_the_chat_command_takes_the_edit_settings(model_dir, tmp_path):
    import argparse

    from mllm.commands import chat as chat_command

    parser = argparse.ArgumentParser()
    chat_command.add_arguments(parser)
    args = parser.parse_args(["--model", str(model_dir), "--edit-guidance-scale", "2", "--edit-guidance", "both"])
    assert (args.edit_guidance_scale, args.edit_guidance) == (2.0, "both")
