"""`mllm chat`: a scripted session through stdin (subprocess), and the pieces in-process.

The tiny model is random: replies are gibberish, so the tests check structure, never content.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mllm import terminal_chat as chat
from mllm.commands import chat as chat_command

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mllm.init import init_model

    folder = tmp_path_factory.mktemp("chat") / "m"
    init_model("tiny", "tiny", folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    import mllm

    return mllm.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    from mllm.data.shapes import make_scene, render

    folder = tmp_path_factory.mktemp("chat-images")
    good = folder / "scene.png"
    render(make_scene(1), 32).save(good)
    bad = folder / "not-an-image.png"
    bad.write_text("this is not a png")
    return good, bad


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    chat_command.add_arguments(parser)
    return parser.parse_args(argv)


def session_for(model, model_dir, tmp_path, *extra: str) -> tuple[chat.ChatSession, io.StringIO, io.StringIO]:
    args = parse(
        ["--model", str(model_dir), "--save-dir", str(tmp_path / "out"), "--max-new-tokens", "8", *extra]
    )
    options = chat.ChatOptions(**{key: value for key, value in vars(args).items()
                                  if key not in ("model", "adapter", "device", "dtype")})
    out, err = io.StringIO(), io.StringIO()
    return chat.ChatSession(model, options, out=out, err=err, stamp="test"), out, err


def assistant_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("assistant> ") or line == "assistant>"]


# ---------------------------------------------------------------------------- the command, end to end
def test_scripted_session_through_stdin(model_dir, image_files, tmp_path):
    good, bad = image_files
    save_dir = tmp_path / "drawn"
    script = "\n".join(
        [
            "hello, who are you?",
            f"/image {good}",
            "what colour is the shape?",
            "/draw a red circle",
            f"/image {tmp_path / 'missing.png'}",
            f"/image {bad}",
            "still there?",
            "/nonsense",
            "/reset",
            "and now?",
            "/quit",
            "this line is never read",
        ]
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    command = [
        sys.executable,
        "-m",
        "mllm.cli",
        "chat",
        "--model",
        str(model_dir),
        "--save-dir",
        str(save_dir),
    ]
    result = subprocess.run(
        [*command, "--max-new-tokens", "8", "--device", "cpu", "--seed", "0", "--system", "Be brief."],
        input=script + "\n",
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # hello, the question about the image, the drawing, "still there?", "and now?"; nothing after /quit
    assert len(assistant_lines(result.stdout)) == 5, result.stdout

    drawn = sorted(save_dir.glob("*.png"))
    assert len(drawn) == 1
    assert f"[image saved: {drawn[0]}]" in result.stdout.splitlines()
    with Image.open(drawn[0]) as image:
        assert image.format == "PNG" and image.size == (32, 32)  # the tiny tokenizer's image size

    assert "[image attached:" in result.stderr
    assert "missing.png does not exist" in result.stderr
    assert "cannot read image" in result.stderr
    assert "unknown command /nonsense" in result.stderr
    assert "[conversation cleared]" in result.stderr
    assert "Traceback" not in result.stderr
    assert "error" not in result.stdout  # errors go to stderr only


def test_end_of_input_exits_cleanly_and_bad_options_fail_early(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))  # no /quit: the end of input leaves
    assert (
        chat_command.run(
            parse(["--model", str(model_dir), "--save-dir", str(tmp_path / "o"), "--max-new-tokens", "4"])
        )
        == 0
    )
    assert len(assistant_lines(capsys.readouterr().out)) == 1

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    from mllm.cli import main as mllm_main

    assert mllm_main(["chat", "--model", str(model_dir), "--save-dir", str(not_a_folder)]) == 2
    assert capsys.readouterr().err == f"mllm chat: error: --save-dir {not_a_folder} is not a folder\n"
    assert mllm_main(["chat", "--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"mllm chat: error: model folder {tmp_path / 'nowhere'} does not exist\n"


# ---------------------------------------------------------------------------- the pieces
def test_messages_have_the_content_part_shape():
    image = Image.new("RGB", (4, 4))
    assert chat.user_message("hi") == {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    assert chat.user_message("what?", [image])["content"] == [
        {"type": "image", "image": image},
        {"type": "text", "text": "what?"},
    ]
    assert chat.assistant_message("", [image])["content"] == [{"type": "image", "image": image}]
    assert chat.assistant_message("here", [image])["content"][0] == {"type": "text", "text": "here"}
    assert chat.assistant_message("")["content"] == [{"type": "text", "text": ""}]
    assert chat.system_messages(None) == []
    assert chat.system_messages("s")[0]["role"] == "system"


def test_fit_history_drops_whole_oldest_turns_and_keeps_the_system_message():
    system = chat.system_messages("sys")
    turns = []
    for i in range(4):
        turns += [chat.user_message(f"q{i}"), chat.assistant_message(f"a{i}")]
    messages = system + turns + [chat.user_message("last")]  # 10 messages

    kept, dropped = chat.fit_history(messages, len, 100)
    assert (kept, dropped) == (messages, 0)

    kept, dropped = chat.fit_history(messages, len, 6)
    assert dropped == 2
    assert kept == system + turns[4:] + [messages[-1]]  # q2 a2 q3 a3 last
    assert len(kept) <= 6

    # Never below the system message and the turn being answered, even if they do not fit.
    kept, dropped = chat.fit_history(messages, len, 1)
    assert kept == system + [messages[-1]] and dropped == 4
    assert chat.fit_history([chat.user_message("x")], len, 0) == ([chat.user_message("x")], 0)


def test_prompt_length_matches_the_processor(model, image_files):
    good, _ = image_files
    image = Image.open(good).convert("RGB")
    messages = chat.system_messages("Be brief.") + [
        chat.user_message("what is it?", [image]),
        chat.assistant_message("a circle", [image]),
        chat.user_message("and the colour?"),
    ]
    processor = model.model.processor
    encoded = processor(messages, add_generation_prompt=True, max_length=10_000)
    assert chat.prompt_length(processor, messages) == encoded["input_ids"].shape[1]


def test_session_history_reset_and_errors(model, model_dir, image_files, tmp_path):
    good, bad = image_files
    session, out, err = session_for(model, model_dir, tmp_path, "--system", "Be brief.", "--seed", "1")
    assert session.handle(f"/image {good}") and session.handle(f'/image "{good}"')
    assert len(session.pending) == 2
    assert session.handle("describe both")
    assert session.pending == []
    assert [m["role"] for m in session.history] == ["system", "user", "assistant"]
    assert [part["type"] for part in session.history[1]["content"]] == ["image", "image", "text"]

    assert session.handle("/draw a blue square")
    user, assistant = session.history[-2:]
    assert user["content"] == [{"type": "text", "text": "Draw: a blue square"}]  # the config's template
    assert [part["type"] for part in assistant["content"]] == ["image"]
    assert assistant["content"][0]["image"].size == (32, 32)
    assert out.getvalue().splitlines()[-1] == f"[image saved: {tmp_path / 'out' / 'chat-test-2-0.png'}]"

    assert session.handle(f"/image {bad}") and session.handle("/image") and session.handle("/draw")
    assert session.pending == []
    assert (
        session.handle("//image is text") and session.history[-2]["content"][-1]["text"] == "/image is text"
    )
    assert len(assistant_lines(out.getvalue())) == 3

    session.handle(f"/image {good}")
    assert session.handle("/reset")
    assert session.history == chat.system_messages("Be brief.") and session.pending == []
    assert session.handle("/help") and "/draw PROMPT" in out.getvalue()
    assert session.handle("/quit") is False and session.handle("/exit") is False
    assert "Traceback" not in err.getvalue()


def test_a_long_conversation_drops_its_oldest_turns(model, model_dir, tmp_path):
    session, out, err = session_for(model, model_dir, tmp_path, "--system", "Be brief.")
    processor, context = model.model.processor, model.model.context_length
    long_message = "a red circle " * 33  # ~100 tokens: the 512-token context holds about 4 turns
    for _ in range(10):
        session.handle(long_message)
    assert len(assistant_lines(out.getvalue())) == 10  # every turn answered
    assert "dropped" in err.getvalue()
    assert session.history[0] == chat.system_messages("Be brief.")[0]
    assert 2 < len(session.history) < 1 + 2 * 10
    # The last prompt (all but the reply to it) left room for the reply: 8 new tokens.
    assert chat.prompt_length(processor, session.history[:-1]) <= context - 8


def test_a_model_error_is_reported_and_the_session_goes_on(model, model_dir, tmp_path):
    session, out, err = session_for(model, model_dir, tmp_path)
    session.handle("hi")
    before = list(session.history)
    session.handle("circle " * 2000)  # alone longer than the context: the model refuses it
    assert "error:" in err.getvalue() and "context length" in err.getvalue()
    assert session.history == before  # the refused turn is not kept
    session.handle("hi again")
    assert len(assistant_lines(out.getvalue())) == 2


def test_drawing_is_reproducible_with_a_seed(model):
    request = [chat.user_message(model.config.draw_template.format(prompt="a red circle"))]
    first = chat.draw_images(model, request, guidance_scale=3.0, seed=5)
    second = chat.draw_images(model, request, guidance_scale=3.0, seed=5)
    assert len(first) == 1 and first[0].size == (32, 32)
    assert first[0].tobytes() == second[0].tobytes()


def test_decoding_option_reaches_the_drawing_and_the_chat(model, model_dir, tmp_path, decodings_seen):

    seen = decodings_seen("sample_image_codes")
    default, _, _ = session_for(model, model_dir, tmp_path)
    assert default.options.decoding == "auto" and default.chat_options()["decoding"] == "auto"
    session, out, err = session_for(model, model_dir, tmp_path, "--decoding", "sequential", "--seed", "0")
    assert session.chat_options()["decoding"] == "sequential"  # what model.chat gets for a drawing in a reply
    session.handle("/draw a red circle")
    assert seen == ["sequential"], err.getvalue()
    assert "[image saved:" in out.getvalue()


def test_saved_images_never_overwrite(tmp_path):
    images = [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]
    first = chat.save_images(images, tmp_path / "d", "stamp", 1)
    second = chat.save_images(images, tmp_path / "d", "stamp", 1)
    assert [p.name for p in first] == ["chat-stamp-1-0.png", "chat-stamp-1-1.png"]
    assert [p.name for p in second] == ["chat-stamp-1-0-1.png", "chat-stamp-1-1-1.png"]
    assert len(set(first + second)) == 4
    with Image.open(first[1]) as image:
        assert image.format == "PNG" and image.getpixel((0, 0)) == (0, 0, 255)


def test_input_lines_from_a_pipe():
    assert list(chat.input_lines(io.StringIO("a\n/quit\n"))) == ["a\n", "/quit\n"]
