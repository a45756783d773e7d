"""User mistakes through every `mllm` command: one line `mllm <command>: error: ...`, exit status 2, no
traceback, the failing path or key named, and "did you mean" where a name is close to a valid one.

Each case runs `mllm.cli.main` in this process on tiny fixtures (a random `tiny` model folder, damaged
copies of it, a few shards, files that are not what an option wants); a few go through the installed
console script to show that nothing else reaches the terminal. A bug (any other exception) keeps its
traceback: the last tests check that.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def _owned_elsewhere(where: str):
    return pytest.mark.xfail(reason=f"owned elsewhere: {where}", strict=False)


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, str]:
    """Paths the cases format their arguments with."""
    from mllm.data.shapes import make_scene, render, write_shapes_data
    from mllm.init import init_model

    root = tmp_path_factory.mktemp("user-errors")
    model = init_model("tiny", "tiny", root / "model", seed=0)
    write_shapes_data(root / "shards", 4, size=32, progress=False)
    render(make_scene(1), 32).save(root / "ok.png")
    (root / "bad.png").write_bytes(b"not an image at all")
    (root / "afile").write_text("a file where a folder belongs\n")
    (root / "empty").mkdir()
    (root / "notlist.json").write_text('{"id": 1}\n')
    (root / "bad.json").write_text('{"id": 1,\n')
    (root / "bad.yaml").write_text("learning_rate: [1\n")
    (root / "typed.yaml").write_text("learning_rate: fast\n")

    def damaged(name: str, change) -> None:
        copy = root / name
        shutil.copytree(model, copy)
        change(copy)

    damaged("m_noweights", lambda d: (d / "llm" / "model.safetensors").unlink())
    damaged("m_badweights", lambda d: (d / "llm" / "model.safetensors").write_bytes(b"garbage"))
    damaged("m_badjson", lambda d: (d / "mllm_config.json").write_text("{bad"))
    damaged("m_notok", lambda d: shutil.rmtree(d / "tokenizer"))
    damaged("m_badvt", lambda d: (d / "vision_tokenizer" / "model.safetensors").write_bytes(b"garbage"))

    def misspelled_key(folder: Path) -> None:
        config = json.loads((folder / "mllm_config.json").read_text())
        config["codebok_size"] = config.pop("codebook_size")
        (folder / "mllm_config.json").write_text(json.dumps(config))

    damaged("m_unkkey", misspelled_key)
    hf = root / "hf_base"  # a Hugging Face folder without weights, and one given where a model folder belongs
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}\n')
    not_lora = root / "adapter_notlora"
    not_lora.mkdir()
    (not_lora / "adapter_config.json").write_text("{}\n")
    other = root / "adapter_other"  # trains vocabulary rows the tiny model does not have
    other.mkdir()
    (other / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "trainable_token_indices": {"embed_tokens": [100_000]}})
    )
    (other / "adapter_model.safetensors").write_bytes(b"unused: refused before it is read")
    names = ("model", "shards", "ok.png", "bad.png", "afile", "empty", "notlist.json", "bad.json", "bad.yaml",
             "typed.yaml", "m_noweights", "m_badweights", "m_badjson", "m_notok", "m_badvt", "m_unkkey", "hf_base",
             "adapter_notlora", "adapter_other")
    # keys without dots: they are str.format fields
    return {name.replace(".", "_"): str(root / name) for name in names} | {"root": str(root)}


@pytest.fixture(scope="module")
def busy_port():
    """A port something already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    # The one-shot commands may hand their work to a warm worker process; these cases run here.
    monkeypatch.setenv("MLLM_WORKER", "0")


@pytest.fixture(autouse=True, scope="module")
def _no_loading_bars():
    """`mllm` turns transformers' loading bars off before importing it; in this process it is imported
    already, so turn them off here (a bar on stderr is not an error line)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    yield
    if enabled:
        logging.enable_progress_bar()


# (argv, what the one line must contain: a path, a key, a suggestion ...). Braces name fixture paths;
# {out} is a fresh folder of the case, {port} the busy port. At least three mistakes per command.
CASES = [
    # data
    ("data shape --out {out}/d --n 2", ["did you mean shapes?"]),
    ("data shapes --out {afile} --n 2", ["--out", "{afile}"]),
    ("data shapes --out {out}/d --n 0", ["--n", "positive integer"]),
    ("data shapes --out {out}/d --n 2 --format llva", ["did you mean llava?"]),
    ("data convert-llava --json {out}/nope.json --image-root {root} --out {out}/c", ["{out}/nope.json"]),
    ("data convert-llava --json {notlist_json} --image-root {root} --out {out}/c",
     ["{notlist_json}", "JSON list"]),
    ("data convert-llava --json {bad_json} --image-root {root} --out {out}/c",
     ["{bad_json}", "not valid JSON"]),
    # pretokenize
    ("pretokenize --data {shards} --vision-tokenizer {out}/nope --out {out}/p", ["{out}/nope"]),
    ("pretokenize --data {empty} --vision-tokenizer {model}/vision_tokenizer --out {out}/p", ["{empty}"]),
    ("pretokenize --data {shards} --vision-tokenizer {model}/vision_tokenizer --out {out}/p --precision bf17",
     ["did you mean bf16?"]),
    pytest.param(
        "pretokenize --data {shards} --vision-tokenizer {model}/vision_tokenizer --out {out}/p --device cdua",
        ["did you mean cuda?"]),
    pytest.param(
        "pretokenize --data {shards} --vision-tokenizer {m_badvt}/vision_tokenizer --out {out}/p",
        ["{m_badvt}/vision_tokenizer"]),
    # train-teacher
    ("train-teacher --data {shards} --out {out}/t --recipe teacher-shapess",
     ["did you mean teacher-shapes?"]),
    ("train-teacher --data {shards} --out {out}/t --set learnig_rate=1",
     ["'learnig_rate'", "did you mean learning_rate?"]),
    ("train-teacher --data {shards} --out {out}/t --set learning_rate=fast",
     ["learning_rate: expected a number, got 'fast'"]),
    ("train-teacher --data {out}/nope --out {out}/t", ["{out}/nope", "does not exist"]),
    ("train-teacher --data {shards} --out {out}/t --recipe sft", ["mllm train"]),
    # train-tokenizer
    ("train-tokenizer --data {shards} --out {out}/k --recipe tokenizer-shape",
     ["did you mean tokenizer-shapes?"]),
    ("train-tokenizer --data {shards} --out {out}/k --quantizer dul", ["did you mean dual?"]),
    ("train-tokenizer --data {shards} --out {out}/k --quantizer pixel --set learnig_rate=1",
     ["did you mean learning_rate?"]),
    ("train-tokenizer --data {shards} --out {out}/k --teacher {out}/nope", ["{out}/nope"]),
    pytest.param(
        "train-tokenizer --data {shards} --out {out}/k --quantizer pixel --set tokenizer.codebok_size=512",
        ["did you mean tokenizer.codebook_size?"]),
    pytest.param(
        "train-tokenizer --data {shards} --out {out}/k --quantizer pixel --set tokenizer.codebook_size=big",
        ["codebook_size", "'big'"]),
    # eval-tokenizer
    ("eval-tokenizer --tokenizer {out}/nope --data {shards}", ["{out}/nope"]),
    ("eval-tokenizer --tokenizer {model}/vision_tokenizer --data {out}/nope", ["{out}/nope"]),
    ("eval-tokenizer --tokenizer {model}/vision_tokenizer --data {shards} --precision bf17",
     ["did you mean bf16?"]),
    ("eval-tokenizer --tokenizer {model} --data {shards}", ["{model}"]),
    # init
    ("init --llm tny --vision-tokenizer tiny --out {out}/i", ["did you mean tiny?"]),
    ("init --llm tiny --vision-tokenizer tny --out {out}/i", ["did you mean tiny?"]),
    ("init --llm tiny --vision-tokenizer photo --out {out}/i", ["needs a semantic teacher", "tokenizer-photo"]),
    ("init --llm {empty} --vision-tokenizer tiny --out {out}/i", ["--llm {empty}", "config.json"]),
    ("init --llm {hf_base} --vision-tokenizer tiny --out {out}/i", ["--llm {hf_base}", "no weights"]),
    ("init --llm {model} --vision-tokenizer tiny --out {out}/i", ["already a model folder"]),
    ("init --llm tiny --vision-tokenizer {m_badvt}/vision_tokenizer --out {out}/i",
     ["{m_badvt}/vision_tokenizer"]),
    ("init --llm tiny --vision-tokenizer {model} --out {out}/i", ["{model}/vision_tokenizer"]),
    ("init --llm tiny --vision-tokenizer tiny --out {out}/i --text-corpus {out}/nope.txt",
     ["--text-corpus {out}/nope.txt"]),
    ("init --llm tiny --vision-tokenizer tiny --out {out}/i --embedding codebook --projector-hidden-size 0",
     ["--projector-hidden-size"]),
    ("init --llm tiny --vision-tokenizer tiny --out {out}/i --embedding codeboook",
     ["did you mean codebook?"]),
    # caption
    ("caption --model {out}/nope {ok_png}", ["model folder {out}/nope does not exist"]),
    ("caption --model {model} {ok_png} {bad_png}", ["{bad_png}"]),
    ("caption --model {model} {ok_png} --top-p 2", ["--top-p"]),
    ("caption --model {m_noweights} {ok_png}", ["{m_noweights}", "llm/model.safetensors"]),
    ("caption --model {model} {ok_png} --device cdua", ["did you mean cuda?"]),
    # ask
    ("ask --model {model} {out}/nope.png 'What colour?'", ["image {out}/nope.png does not exist"]),
    ("ask --model {model} {empty} 'What colour?'", ["image {empty} is a folder"]),
    ("ask --model {m_badjson} {ok_png} 'What colour?'", ["{m_badjson}/mllm_config.json"]),
    ("ask --model {m_unkkey} {ok_png} 'What colour?'",
     ["{m_unkkey}/mllm_config.json", "did you mean codebook_size?"]),
    ("ask --model {m_badweights} {ok_png} 'What colour?'", ["{m_badweights}/llm"]),
    ("ask --model {hf_base} {ok_png} 'What colour?'", ["mllm init --llm {hf_base}"]),
    ("ask --model {model} {ok_png} 'What colour?' --adapter {adapter_notlora}",
     ["{adapter_notlora}", "peft_type"]),
    ("ask --model {model} {ok_png} 'What colour?' --adapter {adapter_other}",
     ["{adapter_other}", "another model"]),
    ("ask --model {model} {ok_png} 'What colour?' --dtype fp17", ["did you mean fp16?"]),
    ("ask --model {model} {ok_png} '  '", ["question is empty"]),
    pytest.param(
        "ask --model {model} {ok_png} 'What colour?' --device cuda", ["--device", "cuda"],
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    # edit
    ("edit --model {model} {bad_png} 'make the circle blue' --out {out}/e.png", ["cannot read image", "{bad_png}"]),
    ("edit --model {model} {out}/nope.png 'make the circle blue' --out {out}/e.png", ["{out}/nope.png", "does not exist"]),
    ("edit --model {model} {ok_png} '' --out {out}/e.png", ["instruction is empty"]),
    ("edit --model {model} {ok_png} 'make the circle blue' --out {out}/e.png --guidance both2", ["did you mean both?"]),
    # draw
    ("draw --model {model} '' --out {out}/d.png", ["prompt is empty"]),
    ("draw --model {model} 'a red circle' --out {afile}/d.png", ["{afile}"]),
    ("draw --model {m_notok} 'a red circle' --out {out}/d.png", ["{m_notok}", "tokenizer/"]),
    ("draw --model {model} 'a red circle' --out {out}/d.png --n 0", ["--n"]),
    ("draw --model {model} 'a red circle' --out {out}/d.xyz", ["'.xyz'"]),
    ("draw --model {model} 'a red circle' --out {out}/d.png --decoding jacobbi",
     ["--decoding", "did you mean jacobi?", "'sequential'"]),
    # train
    ("train --recipe sftt --model {model} --data {shards} --out {out}/t", ["did you mean sft?"]),
    ("train --recipe sft --model {model} --data {shards} --out {out}/t --set learnig_rate=1e-4",
     ["'learnig_rate'", "did you mean learning_rate?"]),
    ("train --recipe sft --model {model} --data {shards} --out {out}/t --set learning_rate=fast",
     ["learning_rate: expected a number, got 'fast'"]),
    ("train --recipe sft --model {model} --data {shards} --out {out}/t --set lora.rr=8",
     ["did you mean lora.r?"]),
    ("train --recipe sft --model {model} --data {shards} --out {out}/t --set noequals", ["'noequals'"]),
    ("train --recipe {bad_yaml} --model {model} --data {shards} --out {out}/t", ["{bad_yaml}", "line 2"]),
    ("train --recipe {out}/nope.yaml --model {model} --data {shards} --out {out}/t", ["{out}/nope.yaml"]),
    ("train --recipe {typed_yaml} --model {model} --data {shards} --out {out}/t",
     ["recipe {typed_yaml}: learning_rate: expected a number, got 'fast'"]),
    ("train --recipe sft --model {hf_base} --data {shards} --out {out}/t", ["mllm init --llm {hf_base}"]),
    ("train --recipe sft --model {model} --data {shards} --out {afile}", ["--out {afile}"]),
    ("train --recipe sft --model {model} --data {ok_png} --out {out}/t --max-steps 1", ["data {ok_png}"]),
    ("train --recipe sft --model {m_noweights} --data {shards} --out {out}/t --max-steps 1",
     ["{m_noweights}"]),
    pytest.param(
        "train --recipe sft --model {model} --data {shards} --out {out}/t --max-steps 1 "
        "--set lr_scheduler=cosin",
        ["did you mean cosine?"]),
    pytest.param(
        "train --recipe sft --model {model} --data {shards} --out {out}/t --max-steps 1 "
        "--set tasks.chatt=0.5",
        ["did you mean chat?"]),
    # merge
    ("tune-encoder --model {out}/nope", ["{out}/nope", "neither a tokenizer folder nor a model folder"]),
    ("tune-encoder --model {model} --steps 0", ["--steps"]),
    ("tune-encoder --model {model} --learning-rate -1", ["--learning-rate"]),
    ("tune-encoder --model {model} --preference-margin -0.1", ["--preference-margin"]),
    ("chat-threshold --model {out}/nope", ["{out}/nope", "not a model folder"]),
    ("chat-threshold --model {model} --scenes 0", ["--scenes"]),
    ("chat-threshold --model {model} --look varid", ["did you mean varied?"]),
    ("chat-threshold --model {model} --out {out}", ["--out {out} is a folder"]),
    ("merge --base {out}/nope --adapter {adapter_other} --out {out}/m", ["{out}/nope"]),
    ("merge --base {model} --adapter {model} --out {out}/m", ["--adapter {model}", "model folder"]),
    ("merge --base {model} --adapter {adapter_notlora} --out {out}/m", ["{adapter_notlora}", "peft_type"]),
    ("merge --base {model} --adapter {adapter_other} --out {out}/m", ["another model"]),
    ("merge --base {model} --adapter {adapter_other} --out {afile}", ["--out {afile}"]),
    ("merge --base {model} --adapter {adapter_other} --out {out}/m --dtype bf17", ["did you mean bf16?"]),
    # chat
    ("chat --model {out}/nope", ["model folder {out}/nope does not exist"]),
    ("chat --model {model} --save-dir {afile}", ["--save-dir {afile}"]),
    ("chat --model {m_notok}", ["{m_notok}"]),
    ("chat --model {model} --image-temperature -1", ["--image-temperature"]),
    ("chat --model {model} --decoding parallel", ["--decoding", "'jacobi', 'sequential'"]),
    # serve
    ("serve --model {model} --port 99999", ["--port", "99999"]),
    ("serve --model {model} --port {port}", ["--port {port}", "already in use"]),
    ("serve --model {model} --host 192.0.2.1 --port 0", ["--host 192.0.2.1"]),
    ("serve --model {out}/nope", ["{out}/nope"]),
    ("serve --model {model} --adapter {adapter_notlora}", ["{adapter_notlora}"]),
    ("serve --model {model} --device cdua", ["did you mean cuda?"]),
    ("serve --model {model} --decoding sequental", ["--decoding", "did you mean sequential?"]),
    # demo
    ("demo --size tny --out {out}/demo", ["did you mean tiny?"]),
    ("demo --minutes -1 --out {out}/demo", ["--minutes"]),
    ("demo --out {afile}", ["{afile}"]),
    # eval
    ("eval --suite vqa2 --model {model} --out {out}/e", ["did you mean vqav2?"]),
    ("eval --suite shapes-vqa --model {out}/nope --out {out}/e", ["{out}/nope"]),
    ("eval --suite mmbench --model {model} --out {out}/e --option circlar=true", ["did you mean circular?"]),
    ("eval --suite shapes-vqa --model {model} --out {out}/e --batch-size 0", ["--batch-size"]),
    ("eval --suite shapes-t2i --model {model} --out {out}/e --decoding jacobian", ["did you mean jacobi?"]),
    # eval-score
    ("eval-score --suite vqa2 --predictions {out}/p.jsonl", ["did you mean vqav2?"]),
    ("eval-score --suite shapes-vqa --predictions {out}/p.jsonl", ["{out}/p.jsonl"]),
    pytest.param(
        "eval-score --suite shapes-vqa --predictions {bad_json}", ["{bad_json}"]),
]


def _argv(template: str, fx: dict[str, str], out: Path, port: int) -> list[str]:
    import shlex

    values = {**fx, "out": str(out), "port": str(port)}
    return [part.format(**values) for part in shlex.split(template)]


def _case_id(case) -> str:
    template = case.values[0] if hasattr(case, "values") else case[0]
    return template.replace("{", "").replace("}", "")


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses an option value before `run`
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("template, expected", CASES, ids=[_case_id(case) for case in CASES])
def test_a_user_mistake_is_one_line_and_exit_2(template, expected, fx, busy_port, tmp_path, capsys):
    argv = _argv(template, fx, tmp_path, busy_port)
    code, err = _run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    command = argv[0]
    assert lines[0].startswith(f"mllm {command}: error: "), err
    for part in expected:
        assert part.format(**fx, out=tmp_path, port=busy_port) in lines[0], (part, err)


def test_every_command_has_at_least_three_cases():
    counts = {name: 0 for name in COMMANDS}
    for case in CASES:
        template = case.values[0] if hasattr(case, "values") else case[0]
        counts[template.split()[0]] += 1
    assert min(counts.values()) >= 3, counts


def _console(*argv: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("mllm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mllm.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLLM_WORKER": "0"}
    env.pop("MLLM_TRACEBACK", None)
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=120, env=env,
                          check=False)


@pytest.mark.parametrize("template, start", [
    ("train --recipe sftt --model {model} --data {shards} --out {out}/t",
     "mllm train: error: unknown recipe 'sftt'; did you mean sft?"),
    ("ask --model {m_badweights} {ok_png} 'What colour?'",
     "mllm ask: error: cannot read the LLM {m_badweights}/llm"),
    ("serve --model {model} --port {port}", "mllm serve: error: --port {port} is already in use"),
])  # fmt: skip
def test_the_console_script_prints_one_line_and_no_traceback(template, start, fx, busy_port, tmp_path):
    proc = _console(*_argv(template, fx, tmp_path, busy_port))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines == [lines[0]] and lines[0].startswith(start.format(**fx, port=busy_port)), proc.stderr


@pytest.mark.parametrize("command, argv", [
    ("train", ["train", "--recipe", "sft", "--model", "m", "--data", "d", "--out", "o"]),
    ("ask", ["ask", "--model", "m", "x.png", "q"]),
])  # fmt: skip
def test_an_internal_error_keeps_its_traceback(command, argv, monkeypatch):
    import importlib

    module = importlib.import_module(COMMANDS[command][0])

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(module, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(argv)


def test_a_library_type_error_is_not_taken_for_a_user_error(fx, monkeypatch):
    """Only what the library raises as a user error becomes one line: a TypeError while loading is a bug."""
    import transformers

    def broken(*args, **kwargs):
        raise TypeError("unexpected keyword argument 'x'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(TypeError, match="unexpected keyword"):
        main(["ask", "--model", fx["model"], fx["ok_png"], "What colour?"])


def test_serve_answers_on_the_address_it_checked(fx, monkeypatch, capsys):
    """`mllm serve` binds its address before the model loads (so a port in use is one line at once) and
    hands that very socket to uvicorn: --port 0 takes a free port, printed, and answered on."""
    import threading
    import time

    import httpx

    from serve import server as server_module

    servers = []
    make_server = server_module.make_server

    def keep(app, options=None, log_level="info"):
        servers.append(make_server(app, options, log_level="warning"))
        return servers[-1]

    monkeypatch.setattr(server_module, "make_server", keep)
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(["serve", "--model", fx["model"], "--port", "0",
                                                                "--device", "cpu"])), daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not (servers and servers[0].started) and time.time() < deadline:
        time.sleep(0.05)
    assert servers and servers[0].started
    line = capsys.readouterr().out.strip().splitlines()[-1]
    port = servers[0].servers[0].sockets[0].getsockname()[1]
    assert port != 0 and line.startswith(f"serving model on http://127.0.0.1:{port} ")
    reply = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
    assert reply.status_code == 200 and reply.json()["data"][0]["id"] == "model"
    servers[0].should_exit = True
    thread.join(timeout=30)
    assert codes == [0]
