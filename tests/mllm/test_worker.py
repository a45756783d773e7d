"""The warm worker of `mllm ask | caption | draw` (mllm/commands/worker.py): same answers as in-process, reuse,
reload on change, idle exit, stale sockets, private folder, fallback."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from mllm.cli import main
from mllm.commands import worker

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from mllm.data.shapes import make_scene, render

    path = tmp_path_factory.mktemp("worker-images") / "scene.png"
    render(make_scene(3), 48).save(path)
    return str(path)


def _pids(folder: Path) -> list[int]:
    return [int(path.read_text()) for path in folder.glob("*.pid")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def worker_dir(tmp_path, monkeypatch):
    """Workers enabled, in a private folder of this test; every worker started is stopped afterwards."""
    folder = tmp_path / "workers"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("MLLM_WORKER", "1")
    monkeypatch.setenv("MLLM_WORKER_DIR", str(folder))
    monkeypatch.setenv("MLLM_WORKER_IDLE", "60")
    yield folder
    for pid in _pids(folder):
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)


def _ask(model_dir, image_file, capsys, *extra):
    """(exit code, stdout); stderr is checked where it matters (progress bars of a first load differ)."""
    code = main(["ask", "--model", str(model_dir), image_file, "What colour is the circle?", *extra])
    return code, capsys.readouterr().out


def test_worker_answers_as_in_process_and_is_reused(model_tiny_dir, image_file, worker_dir, capsys, monkeypatch):
    monkeypatch.setenv("MLLM_WORKER", "0")
    expected = _ask(model_tiny_dir, image_file, capsys)
    assert expected[0] == 0 and expected[1].strip()

    monkeypatch.setenv("MLLM_WORKER", "1")
    first = _ask(model_tiny_dir, image_file, capsys)
    assert first == expected
    (pid,) = _pids(worker_dir)
    assert _alive(pid) and pid != os.getpid()

    # Served by the worker: this process cannot answer any more, and the same worker stays.
    import mllm.commands.ask as ask_command

    monkeypatch.setattr(ask_command, "run", lambda args: 1 / 0)
    assert _ask(model_tiny_dir, image_file, capsys) == expected
    assert _pids(worker_dir) == [pid]


def test_user_errors_come_back_as_one_line(model_tiny_dir, worker_dir, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    code = main(["ask", "--model", str(model_tiny_dir), str(missing), "What colour is the circle?"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"mllm ask: error: image {missing} does not exist")
    assert _pids(worker_dir)  # it went through the worker


def test_draw_writes_files_relative_to_the_callers_folder(model_tiny_dir, worker_dir, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["draw", "--model", str(model_tiny_dir), "a red circle", "--out", "out/pic.png", "--seed", "1"])
    assert code == 0
    assert capsys.readouterr().out.strip() == "out/pic.png"
    assert (tmp_path / "out" / "pic.png").is_file()
    assert _pids(worker_dir)


def test_draw_options_reach_the_worker(model_tiny_dir, worker_dir, tmp_path, capsys, monkeypatch):
    """The worker parses the caller's own argv: --decoding (and the sampling options) reach its `run`."""
    argv = ["draw", "--model", str(model_tiny_dir), "a blue square", "--seed", "2", "--temperature", "0.9",
            "--decoding", "sequential", "--out"]
    monkeypatch.setenv("MLLM_WORKER", "0")
    assert main([*argv, str(tmp_path / "here.png")]) == 0
    jacobi = [part if part != "sequential" else "jacobi" for part in argv]
    assert main([*jacobi, str(tmp_path / "jacobi.png")]) == 0
    # Sampled: the other method draws another image from the same distribution, so the comparison below
    # tells whether the worker decoded as asked.
    assert (tmp_path / "jacobi.png").read_bytes() != (tmp_path / "here.png").read_bytes()
    monkeypatch.setenv("MLLM_WORKER", "1")
    import mllm.commands.draw as draw_command

    monkeypatch.setattr(draw_command, "run", lambda args: 1 / 0)  # this process cannot draw any more
    assert main([*argv, str(tmp_path / "worker.png")]) == 0
    capsys.readouterr()
    assert _pids(worker_dir)
    assert (tmp_path / "worker.png").read_bytes() == (tmp_path / "here.png").read_bytes()


def test_model_cache_reloads_a_changed_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights").write_bytes(b"a")
    loads = []
    cache = worker.ModelCache()

    def load():
        loads.append(1)
        return object()

    first = cache.get(folder, None, "cpu", None, load)
    assert cache.get(folder, None, "cpu", None, load) is first and len(loads) == 1
    assert cache.get(folder, None, "cpu", "bf16", load) is not first and len(loads) == 2
    (folder / "weights").write_bytes(b"bb")
    assert cache.get(folder, None, "cpu", None, load) is not first and len(loads) == 3


def test_idle_worker_exits_and_removes_its_socket(model_tiny_dir, image_file, worker_dir, capsys, monkeypatch):
    monkeypatch.setenv("MLLM_WORKER_IDLE", "1")
    assert _ask(model_tiny_dir, image_file, capsys)[0] == 0
    pids = _pids(worker_dir)
    deadline = time.monotonic() + 30
    while (any(_alive(pid) for pid in pids) or list(worker_dir.glob("*.sock"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not list(worker_dir.glob("*.sock")) and not list(worker_dir.glob("*.pid"))


def test_a_stale_socket_is_replaced(model_tiny_dir, image_file, worker_dir, capsys):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(worker_dir / f"{worker.worker_key()}.sock"))
    stale.close()  # the file stays; nothing listens: a killed worker's leftover
    assert _ask(model_tiny_dir, image_file, capsys)[0] == 0
    assert len(_pids(worker_dir)) == 1


def test_falls_back_to_its_own_process(model_tiny_dir, image_file, worker_dir, capsys, monkeypatch):
    monkeypatch.setenv("MLLM_WORKER", "0")
    expected = _ask(model_tiny_dir, image_file, capsys)
    monkeypatch.setenv("MLLM_WORKER", "1")
    # A worker that cannot start ...
    monkeypatch.setattr(worker.sys, "executable", "/bin/false")
    assert _ask(model_tiny_dir, image_file, capsys) == expected
    monkeypatch.undo()
    # ... and a socket folder others can enter are both refused quietly.
    shared = worker_dir.parent / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    monkeypatch.setenv("MLLM_WORKER", "1")
    monkeypatch.setenv("MLLM_WORKER_DIR", str(shared))
    assert _ask(model_tiny_dir, image_file, capsys) == expected
    assert not list(shared.glob("*.sock"))
    # --no-worker runs here too.
    assert _ask(model_tiny_dir, image_file, capsys, "--no-worker") == expected
    assert not _pids(worker_dir)


def test_key_changes_with_the_environment_that_matters(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    before = worker.worker_key()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert worker.worker_key() != before
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SOME_UNRELATED_VARIABLE", "x")
    assert worker.worker_key() == before
